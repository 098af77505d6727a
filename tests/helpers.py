"""What tests share besides fixtures: the tiny model's name and ways to give a model non-trivial weights.

Imported as ``from helpers import ...`` (pytest puts tests/ on the path); fixtures stay in conftest.py.
"""
import torch

import denserc

TINY = "ViT-Tiny-16"


def isolate_open_clip_configs(monkeypatch) -> None:
    """open_clip's model-config registry as a copy for this test: configs a test adds do not outlive it."""
    import open_clip.factory
    monkeypatch.setattr(open_clip.factory, "_MODEL_CONFIG_PATHS", list(open_clip.factory._MODEL_CONFIG_PATHS))
    monkeypatch.setattr(open_clip.factory, "_MODEL_CONFIGS", dict(open_clip.factory._MODEL_CONFIGS))


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter non-trivial random values (LayerNorms and zero-init gates included)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return module


def variant(model, **settings):
    """Same weights, another construction/gating (a gate, if any, random so that it is not uniform)."""
    other = denserc.DenseRCModel(model.clip, model_name=model.model_name, model_cfg=model.model_cfg,
                                 preprocess_cfg=model.preprocess_cfg, **settings).eval()
    if other.gate is not None:
        randomize_(other.gate, seed=3)
    return other


def distillation_engine(config, env, output_dir):
    """The engine running the distillation task of ``config`` (what ``denserc train`` runs)."""
    from denserc.engine.loop import Engine
    from denserc.train.trainer import DistillationTask
    return Engine(DistillationTask(config, env), config, env, output_dir)
