"""The dense construction, checked against open_clip and against formulas computed in the test."""
import pytest
import torch
import torch.nn.functional as F

import open_clip

import denserc
from denserc.models import HeadSelectionGate
from denserc.models.dense import DenseRCModel

from helpers import TINY, variant


def block_inputs(model: DenseRCModel, images: torch.Tensor) -> list[torch.Tensor]:
    """The residual stream entering every image block, captured from a plain open_clip forward."""
    captured = []
    hooks = [blk.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
             for blk in model.visual.transformer.resblocks]
    try:
        model.clip.encode_image(images)
    finally:
        for hook in hooks:
            hook.remove()
    return captured


def per_head_outputs(block, x: torch.Tensor) -> torch.Tensor:
    """o_h = v_h @ W_o[:, h]^T for every head, from in_proj rows [2D:3D] (docs/method.md#extraction): (B, N, H, D)."""
    width = x.shape[-1]
    heads = block.attn.num_heads
    d = width // heads
    u = block.ln_1(x)
    w_v = block.attn.in_proj_weight[2 * width:]
    b_v = block.attn.in_proj_bias[2 * width:]
    w_o = block.attn.out_proj.weight
    outs = []
    for h in range(heads):
        v_h = u @ w_v[h * d:(h + 1) * d].T + b_v[h * d:(h + 1) * d]
        outs.append(v_h @ w_o[:, h * d:(h + 1) * d].T)
    return torch.stack(outs, dim=2)


def head_attention(block, x: torch.Tensor, keys_from: str) -> torch.Tensor:
    """Per-head softmax(q k^T / sqrt d) (or q q^T) v for all tokens, through out_proj: (B, N, D)."""
    width = x.shape[-1]
    heads = block.attn.num_heads
    d = width // heads
    u = block.ln_1(x)
    q, k, v = (u @ block.attn.in_proj_weight.T + block.attn.in_proj_bias).split(width, dim=-1)
    keys = k if keys_from == "k" else q
    outs = []
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        weights = torch.softmax(q[..., sl] @ keys[..., sl].transpose(1, 2) / d ** 0.5, dim=-1)
        outs.append(weights @ v[..., sl])
    return torch.cat(outs, dim=-1) @ block.attn.out_proj.weight.T + block.attn.out_proj.bias


def to_grid(tokens: torch.Tensor, model: DenseRCModel, h: int = 14, w: int = 14) -> torch.Tensor:
    """(B, N, D) patch tokens -> proj(ln_post(.)) as (B, E, h, w)."""
    y = model.visual.ln_post(tokens) @ model.visual.proj
    return y.transpose(1, 2).reshape(y.shape[0], -1, h, w)



def test_encode_image_equals_open_clip_at_native_size(tiny_model, images):
    reference = open_clip.create_model(TINY)
    reference.load_state_dict(tiny_model.clip.state_dict())
    reference.eval()
    assert torch.equal(tiny_model.encode_image(images), reference.encode_image(images))
    assert torch.equal(tiny_model.encode_image(images, normalize=True),
                       reference.encode_image(images, normalize=True))


