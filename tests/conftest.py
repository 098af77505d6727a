"""Shared fixtures: tiny random open_clip models (bundled config "ViT-Tiny-16"), no network."""
import logging

import pytest
import torch

import denserc

TINY = "ViT-Tiny-16"

# open_clip warns at every random-weight creation; the tests create many on purpose.
logging.getLogger().setLevel(logging.ERROR)


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter non-trivial random values (LayerNorms and zero-init gates included)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return module


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return denserc.create_model(TINY).eval()


@pytest.fixture
def images():
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
