"""Converting the peers' CLIP checkpoints into DenseRC model folders (``denserc convert``).

Two layouts are read, every tensor is written unchanged (float16/bfloat16 widen to float32, which is exact):

- **EVA-CLIP**, BAAI's EVA-CLIP code as CLIPSelf and DeCLIP vendor it (``wusize/CLIPSelf`` and
  ``xiaomoguhz/DeCLIP``, ``src/open_clip/eva_clip/``: ``CustomCLIP`` with ``visual`` an
  ``EVAVisionTransformer`` and ``text`` a ``TextTransformer``). Their training writes
  ``{"epoch", "name", "state_dict", "optimizer"[, "scaler"]}`` (``src/training/main.py``). The image tower
  maps onto open_clip's ``EVA02-*`` models (``TimmModel`` over timm's ``Eva``) with timm's own
  ``timm.models.eva.checkpoint_filter_fn``: ``attn.q_bias``/``attn.v_bias`` become the biases of
  ``q_proj``/``v_proj`` (EVA-CLIP's key projection has no bias, nor has timm's), ``attn.inner_attn_ln`` ->
  ``attn.norm``, SwiGLU ``mlp.w1``/``w2``/``w3``/``ffn_ln`` -> ``mlp.fc1_g``/``fc1_x``/``fc2``/``norm``, and
  the RoPE tables (``visual.rope.*``, ``visual.blocks.N.attn.rope.*``), which timm recomputes, are dropped;
  everything lands under ``visual.trunk.``. The text tower and ``logit_scale`` have open_clip's names already
  (``text.transformer.resblocks.N.*``, ``text.token_embedding``, ...); its causal mask buffer
  ``text.attn_mask``, if a checkpoint carries it, is dropped (open_clip builds it).
- **open_clip**: any checkpoint of an open_clip model, bare, ``module.``-prefixed (DDP) or wrapped in
  ``{"state_dict": ...}`` as open_clip's training writes it.

The folder records the dense path the peer evaluates its model with (``peers.PEERS``), so the commands that
take a model folder (``denserc eval``, ``denserc catseg``, ``denserc detect``) run the peer's path on it.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from open_clip.model import set_model_preprocess_cfg
from safetensors.torch import load_file

from .factory import (_quiet_random_init, _refuse_quick_gelu_release_without_quick_gelu, _weights_preprocess_cfg,
                      create_model, model_config)
from .peers import dense_settings
from .serialization import save_model

EVA_CLIP = "EVA-CLIP"
OPEN_CLIP = "open_clip"
# Wrappers around the weights, outermost first: open_clip's and the peers' training (`state_dict`), EVA-CLIP's
# loader (`model|module|state_dict`, CLIPSelf `src/open_clip/eva_clip/factory.py`, `load_state_dict`).
WRAPPER_KEYS = ("state_dict", "model", "module")
DDP_PREFIX = "module."


@dataclass
class Conversion:
    """What ``convert_checkpoint`` wrote."""

    directory: Path
    layout: str  # EVA_CLIP or OPEN_CLIP
    settings: dict  # construction, gating, num_layers recorded in the folder
    tensors: int  # tensors written to the CLIP weights file
    dropped: list[str]  # checkpoint keys not written (RoPE tables, the text causal mask)


def convert_checkpoint(checkpoint: str | os.PathLike, output_dir: str | os.PathLike, model_name: str, *,
                       peer: str | None = None, construction: str | None = None, gating: str | None = None,
                       num_layers: int | None = None) -> Conversion:
    """Write ``checkpoint`` (EVA-CLIP or open_clip layout, read with ``weights_only``) as a DenseRC model
    folder of the open_clip model ``model_name``, loadable by ``denserc.load`` and open_clip's
    ``create_model("local-dir:...")``.

    ``peer`` ("clipself") records that peer's dense path; otherwise ``construction`` (required), ``gating``
    (default "none") and ``num_layers`` do. A checkpoint that does not fit the model is refused with one line
    naming its missing, unexpected and misshapen keys.
    """
    settings = dense_settings(peer, construction, gating, num_layers)
    output_dir = Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise FileExistsError(f"{output_dir} exists and is not an empty folder; choose a new OUTPUT_DIR")
    model_cfg = model_config(model_name)
    if model_cfg is None:
        raise ValueError(f"unknown open_clip model '{model_name}' (see open_clip.list_models()); for the peers' "
                         "EVA-CLIP checkpoints use EVA02-B-16, EVA02-L-14 or EVA02-L-14-336")
    state = read_checkpoint(checkpoint)
    layout = checkpoint_layout(state)
    _refuse_quick_gelu_release_without_quick_gelu(model_name, model_cfg, str(checkpoint))
    with _quiet_random_init():
        model = create_model(model_name, **settings)
    source = f"{checkpoint} ({layout} layout, for {model_name})"
    converted = eva_clip_to_open_clip(state, model.clip, source) if layout == EVA_CLIP else dict(state)
    check_state(model.clip.state_dict(), converted, source, names=_checkpoint_names(state))
    model.clip.load_state_dict(converted, strict=True)
    model.preprocess_cfg = _weights_preprocess_cfg(model.clip, model_name, None)
    set_model_preprocess_cfg(model.clip, model.preprocess_cfg)
    save_model(model, output_dir)
    used = {id(tensor) for tensor in converted.values()}
    dropped = [key for key, tensor in state.items() if id(tensor) not in used]
    return Conversion(output_dir, layout, {k: model.config[k] for k in ("construction", "gating", "num_layers")},
                      len(converted), dropped)


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The weights of a ``.safetensors`` or torch checkpoint (``weights_only``), unwrapped and without ``module.``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        checkpoint = load_file(path)
    else:
        checkpoint = _torch_load(path)
    state = checkpoint
    while isinstance(state, dict) and not _is_state_dict(state):
        inner = next((key for key in WRAPPER_KEYS if isinstance(state.get(key), dict)), None)
        if inner is None:
            break
        state = state[inner]
    if not isinstance(state, dict) or not _is_state_dict(state):
        found = sorted(map(str, state))[:8] if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path} holds no state dict of tensors (looked inside {'/'.join(WRAPPER_KEYS)}); "
                         f"found {found}")
    if all(key.startswith(DDP_PREFIX) for key in state):
        state = {key[len(DDP_PREFIX):]: tensor for key, tensor in state.items()}
    return state


def checkpoint_layout(state: dict[str, torch.Tensor]) -> str:
    """EVA_CLIP for BAAI's EVA-CLIP image tower (``visual.blocks.N``, no ``visual.trunk``), else OPEN_CLIP."""
    return EVA_CLIP if any(key.startswith("visual.blocks.") for key in state) else OPEN_CLIP


