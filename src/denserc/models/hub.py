"""Downloading pretrained weights that fails in seconds, not after a minute of retries, without a network.

Offline, the Hugging Face hub client retries every request with back-off (about 47 s for one open_clip
tag) before it gives up. ``download`` therefore decides first whether the weights' host can be reached:
if the hub is already in offline mode (``HF_HUB_OFFLINE=1``) or a 3-second connection attempt fails,
the download runs with the hub's own offline switch on, so weights already in the cache still load
and missing ones fail at once; either way a failure becomes one error saying how to pass a local file.
"""
from __future__ import annotations

import contextlib
import os
import socket
from typing import Callable, TypeVar
from urllib.parse import urlparse

from huggingface_hub import constants as hub_constants

T = TypeVar("T")
CONNECT_TIMEOUT_S = 3.0


def hub_host() -> str:
    """The Hugging Face hub's host name (``HF_ENDPOINT`` if set)."""
    return urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname


def reachable(host: str, timeout: float = CONNECT_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``host``:443 opens within ``timeout`` seconds."""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def hub_offline_mode():
    """Turn on the hub client's offline switch (``huggingface_hub.constants.HF_HUB_OFFLINE``) for a block."""
    previous = hub_constants.HF_HUB_OFFLINE
    hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = previous


def download(fetch: Callable[[], T], *, host: str, what: str, remedy: str) -> T:
    """``fetch()``, run in the hub's offline mode when ``host`` cannot be reached.

    Any failure is raised as ``RuntimeError("cannot get pretrained weights {what}: {reason}. {remedy}")``.
    """
    if hub_constants.is_offline_mode():
        offline = "the hub is in offline mode (HF_HUB_OFFLINE) and the weights are not in its cache"
    elif not reachable(host):
        offline = f"{host} is unreachable (offline)"
    else:
        offline = None
    try:
        with hub_offline_mode() if offline else contextlib.nullcontext():
            return fetch()
    except Exception as error:  # noqa: BLE001 - every download failure gets the same actionable message
        reason = offline or f"download failed: {type(error).__name__}: {error}"
        raise RuntimeError(f"cannot get pretrained weights {what}: {reason}. {remedy}") from error
