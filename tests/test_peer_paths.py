"""Parity: a plain CLIP given to F-ViT or CAT-Seg runs the peer's own computation (DESIGN.md 2.0.1).

Each peer computation is written here anew from the cited lines, on the towers' own modules, and compared
with ours on random weights:

- CLIPSelf F-ViT backbone, ``F-ViT/models/evaclip_vit.py`` ``EvaCLIPViT.forward`` (L61-110): every block but
  the last runs as it is, tapped at ``out_indices``; the last runs ``forward_without_attn``
  (``src/open_clip/eva_clip/eva_vit_model.py`` L249-256 ``proj_without_attn``, L317-333; for open_clip ViTs
  ``src/open_clip/transformer.py`` L248-260) and is the last tap; the CLIP region features are
  ``normalize(head(norm(x[:, 1:])))`` of its output.
- CAT-Seg, ``cat_seg/third_party/model_vpt.py`` ``ResidualAttentionBlock.forward_dense`` (L210-231): the value
  path through ``out_proj`` plus the class token of the block input (``x[:1]``), then the MLP residual;
  ``VisualTransformer.forward`` (L279-303): ``ln_post`` and ``proj`` on every token; position embeddings
  resized by ``resized_pos_embed`` (L306-319).
"""
import pytest
import torch
import torch.nn.functional as F

import denserc
from denserc.catseg.config import load_config as load_catseg_config
from denserc.detect.config import load_detect_config
from denserc.detect.detector import build_tower
from denserc.models import PEER_PATHS
from denserc.engine.shipped import available_configs
from denserc.train.shipped import CONFIG_DIR as TRAINING_CONFIGS

from helpers import TINY, randomize_

EVA = "EVA02-Tiny-16"
SIGLIP = "ViT-Tiny-16-MAP"


def _plain(name: str, task: str) -> denserc.DenseRCModel:
    torch.manual_seed(0)
    return randomize_(denserc.create_model(name, **PEER_PATHS[task])).eval()


# --------------------------------------------------------------------------------- the peers, written anew
def _openai_tokens(visual, images):
    """open_clip VisionTransformer stem with CAT-Seg's ``resized_pos_embed`` (bicubic, class position kept)."""
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    side = images.shape[-1] // visual.patch_size[0]
    pos = visual.positional_embedding
    native = int((pos.shape[0] - 1) ** 0.5)
    grid = pos[1:].reshape(1, native, native, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False)
    pos = torch.cat([pos[:1], grid[0].flatten(1).T])
    cls = visual.class_embedding.expand(x.shape[0], 1, -1)
    return visual.ln_pre(torch.cat([cls, x], dim=1) + pos)


def _eva_tokens(trunk, images):
    """timm Eva's own stem at the native size and its RoPE table."""
    x, rope = trunk._pos_embed(trunk.patch_embed(images))
    return trunk.norm_pre(x), rope


def _clipself_forward_without_attn(block, x):
    """CLIPSelf's ``Block.forward_without_attn`` (pre-norm branch) on EVA modules, or
    ``ResidualAttentionBlockV2.forward_without_attn`` on open_clip ones. timm's EVA keeps EVA-CLIP's
    ``v_proj.weight`` and ``v_bias`` as the ``v_proj`` Linear's weight and bias."""
    if hasattr(block, "ln_1"):
        attn = block.attn
        value = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)[..., -attn.embed_dim:]
        x = x + block.ls_1(F.linear(value, attn.out_proj.weight, attn.out_proj.bias))
        return x + block.ls_2(block.mlp(block.ln_2(x)))
    attn = block.attn
    value = attn.proj(attn.norm(attn.v_proj(block.norm1(x))))
    x = x + (value if block.gamma_1 is None else block.gamma_1 * value)
    mlp = block.mlp(block.norm2(x))
    return x + (mlp if block.gamma_2 is None else block.gamma_2 * mlp)


