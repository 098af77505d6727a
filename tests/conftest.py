"""Shared fixtures: tiny random open_clip models (bundled config "ViT-Tiny-16"), no network."""
import logging
import os

import pytest
import torch

import denserc

from helpers import TINY

# open_clip warns at every random-weight creation; the tests create many on purpose.
logging.getLogger().setLevel(logging.ERROR)


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return denserc.create_model(TINY).eval()


@pytest.fixture
def images():
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))


@pytest.fixture(autouse=True, scope="session")
def text_embedding_cache(tmp_path_factory):
    """The text embeddings tests compute (``denserc.detect`` caches every vocabulary's) go to a temporary
    folder, never to the user's ``~/.cache/denserc``."""
    previous = os.environ.get("DENSERC_CACHE")
    os.environ["DENSERC_CACHE"] = str(tmp_path_factory.mktemp("denserc_cache"))
    yield
    if previous is None:
        del os.environ["DENSERC_CACHE"]
    else:
        os.environ["DENSERC_CACHE"] = previous