def eva_clip_to_open_clip(state: dict[str, torch.Tensor], clip: torch.nn.Module, source: str) -> dict:
    """EVA-CLIP names -> open_clip ``EVA02-*`` names (module docstring), every tensor object passed through."""
    from timm.models.eva import Eva, checkpoint_filter_fn
    trunk = getattr(clip.visual, "trunk", None)
    if not isinstance(trunk, Eva):
        raise ValueError(f"{source}: an EVA-CLIP checkpoint converts to an open_clip EVA-02 model (TimmModel over "
                         "timm's Eva), e.g. --model EVA02-B-16, EVA02-L-14 or EVA02-L-14-336")
    visual = {key: tensor for key, tensor in state.items() if key.startswith("visual.")}
    mapped = checkpoint_filter_fn(visual, trunk)
    names = _checkpoint_names(visual)
    for key, tensor in mapped.items():
        if id(tensor) not in names:  # the filter resamples a position or patch embedding of another grid
            original = f"visual.{key}"
            expected = trunk.state_dict()[key]
            raise ValueError(f"{source}: {original} has shape {tuple(visual[original].shape)} but the model "
                             f"expects {tuple(expected.shape)}; is it a checkpoint of a different model?")
    converted = {f"visual.trunk.{key}": tensor for key, tensor in mapped.items()}
    converted.update({key: tensor for key, tensor in state.items()
                      if not key.startswith("visual.") and key != "text.attn_mask"})
    if "logit_scale" not in converted and "text.logit_scale" in converted:
        # some EVA-CLIP releases keep it in the text tower (CLIPSelf src/open_clip/eva_clip/factory.py, load_checkpoint)
        converted["logit_scale"] = converted.pop("text.logit_scale")
    return converted


def check_state(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], source: str, *,
                names: dict[int, str] | None = None, shown: int = 3) -> None:
    """Refuse, in one line, a state dict whose keys or shapes differ from ``expected`` (a module's state dict).

    Missing keys are named as the model names them; unexpected and misshapen ones as the checkpoint does
    (``names``: tensor id -> checkpoint key, where the keys were renamed).
    """
    names = names or {}

    def original(key: str) -> str:
        return names.get(id(state[key]), key)

    missing = sorted(set(expected) - set(state), key=_natural)
    unexpected = sorted((original(key) for key in set(state) - set(expected)), key=_natural)
    misshapen = [f"{original(key)} {tuple(state[key].shape)} (expected {tuple(expected[key].shape)})"
                 for key in sorted(set(state) & set(expected), key=_natural)
                 if tuple(state[key].shape) != tuple(expected[key].shape)]
    problems = [f"{len(found)} {what} ({_first(found, shown)})"
                for what, found in (("missing keys", missing), ("unexpected keys", unexpected),
                                    ("keys of another shape", misshapen)) if found]
    if problems:
        raise ValueError(f"{source} does not fit the model: {'; '.join(problems)}; is it a checkpoint of a "
                         "different model, or a partial one?")


# ---------------------------------------------------------------------------------- internals
def _torch_load(path: Path):
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # the legacy (non-zip) format
    except Exception as error:  # noqa: BLE001  (pickle and zip errors come in many types)
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{path} is not a checkpoint torch.load can read with weights_only=True: {reason}") from error


def _is_state_dict(value: dict) -> bool:
    return bool(value) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def _checkpoint_names(state: dict[str, torch.Tensor]) -> dict[int, str]:
    return {id(tensor): key for key, tensor in state.items()}


def _natural(key: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def _first(items: list[str], shown: int) -> str:
    more = f", and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more