def _clipself_fvit_backbone(model, images, out_indices):
    """EvaCLIPViT.forward: (tapped maps, normalised CLIP feature map)."""
    visual = model.visual
    side = images.shape[-1] // model.patch_size
    if hasattr(visual, "trunk"):
        x, rope = _eva_tokens(visual.trunk, images)
        blocks = list(visual.trunk.blocks)
        run = (lambda block, t: block(t, rope=rope))
        norm_head = (lambda t: visual.trunk.head(visual.trunk.norm(t)))
    else:
        x = _openai_tokens(visual, images)
        blocks = list(visual.transformer.resblocks)
        run = (lambda block, t: block(t))
        norm_head = (lambda t: visual.ln_post(t) @ visual.proj)

    def expand(t):
        return t[:, 1:].transpose(1, 2).reshape(t.shape[0], -1, side, side)

    outs = []
    for i, block in enumerate(blocks[:-1]):
        x = run(block, x)
        if i in out_indices:
            outs.append(expand(x))
    x = _clipself_forward_without_attn(blocks[-1], x)
    if len(blocks) - 1 in out_indices:
        outs.append(expand(x))
    features = F.normalize(norm_head(x[:, 1:]), dim=-1)
    return outs, features.transpose(1, 2).reshape(x.shape[0], -1, side, side)


def _catseg_forward_dense(block, x):
    """CAT-Seg's ``forward_dense`` on open_clip modules (batch-first here; L225's ``x[:1]`` is the class token)."""
    attn = block.attn
    y = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
    value = F.linear(y[..., 2 * attn.embed_dim:], attn.out_proj.weight, attn.out_proj.bias)
    value = value + x[:, :1]
    return value + block.mlp(block.ln_2(value))


def _catseg_dense(model, images):
    visual = model.visual
    x = _openai_tokens(visual, images)
    blocks = list(visual.transformer.resblocks)
    for block in blocks[:-1]:
        x = block(x)
    x = _catseg_forward_dense(blocks[-1], x)
    side = images.shape[-1] // model.patch_size
    dense = visual.ln_post(x[:, 1:]) @ visual.proj
    return dense.transpose(1, 2).reshape(x.shape[0], -1, side, side)


def _catseg_eva_dense(model, images):
    """The EVA form of CAT-Seg's last block (DeCLIP's CAT-Seg branch runs CAT-Seg on EVA-CLIP): EVA's value
    path (``proj_without_attn``) plus the class token's residual, then the MLP residual, the trunk's norm and
    head."""
    trunk = model.visual.trunk
    x, rope = _eva_tokens(trunk, images)
    for block in trunk.blocks[:-1]:
        x = block(x, rope=rope)
    block = trunk.blocks[-1]
    attn = block.attn
    value = attn.proj(attn.norm(attn.v_proj(block.norm1(x))))
    y = x[:, :1] + (value if block.gamma_1 is None else block.gamma_1 * value)
    mlp = block.mlp(block.norm2(y))
    y = y + (mlp if block.gamma_2 is None else block.gamma_2 * mlp)
    side = images.shape[-1] // model.patch_size
    dense = trunk.head(trunk.norm(y[:, 1:]))
    return dense.transpose(1, 2).reshape(x.shape[0], -1, side, side)


# ------------------------------------------------------------------------------------------------- F-ViT
@pytest.mark.parametrize("name,size", [(TINY, 224), (TINY, 320), (EVA, 224)])
def test_plain_clip_in_fvit_runs_clipselfs_backbone(name, size):
    model = _plain(name, "F-ViT")
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    taps = [0, 1, 2, 3]  # the last block included: it is the value-path block
    with torch.no_grad():
        dense, maps = model.encode_dense_with_taps(images, taps)
        expected_maps, expected_features = _clipself_fvit_backbone(model, images, taps)
    for ours, theirs in zip(maps, expected_maps):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(F.normalize(dense, dim=1), expected_features, rtol=1e-5, atol=1e-5)


