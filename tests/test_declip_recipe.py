"""DeCLIP's recipe (the paper's dual-stream baseline) against DeCLIP's own computation, written anew from
xiaomoguhz/DeCLIP src/open_clip/eva_clip/eva_vit_model.py (``encode_dense`` L662-707, ``Attention.ss_attn``
L257-315, ``Block.forward_without_rcffn`` L394-405) and src/training/declip.py (``DeCLIP.__call__``,
``get_student_context_similarity``), on random weights."""
import pytest
import torch
import torch.nn.functional as F

import denserc
from denserc.losses import coherence_loss, semantics_loss
from denserc.train import load_config, setup_distributed
from denserc.train.trainer import DistillationModule

from helpers import distillation_engine, randomize_

EVA = "EVA02-Tiny-16"


def _declip_encode_dense(model, images):
    """(content map (B, E, h, w), context (B, N, H * d)) as DeCLIP's EVA ``encode_dense(mode="qq_vfm_distill")``."""
    trunk = model.visual.trunk
    x, rope = trunk._pos_embed(trunk.patch_embed(images))
    x = trunk.norm_pre(x)
    for block in trunk.blocks[:-1]:
        x = block(x, rope=rope)
    block = trunk.blocks[-1]
    attn = block.attn
    u = block.norm1(x)
    batch, tokens, width = u.shape
    heads = attn.num_heads

    def per_head(t):  # (B, N, C) -> (B * heads, N, d), as ss_attn L263-268
        return t.reshape(batch, tokens, heads, -1).permute(0, 2, 1, 3).reshape(batch * heads, tokens, -1)
    q, v = per_head(attn.q_proj(u)), per_head(attn.v_proj(u))  # timm keeps q_bias/v_bias in the Linears
    weights = F.softmax(torch.bmm(q, q.transpose(1, 2)), dim=-1)  # L277-279: no scale, no RoPE
    out = torch.bmm(weights, v).transpose(0, 1).reshape(tokens, batch, width).transpose(0, 1)
    out = attn.proj(attn.norm(out))
    x = out if block.gamma_1 is None else block.gamma_1 * out  # forward_without_rcffn: no residual, no FFN
    side = images.shape[-1] // model.patch_size
    content = trunk.head(trunk.norm(x[:, 1:])).transpose(1, 2).reshape(batch, -1, side, side)
    context = q[:, 1:].transpose(0, 1).reshape(tokens - 1, batch, -1).transpose(0, 1)  # declip.py L66-67
    return content, context


@pytest.fixture
def declip_model():
    torch.manual_seed(0)
    return randomize_(denserc.create_model(EVA, construction="v", gating="declip")).eval()


def test_content_and_context_streams_are_declips(declip_model):
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense, queries = declip_model.encode_dense_with_queries(images)
        content, context = _declip_encode_dense(declip_model, images)
    torch.testing.assert_close(dense, content, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(queries.flatten(2).transpose(1, 2), context, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dense, declip_model.encode_dense(images), rtol=0, atol=0)


def test_declip_gating_differs_from_our_scaled_qq(declip_model):
    qq = denserc.DenseRCModel(declip_model.clip, model_name=EVA, model_cfg=declip_model.model_cfg,
                              preprocess_cfg=declip_model.preprocess_cfg, construction="v", gating="qq")
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (qq.encode_dense(images) - declip_model.encode_dense(images)).abs().max() > 1e-3


def test_two_streams_correlate_the_queries_and_pool_the_content(declip_model):
    """DeCLIP.__call__: loss_content on RoI-pooled content features, loss_context on the queries' correlation."""
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    boxes = [torch.tensor([[0.0, 0, 112, 112], [16, 16, 224, 160]]), torch.tensor([[32.0, 0, 224, 224]])]
    generator = torch.Generator().manual_seed(4)
    teacher = F.normalize(torch.randn(3, declip_model.embed_dim, generator=generator), dim=-1)
    vfm = torch.randn(2, 196, 24, generator=generator)
    losses = DistillationModule(declip_model, 0.1, coherence_features="queries")(images, boxes, teacher, vfm)
    with torch.no_grad():
        content, context = _declip_encode_dense(declip_model, images)
    expected_context = coherence_loss(context, vfm)
    torch.testing.assert_close(losses["loss_coherence"], expected_context, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["loss_semantics"], semantics_loss(content, boxes, teacher, 16), rtol=1e-5,
                               atol=1e-6)
    torch.testing.assert_close(losses["loss"], losses["loss_semantics"] + 0.1 * expected_context)
    one_stream = DistillationModule(declip_model, 0.1)(images, boxes, teacher, vfm)
    assert abs(one_stream["loss_coherence"] - losses["loss_coherence"]) > 1e-4


def test_the_declip_config_is_declips_recipe():
    config = load_config("declip_eva02_b16_coco")
    assert (config.model.name, config.model.construction, config.model.gating, config.model.num_layers) == (
        "EVA02-B-16", "v", "declip", 1)
    assert (config.loss.coherence_weight, config.loss.coherence_features, config.loss.coherence_form) == (
        0.1, "queries", "declip")
    assert (config.vfm.name, config.data.image_size, config.export.alpha) == (
        "vit_base_patch14_reg4_dinov2", 560, 0.7)
    assert (config.optim.lr, config.optim.weight_decay, config.optim.warmup_steps, config.train.epochs,
            config.train.global_batch_size) == (1e-5, 0.1, 1000, 6, 16)


TESTBED = ["model.name=ViT-Testbed-P8", "model.pretrained=testbed", "model.unlocked_blocks=null", "vfm.name=testbed_appearance",
           "vfm.pretrained=false", "data.type=testbed", "data.num_images=4", "data.image_size=64",
           "data.num_workers=0", "train.global_batch_size=2", "train.batch_size=2", "train.precision=fp32",
           "train.device=cpu", "train.epochs=1", "optim.warmup_steps=0", "train.log_every=1"]


def test_declip_recipe_trains_on_the_testbed_and_freezes_what_no_stream_reaches(tmp_path):
    trainer = distillation_engine(load_config("declip_eva02_b16_coco", TESTBED), setup_distributed("cpu"), tmp_path / "run")
    last = len(trainer.task.student.tower.blocks) - 1
    assert all(f"blocks.{last}.mlp" in name or f"blocks.{last}.ln_2" in name for name in trainer.task.frozen_off_path)
    assert trainer.task.frozen_off_path  # the last block's MLP: DeCLIP's freeze list (src/training/utils.py)
    before = {n: p.detach().clone() for n, p in trainer.task.student.named_parameters() if p.requires_grad}
    final = trainer.fit()
    assert denserc.load(final).config == {"model_name": "ViT-Testbed-P8", "construction": "v", "gating": "declip",
                                          "num_layers": 1}
    moved = [n for n, p in trainer.task.student.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert any(".attn.in_proj_weight" in n and f"resblocks.{last}." in n for n in moved)
