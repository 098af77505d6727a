"""Offline failure: seconds until a pretrained tag / pretrained VFM that cannot be downloaded gives its error.

Run it on a machine without network access (or with the weights' host blocked) and an empty hub cache.
It times ``denserc.create_model(MODEL, pretrained=TAG)`` and ``VFM(VFM_NAME)``, which fail through
``denserc.models.hub.download``, and with ``--hub-retries`` also open_clip's own download of the tag (the
Hugging Face hub client's retries, what DenseRC avoids; about 47 s here).

    HF_HOME=/tmp/empty-hf-cache python -m benchmarks.offline_failure --hub-retries
"""
from __future__ import annotations

import argparse
import time

import open_clip
import torch

from denserc import create_model
from denserc.train.vfm import DEFAULT_VFM, VFM

from .common import environment, markdown_table


def seconds_to_fail(call) -> tuple[float, str]:
    """(seconds, first line of the error) of a call that is expected to raise."""
    start = time.monotonic()
    try:
        call()
    except Exception as error:  # noqa: BLE001 - the failure is what is measured
        return time.monotonic() - start, f"{type(error).__name__}: {str(error).splitlines()[0][:110]}"
    raise SystemExit("the call succeeded: the weights were downloaded or cached; run offline with an empty cache")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--tag", default="openai")
    parser.add_argument("--vfm", default=DEFAULT_VFM)
    parser.add_argument("--hub-retries", action="store_true",
                        help="also time open_clip.download_pretrained without DenseRC's offline check")
    args = parser.parse_args()
    calls = {f"denserc.create_model({args.model!r}, pretrained={args.tag!r})":
             lambda: create_model(args.model, pretrained=args.tag),
             f"VFM({args.vfm!r})": lambda: VFM(args.vfm)}
    if args.hub_retries:
        calls[f"open_clip.download_pretrained({args.model}:{args.tag})"] = lambda: open_clip.download_pretrained(
            open_clip.get_pretrained_cfg(args.model, args.tag))
    rows = []
    for label, call in calls.items():
        seconds, error = seconds_to_fail(call)
        rows.append((f"`{label}`", f"{seconds:.2f}", error))
    print("## Offline failure\n")
    print("\n".join(environment(torch.device("cpu"))) + "\n")
    print(markdown_table(["call", "seconds to the error", "error"], rows))


if __name__ == "__main__":
    main()