def test_detection_builds_clipselfs_path_for_a_plain_clip_and_a_folder_as_trained(tmp_path):
    config = load_detect_config("fvit_b16_ovcoco", [f"backbone.model={TINY}"])
    tower = build_tower(config)
    assert (tower.construction, tower.gating, tower.gate) == ("x+v", "none", None)
    torch.manual_seed(0)
    denserc.create_model(TINY, construction="multi-v", gating="hsg", num_layers=2).save(tmp_path / "denserc")
    folder = build_tower(load_detect_config("fvit_b16_ovcoco", [f"backbone.model={tmp_path / 'denserc'}"]))
    assert (folder.construction, folder.gating, folder.num_layers) == ("multi-v", "hsg", 2)
    chosen = build_tower(load_detect_config("fvit_b16_ovcoco", [f"backbone.model={TINY}",
                                                                 "backbone.construction=multi-v"]))
    assert (chosen.construction, chosen.gating) == ("multi-v", "hsg")


# ----------------------------------------------------------------------------------------------- CAT-Seg
def test_plain_clip_in_catseg_runs_catsegs_forward_dense_at_384():
    model = _plain(TINY, "CAT-Seg")
    images = torch.randn(2, 3, 384, 384, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model.encode_dense(images), _catseg_dense(model, images), rtol=1e-5, atol=1e-5)
        # it is not CLIPSelf's x+v: the patch's own residual is replaced by the class token's
        xv = denserc.DenseRCModel(model.clip, model_name=TINY, model_cfg=model.model_cfg,
                                  preprocess_cfg=model.preprocess_cfg, construction="x+v", gating="none")
        assert (xv.encode_dense(images) - model.encode_dense(images)).abs().max() > 1e-2


def test_plain_eva_in_catseg_runs_the_eva_form_of_catsegs_last_block():
    model = _plain(EVA, "CAT-Seg")
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model.encode_dense(images), _catseg_eva_dense(model, images), rtol=1e-5, atol=1e-5)


def test_cls_plus_v_is_refused_for_a_tower_without_class_token():
    with pytest.raises(ValueError, match="no class token; use 'x\\+v' or 'v'"):
        denserc.create_model(SIGLIP, construction="cls+v", gating="none")


# ------------------------------------------------------------------------------------- the EVA-02 configs
@pytest.mark.parametrize("name,base,trained_by", [
    ("fvit_eva02_b16_ovcoco", "fvit_b16_ovcoco", "eva02_b16_coco"),
    ("fvit_eva02_l14_ovcoco", "fvit_l14_ovcoco", "eva02_l14_coco"),
    ("fvit_eva02_b16_ovlvis", "fvit_b16_ovlvis", "eva02_b16_coco"),
    ("fvit_eva02_l14_ovlvis", "fvit_l14_ovlvis", "eva02_l14_coco")])
def test_eva_detection_configs_are_clipselfs_settings_on_the_eva_distillation_output(name, base, trained_by):
    eva, reference = load_detect_config(name), load_detect_config(base)
    assert eva.backbone.model == f"runs/{trained_by}/final"
    assert eva.detector == reference.detector and eva.data == reference.data and eva.optim == reference.optim
    assert trained_by in available_configs(TRAINING_CONFIGS)


@pytest.mark.parametrize("name,base,trained_by", [("catseg_eva02_b16", "catseg_vitb16", "eva02_b16_coco"),
                                                  ("catseg_eva02_l14", "catseg_vitl14", "eva02_l14_coco")])
def test_eva_catseg_configs_are_catsegs_settings_on_the_eva_distillation_output(name, base, trained_by):
    eva, reference = (load_catseg_config(n, ["data.root=/data/coco-stuff"]) for n in (name, base))
    assert eva.clip.model == f"runs/{trained_by}/final"
    assert (eva.head, eva.clip_resolution, eva.optim) == (reference.head, reference.clip_resolution, reference.optim)