def peers_rescaled_positional_embedding(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """CLIPSelf's ``VisionTransformer.rescale_positional_embedding`` (src/open_clip/transformer.py) written
    out: the class row kept, the patch rows bicubically interpolated, align_corners=False, no antialiasing."""
    native = int((pos.shape[0] - 1) ** 0.5)
    patches = pos[1:].T.reshape(1, -1, native, native)
    patches = F.interpolate(patches, (grid, grid), mode="bicubic", align_corners=False).reshape(pos.shape[1], -1)
    return torch.cat([pos[:1], patches.T])


def test_encode_image_at_448_equals_open_clip_with_the_peers_position_embedding(tiny_model):
    images = torch.randn(1, 3, 448, 448)
    reference = open_clip.create_model(TINY, force_image_size=448)
    state = dict(tiny_model.clip.state_dict())
    state["visual.positional_embedding"] = peers_rescaled_positional_embedding(
        state["visual.positional_embedding"], 448 // tiny_model.patch_size)
    reference.load_state_dict(state)
    reference.eval()
    torch.testing.assert_close(tiny_model.encode_image(images), reference.encode_image(images),
                               rtol=1e-5, atol=1e-5)
    antialiased = dict(tiny_model.clip.state_dict())
    open_clip.model.resize_pos_embed(antialiased, reference)  # open_clip's own resampling antialiases
    assert not torch.allclose(antialiased["visual.positional_embedding"], state["visual.positional_embedding"],
                              rtol=1e-3, atol=1e-4)


def test_encode_text_equals_open_clip(tiny_model):
    tokens = denserc.get_tokenizer(TINY)(["a photo of a dog", "grass"])
    assert torch.equal(tiny_model.encode_text(tokens), tiny_model.clip.encode_text(tokens))


def test_per_head_values_reproduce_every_attention_block(tiny_model, images):
    """Values from in_proj rows [2D:3D], attended per head and passed through out_proj, equal the MHA."""
    qk_model = variant(tiny_model, construction="multi-v", gating="qk", num_layers=1)
    for block, x in zip(tiny_model.visual.transformer.resblocks, block_inputs(tiny_model, images)):
        u = block.ln_1(x)
        mha = block.attn(u, u, u, need_weights=False)[0]
        torch.testing.assert_close(head_attention(block, x, "k"), mha, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(qk_model._value_branch(block, x), mha[:, 1:], rtol=1e-5, atol=1e-5)


def test_trunk_blocks_through_sdpa_equal_open_clip_blocks(tiny_model, images):
    """encode_dense runs its trunk with SDPA attention; every block must match open_clip's own forward."""
    for block, x in zip(tiny_model.visual.transformer.resblocks, block_inputs(tiny_model, images)):
        with torch.no_grad():
            torch.testing.assert_close(DenseRCModel._block(block, x), block(x), rtol=1e-5, atol=1e-5)


def test_v_none_equals_value_path_of_last_block(tiny_model, images):
    x_last = block_inputs(tiny_model, images)[-1]
    block = tiny_model.visual.transformer.resblocks[-1]
    expected = to_grid(per_head_outputs(block, x_last)[:, 1:].sum(2) + block.attn.out_proj.bias, tiny_model)
    model = variant(tiny_model, construction="v", gating="none")
    torch.testing.assert_close(model.encode_dense(images), expected, rtol=1e-4, atol=1e-5)
    one_layer = variant(tiny_model, construction="multi-v", gating="none", num_layers=1)
    torch.testing.assert_close(one_layer.encode_dense(images), model.encode_dense(images), rtol=0, atol=0)


@pytest.mark.parametrize("num_layers", [1, 2, 3, 4])
def test_multi_v_hsg_equals_gated_sum_over_last_layers(tiny_model, images, num_layers):
    model = variant(tiny_model, construction="multi-v", gating="hsg", num_layers=num_layers)
    inputs = block_inputs(tiny_model, images)
    blocks = tiny_model.visual.transformer.resblocks
    total = 0
    for block, x in list(zip(blocks, inputs))[-num_layers:]:
        u = block.ln_1(x)[:, 1:]
        gates = torch.sigmoid(u @ model.gate.linear.weight.T + model.gate.linear.bias)  # (B, N, H)
        total = total + (gates[..., None] * per_head_outputs(block, x)[:, 1:]).sum(2) + block.attn.out_proj.bias
    torch.testing.assert_close(model.encode_dense(images), to_grid(total, tiny_model), rtol=1e-4, atol=1e-5)


def test_x_plus_v_equals_clipself_formula(tiny_model, images):
    x = block_inputs(tiny_model, images)[-1]
    block = tiny_model.visual.transformer.resblocks[-1]
    x1 = x + per_head_outputs(block, x).sum(2) + block.attn.out_proj.bias
    x2 = x1 + block.mlp(block.ln_2(x1))
    model = variant(tiny_model, construction="x+v", gating="none")
    torch.testing.assert_close(model.encode_dense(images), to_grid(x2[:, 1:], tiny_model), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("gating,keys_from", [("qk", "k"), ("qq", "q")])
def test_attention_gatings_equal_block_attention_without_residual(tiny_model, images, gating, keys_from):
    model = variant(tiny_model, construction="multi-v", gating=gating, num_layers=3)
    inputs = block_inputs(tiny_model, images)
    blocks = tiny_model.visual.transformer.resblocks
    total = sum(head_attention(block, x, keys_from)[:, 1:] for block, x in list(zip(blocks, inputs))[-3:])
    torch.testing.assert_close(model.encode_dense(images), to_grid(total, tiny_model), rtol=1e-4, atol=1e-5)


def test_x_plus_v_with_qk_is_vanilla_clip_patch_output(tiny_model, images):
    """Sanity link between the variants: x+v with the block's own attention is CLIP's last block."""
    model = variant(tiny_model, construction="x+v", gating="qk")
    inputs = block_inputs(tiny_model, images)
    out = tiny_model.visual.transformer.resblocks[-1](inputs[-1])
    torch.testing.assert_close(model.encode_dense(images), to_grid(out[:, 1:], tiny_model), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("gating,mixes", [("hsg", False), ("none", False), ("qk", True), ("qq", True)])
def test_only_attention_gatings_mix_patches(tiny_model, images, gating, mixes):
    """Changing one token entering the value layer changes only that patch's feature under hsg/none."""
    model = variant(tiny_model, construction="v", gating=gating)
    block = model.visual.transformer.resblocks[-1]
    x = block_inputs(tiny_model, images)[-1]
    changed = x.clone()
    changed[:, 1 + 20] += torch.randn(x.shape[-1])
    before, after = model._value_branch(block, x), model._value_branch(block, changed)
    differs = (before - after).abs().amax(dim=(0, 2)) > 1e-6
    assert differs[20]
    assert bool(differs[torch.arange(differs.numel()) != 20].any()) == mixes


def test_head_selection_gate_parameters_shape_and_uniform_init(tiny_model, images):
    model = variant(tiny_model, construction="multi-v", gating="hsg")
    fresh = DenseRCModel(tiny_model.clip, model_name=TINY, model_cfg=tiny_model.model_cfg,
                         preprocess_cfg=tiny_model.preprocess_cfg)
    plain = sum(p.numel() for p in tiny_model.clip.parameters())
    width, heads = tiny_model.width, tiny_model.heads
    assert sum(p.numel() for p in fresh.parameters()) - plain == width * heads + heads
    assert [type(m) for m in fresh.modules() if isinstance(m, HeadSelectionGate)] == [HeadSelectionGate]
    assert fresh.gate.linear.in_features == width and fresh.gate.linear.out_features == heads
    tokens = block_inputs(tiny_model, images)[-1][:, 1:]
    gates = fresh.gate(tiny_model.visual.transformer.resblocks[-1].ln_1(tokens))
    assert gates.shape == (2, 196, heads)
    assert torch.equal(gates, torch.full_like(gates, 0.5))
    trained = model.gate(tiny_model.visual.transformer.resblocks[-1].ln_1(tokens))
    assert bool(((trained > 0) & (trained < 1)).all()) and trained.std() > 0.01


def test_gradients_reach_gate_and_student_blocks(tiny_model, images):
    model = DenseRCModel(tiny_model.clip, model_name=TINY, model_cfg=tiny_model.model_cfg,
                         preprocess_cfg=tiny_model.preprocess_cfg).train()
    model.encode_dense(images).square().mean().backward()
    assert model.gate.linear.weight.grad.abs().sum() > 0
    for index, block in enumerate(model.visual.transformer.resblocks[:-1]):
        assert block.attn.in_proj_weight.grad.abs().sum() > 0, f"no gradient in block {index}"
    assert model.visual.conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.clip.transformer.parameters())  # text tower untouched


@pytest.mark.parametrize("size", [(224, 224), (448, 448), (320, 480)])
def test_dense_shapes_any_resolution(tiny_model, size):
    out = tiny_model.encode_dense(torch.randn(1, 3, *size))
    assert out.shape == (1, tiny_model.embed_dim, size[0] // 16, size[1] // 16)
    assert tiny_model.encode_image(torch.randn(1, 3, *size)).shape == (1, tiny_model.embed_dim)


def test_position_embedding_cache_follows_weight_updates(tiny_model):
    images = torch.randn(1, 3, 320, 480)
    with torch.no_grad():
        first = tiny_model.encode_dense(images)
        assert len(tiny_model._pos_cache) == 1
        assert torch.equal(tiny_model.encode_dense(images), first)
        tiny_model.visual.positional_embedding.add_(0.5)
        assert not torch.equal(tiny_model.encode_dense(images), first)
    grad_out = tiny_model.encode_dense(images)  # with grad: recomputed, gradient flows to pos embed
    grad_out.sum().backward()
    assert tiny_model.visual.positional_embedding.grad.abs().sum() > 0


@pytest.mark.slow
def test_autocast_bf16_and_compile(tiny_model, images):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny_model.encode_dense(images)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), tiny_model.encode_dense(images), rtol=0.1, atol=0.1)
    compiled = torch.compile(tiny_model.encode_dense, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(images), tiny_model.encode_dense(images), rtol=1e-5, atol=1e-5)


def test_grad_checkpointing_gives_same_gradients(tiny_model, images):
    grads = []
    for enable in (False, True):
        tiny_model.zero_grad()
        tiny_model.set_grad_checkpointing(enable)
        tiny_model.encode_dense(images).square().mean().backward()
        grads.append(tiny_model.visual.conv1.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("settings,message", [
    ({"construction": "q+v"}, "construction must be one of"),
    ({"gating": "softmax"}, "gating must be one of"),
    ({"construction": "v", "num_layers": 3}, "num_layers must be 1"),
    ({"num_layers": 9}, "num_layers must be in 1..4"),
])
def test_bad_settings_are_rejected(settings, message):
    with pytest.raises(ValueError, match=message):
        denserc.create_model(TINY, **settings)


def test_image_size_must_be_a_multiple_of_the_patch(tiny_model):
    with pytest.raises(ValueError, match="multiples of the patch size 16"):
        tiny_model.encode_dense(torch.randn(1, 3, 230, 224))
