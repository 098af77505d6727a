"""EVA-02-CLIP and SigLIP students: the dense construction checked against timm's own modules and against
formulas written out from the weights in the test (the bundled tiny EVA02-Tiny-16 / ViT-Tiny-16-MAP)."""
import copy
import functools

import open_clip
import pytest
import timm
import torch
from open_clip.model import _build_vision_tower
from safetensors.torch import save_file
from timm.layers import apply_rot_embed_cat
from torch import nn

import denserc
from denserc.models import DenseRCModel, UnsupportedModelError
from denserc.models.towers import attention_pool_one_token, tower_for

from helpers import randomize_, variant

EVA, SIGLIP = "EVA02-Tiny-16", "ViT-Tiny-16-MAP"
FAMILIES = [EVA, SIGLIP]


def random_model(name: str, seed: int = 0, layer_scale: bool = False) -> DenseRCModel:
    """A tiny model with every parameter random (LayerNorms included); optionally with LayerScale added."""
    torch.manual_seed(seed)
    model = denserc.create_model(name)
    if layer_scale:  # EVA blocks take LayerScale when gamma_1/gamma_2 are set (EVA02-CLIP-B has none)
        for block in model.visual.trunk.blocks:
            block.gamma_1 = nn.Parameter(torch.ones(model.width))
            block.gamma_2 = nn.Parameter(torch.ones(model.width))
    return randomize_(model, seed=seed).eval()



@pytest.fixture(autouse=True)
def timm_resamples_like_the_peers(monkeypatch):
    """timm's dynamic size resamples position embeddings with antialiasing; DenseRC follows CLIPSelf/DeCLIP
    (bicubic, no antialiasing, docs/training.md#recipe-choices), so the reference trunks here do too."""
    peers = functools.partial(timm.layers.resample_abs_pos_embed, antialias=False)
    for module in (timm.models.eva, timm.models.vision_transformer):
        monkeypatch.setattr(module, "resample_abs_pos_embed", peers)


def dynamic_trunk(model: DenseRCModel) -> nn.Module:
    """timm's own trunk of the same weights built with dynamic_img_size=True: timm resamples the position
    embedding (made the peers' way by ``timm_resamples_like_the_peers``) and rebuilds RoPE for any input
    size itself."""
    trunk = model.visual.trunk
    reference = timm.create_model(trunk.pretrained_cfg["architecture"], dynamic_img_size=True,
                                  num_classes=trunk.num_classes, global_pool=trunk.global_pool)
    for block, own in zip(reference.blocks, trunk.blocks):
        if getattr(own, "gamma_1", None) is not None:
            block.gamma_1, block.gamma_2 = nn.Parameter(torch.empty(own.gamma_1.shape)), nn.Parameter(
                torch.empty(own.gamma_2.shape))
    reference.load_state_dict(trunk.state_dict())
    return reference.eval()


def block_inputs(trunk: nn.Module, images: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """(x, rope) entering every block in a plain forward of a timm trunk."""
    captured = []

    def hook(_module, args, kwargs):
        captured.append((args[0].detach(), kwargs.get("rope")))
    hooks = [block.register_forward_pre_hook(hook, with_kwargs=True) for block in trunk.blocks]
    try:
        with torch.no_grad():
            trunk(images)
    finally:
        for handle in hooks:
            handle.remove()
    return captured


def attention_branch(block: nn.Module, x: torch.Tensor, rope: torch.Tensor | None) -> torch.Tensor:
    """What the block's own attention adds to the residual stream, its LayerScale included."""
    if isinstance(block, timm.models.eva.EvaBlock):
        out = block.attn(block.norm1(x), rope=rope)
        return out if block.gamma_1 is None else block.gamma_1 * out
    return block.ls1(block.attn(block.norm1(x)))


def to_grid(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)


def layer_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """A LayerNorm written out: (x - mean) / sqrt(var + eps) * weight + bias."""
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).square().mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def eva_joint(model: DenseRCModel, tokens: torch.Tensor) -> torch.Tensor:
    """EVA's cls path applied per token, written out: trunk norm, then the head Linear to the joint space."""
    trunk = model.visual.trunk
    return layer_norm(tokens, trunk.norm) @ trunk.head.weight.T + trunk.head.bias


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def eva():
    return random_model(EVA, layer_scale=True)


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return random_model(request.param)


# ------------------------------------------------------------------------------ both families
def test_families_are_recognised(model):
    assert model.family == {EVA: "EVA (timm Eva)", SIGLIP: "timm ViT (SigLIP)"}[model.model_name]
    assert (model.patch_size, model.native_size, model.width, model.heads) == (16, (224, 224), 64, 4)


def test_encode_image_equals_open_clip_at_native_size(model, images):
    reference = open_clip.create_model(model.model_name)
    reference.load_state_dict(model.clip.state_dict())
    reference.eval()
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), reference.encode_image(images))
        assert torch.equal(model.encode_image(images, normalize=True), reference.encode_image(images, normalize=True))


@pytest.mark.parametrize("size", [(160, 256), (288, 224)])
def test_any_input_size_equals_timm_with_dynamic_image_size(model, size):
    """Position embedding (and EVA's RoPE) resampled for the grid exactly as timm does it itself."""
    images = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(2))
    reference = dynamic_trunk(model)
    with torch.no_grad():
        expected = model.visual.head(reference(images))
        torch.testing.assert_close(model.encode_image(images), expected, rtol=1e-5, atol=1e-5)
        dense = model.encode_dense(images)
    assert dense.shape == (1, model.embed_dim, size[0] // 16, size[1] // 16)


@pytest.mark.parametrize("name,layer_scale", [(EVA, False), (EVA, True), (SIGLIP, False)])
def test_qk_on_one_layer_equals_each_blocks_attention_branch(name, layer_scale):
    """At a non-square, non-native grid, with the RoPE timm itself builds for that grid (EVA)."""
    model = random_model(name, layer_scale=layer_scale)
    images = torch.randn(2, 3, 160, 256, generator=torch.Generator().manual_seed(4))
    qk = variant(model, gating="qk", num_layers=1)
    prefix = model.visual.trunk.num_prefix_tokens
    for block, (x, rope) in zip(model.visual.trunk.blocks, block_inputs(dynamic_trunk(model), images)):
        with torch.no_grad():
            if rope is not None:
                torch.testing.assert_close(model.tower.rope((10, 16)), rope)
            expected = attention_branch(block, x, rope)[:, prefix:]
            torch.testing.assert_close(qk._value_branch(block, x, rope), expected, rtol=1e-5, atol=1e-5)


def test_x_plus_v_with_qk_is_the_last_blocks_patch_output(model, images):
    xv = variant(model, construction="x+v", gating="qk")
    trunk = model.visual.trunk
    x, rope = block_inputs(trunk, images)[-1]
    with torch.no_grad():
        last = trunk.blocks[-1](x, **({"rope": rope} if rope is not None else {}))
        expected = xv.tower.to_joint(last[:, trunk.num_prefix_tokens:])
        torch.testing.assert_close(xv.encode_dense(images), to_grid(expected, 14, 14), rtol=1e-4, atol=1e-5)


def test_head_selection_gate_adds_exactly_width_times_heads_plus_heads(model):
    plain = sum(p.numel() for p in model.clip.parameters())
    gated = DenseRCModel(model.clip, model_name=model.model_name, model_cfg=model.model_cfg,
                         preprocess_cfg=model.preprocess_cfg, gating="hsg")
    assert sum(p.numel() for p in gated.parameters()) - plain == 64 * 4 + 4


@pytest.mark.parametrize("gating,mixes", [("hsg", False), ("none", False), ("qk", True), ("qq", True)])
def test_only_attention_gatings_mix_patches(model, images, gating, mixes):
    chosen = variant(model, construction="v", gating=gating)
    block = model.visual.trunk.blocks[-1]
    x, rope = block_inputs(model.visual.trunk, images)[-1]
    prefix = model.visual.trunk.num_prefix_tokens
    changed = x.clone()
    changed[:, prefix + 20] += torch.randn(x.shape[-1])
    with torch.no_grad():
        before, after = chosen._value_branch(block, x, rope), chosen._value_branch(block, changed, rope)
    differs = (before - after).abs().amax(dim=(0, 2)) > 1e-6
    assert differs[20]
    assert bool(differs[torch.arange(differs.numel()) != 20].any()) == mixes


def test_save_load_round_trip_is_identical(model, images, tmp_path):
    saved = variant(model, num_layers=2)
    saved.save(tmp_path / "out")
    loaded = denserc.load(tmp_path / "out").eval()
    assert loaded.config == {"model_name": model.model_name, "construction": "multi-v", "gating": "hsg",
                             "num_layers": 2}
    with torch.no_grad():
        assert torch.equal(loaded.encode_dense(images), saved.encode_dense(images))
        assert torch.equal(loaded.encode_image(images), saved.encode_image(images))
    plain = open_clip.create_model(f"local-dir:{tmp_path / 'out'}").eval()
    with torch.no_grad():
        assert torch.equal(plain.encode_image(images), saved.encode_image(images))


def test_gradients_reach_the_gate_and_the_blocks(model, images):
    trained = variant(model).train()
    trained.encode_dense(images[:1]).square().mean().backward()
    assert trained.gate.linear.weight.grad.abs().sum() > 0
    for index, block in enumerate(model.visual.trunk.blocks[:-1]):
        assert block.norm1.weight.grad.abs().sum() > 0, f"no gradient in block {index}"
    model.zero_grad()
    model.eval()  # the module-wide fixture shares its CLIP with the trained variant


@pytest.mark.slow
def test_autocast_and_compile(model, images):
    with torch.no_grad():
        reference = model.encode_dense(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model.encode_dense(images)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), reference, rtol=0.1, atol=0.15)
        compiled = torch.compile(model.encode_dense, backend="aot_eager")
        torch.testing.assert_close(compiled(images), reference, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ EVA-02-CLIP
def eva_values(block, x: torch.Tensor) -> torch.Tensor:
    """v = norm1(x) @ W_v^T + b_v for the patch tokens, heads concatenated (B, N, D)."""
    attn = block.attn
    return block.norm1(x)[:, 1:] @ attn.v_proj.weight.T + attn.v_proj.bias


def eva_branch(block, combined: torch.Tensor) -> torch.Tensor:
    """gamma_1 * (LN_attn(concat_h values) @ W_proj^T + b_proj): the inner LayerNorm mixes the heads."""
    attn = block.attn
    return block.gamma_1 * (layer_norm(combined, attn.norm) @ attn.proj.weight.T + attn.proj.bias)


@pytest.mark.parametrize("num_layers", [1, 3])
def test_eva_none_equals_the_sum_written_from_the_weights(eva, images, num_layers):
    last = list(zip(eva.visual.trunk.blocks, block_inputs(eva.visual.trunk, images)))[-num_layers:]
    with torch.no_grad():
        total = sum(eva_branch(block, eva_values(block, x)) for block, (x, _) in last)
        dense = variant(eva, gating="none", num_layers=num_layers).encode_dense(images)
        torch.testing.assert_close(dense, to_grid(eva_joint(eva, total), 14, 14), rtol=1e-4, atol=1e-5)


def test_eva_hsg_gates_each_head_before_the_inner_layer_norm(eva, images):
    model = variant(eva, gating="hsg", num_layers=2)
    weight, bias = model.gate.linear.weight, model.gate.linear.bias
    blocks = eva.visual.trunk.blocks
    total = 0
    with torch.no_grad():
        for block, (x, _) in list(zip(blocks, block_inputs(eva.visual.trunk, images)))[-2:]:
            gates = torch.sigmoid(block.norm1(x)[:, 1:] @ weight.T + bias)  # (B, N, H)
            values = eva_values(block, x).unflatten(-1, (4, 16)) * gates[..., None]
            total = total + eva_branch(block, values.flatten(-2))
        torch.testing.assert_close(model.encode_dense(images), to_grid(eva_joint(eva, total), 14, 14),
                                   rtol=1e-4, atol=1e-5)


def test_eva_qq_is_self_self_attention_with_rope_on_both_sides(eva, images):
    """softmax(q q^T / sqrt d) v with q rotated as the block rotates it: patch queries by their positions,
    the cls query (also a key) unrotated."""
    block = eva.visual.trunk.blocks[-1]
    x, rope = block_inputs(eva.visual.trunk, images)[-1]
    attn = block.attn
    u = block.norm1(x)
    with torch.no_grad():
        q = (u @ attn.q_proj.weight.T + attn.q_proj.bias).unflatten(-1, (4, 16)).transpose(1, 2)
        v = (u @ attn.v_proj.weight.T + attn.v_proj.bias).unflatten(-1, (4, 16)).transpose(1, 2)
        patches = apply_rot_embed_cat(q[:, :, 1:], rope)
        keys = torch.cat([q[:, :, :1], patches], dim=2)
        weights = torch.softmax(patches @ keys.transpose(-1, -2) / 4.0, dim=-1)
        combined = (weights @ v).transpose(1, 2).flatten(2)
        expected = eva_joint(eva, eva_branch(block, combined))
        dense = variant(eva, construction="v", gating="qq").encode_dense(images)
    torch.testing.assert_close(dense, to_grid(expected, 14, 14), rtol=1e-4, atol=1e-5)


def test_eva_queries_for_some_patches_are_refused(eva, images):
    """Leading queries skip RoPE, so they may only be the prefix (class) tokens or every token."""
    tower = variant(eva, construction="v", gating="qq").tower
    block = eva.visual.trunk.blocks[-1]
    x, rope = block_inputs(eva.visual.trunk, images)[-1]
    with torch.no_grad():
        q, k, v = tower.queries_keys_values(block, block.norm1(x), rope, 1)
        assert q.shape[2] == 1 and k.shape[2] == v.shape[2] == x.shape[1]
        with pytest.raises(ValueError, match="queries for 3 of 197 tokens: only the 1 prefix tokens or all"):
            tower.queries_keys_values(block, block.norm1(x), rope, 3)


def test_eva_x_plus_v_is_clipselfs_forward_without_attn(eva, images):
    """CLIPSelf's EVA ``forward_without_attn``: x + gamma_1 * proj(norm(v(norm1 x))), then the MLP residual."""
    block = eva.visual.trunk.blocks[-1]
    x, _ = block_inputs(eva.visual.trunk, images)[-1]
    with torch.no_grad():
        y = x[:, 1:] + eva_branch(block, eva_values(block, x))
        y = y + block.gamma_2 * block.mlp(block.norm2(y))
        dense = variant(eva, construction="x+v", gating="none").encode_dense(images)
    torch.testing.assert_close(dense, to_grid(eva_joint(eva, y), 14, 14), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------ SigLIP
def test_siglip_dense_feature_is_the_attention_pool_head_run_on_each_token_alone():
    siglip = random_model(SIGLIP)
    trunk = siglip.visual.trunk
    tokens = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        alone = trunk.attn_pool(tokens.reshape(14, 1, 64)).reshape(2, 7, -1)  # the head itself, one token
        torch.testing.assert_close(attention_pool_one_token(trunk.attn_pool, tokens), alone, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(siglip.tower.to_joint(tokens), trunk.fc_norm(trunk.attn_pool(
            trunk.norm(tokens).reshape(14, 1, 64))).reshape(2, 7, -1), rtol=1e-5, atol=1e-6)


def test_siglip_v_none_equals_the_value_path_written_from_the_weights(images):
    siglip = random_model(SIGLIP)
    trunk = siglip.visual.trunk
    block = trunk.blocks[-1]
    x, _ = block_inputs(trunk, images)[-1]
    qkv = block.attn.qkv
    with torch.no_grad():
        values = block.norm1(x) @ qkv.weight[128:].T + qkv.bias[128:]  # rows [2D:3D]: the values
        branch = block.ls1(values @ block.attn.proj.weight.T + block.attn.proj.bias)
        pool = trunk.attn_pool
        t = layer_norm(branch, trunk.norm)
        pooled = (t @ pool.kv.weight[64:].T + pool.kv.bias[64:]) @ pool.proj.weight.T + pool.proj.bias
        expected = pooled + pool.mlp(layer_norm(pooled, pool.norm))
        dense = variant(siglip, construction="v", gating="none").encode_dense(images)
    torch.testing.assert_close(dense, to_grid(expected, 14, 14), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------ what is refused
@pytest.mark.parametrize("change,message", [
    (lambda trunk: setattr(trunk.attn_pool, "pos_embed", nn.Parameter(torch.zeros(196, 64))),
     "attention-pool head with its own position embedding"),
    (lambda trunk: setattr(trunk.blocks[2].attn, "gate", nn.Linear(64, 64)),
     "block 2 has Attention attention with a sigmoid output gate"),
])
def test_siglip_towers_that_cannot_be_decomposed_say_why(change, message):
    clip = open_clip.create_model(SIGLIP)
    change(clip.visual.trunk)
    with pytest.raises(UnsupportedModelError, match=f"'{SIGLIP}' has an image tower DenseRC cannot decompose "
                                                    f"\\(.*{message}.*EVA-02-CLIP"):
        DenseRCModel(clip, model_name=SIGLIP, model_cfg={}, preprocess_cfg={})


def test_eva_post_norm_blocks_are_refused():
    clip = open_clip.create_model(EVA)
    post_norm = timm.models.eva.EvaBlockPostNorm(dim=64, num_heads=4)
    clip.visual.trunk.blocks[0] = post_norm
    with pytest.raises(UnsupportedModelError, match="block 0 is EvaBlockPostNorm .*post-norm"):
        DenseRCModel(clip, model_name=EVA, model_cfg={}, preprocess_cfg={})


def test_pretrained_tags_and_files_bring_their_image_normalisation(tmp_path):
    """SigLIP's weights expect mean = std = 0.5 (every open_clip SigLIP tag says so), not CLIP's default."""
    path = tmp_path / "siglip.safetensors"
    save_file({k: v.contiguous() for k, v in open_clip.create_model(SIGLIP).state_dict().items()}, str(path))
    model = denserc.create_model(SIGLIP, pretrained=path)
    assert model.preprocess_cfg["mean"] == pytest.approx(open_clip.OPENAI_DATASET_MEAN)  # no tags: the default
    open_clip.pretrained._PRETRAINED[SIGLIP] = {"a": {"file": str(path), "mean": (0.5,) * 3, "std": (0.5,) * 3},
                                                "b": {"url": "", "mean": (0.5,) * 3, "std": (0.5,) * 3}}
    try:
        by_tag = denserc.create_model(SIGLIP, pretrained="a")
        by_file = denserc.create_model(SIGLIP, pretrained=path)
    finally:
        del open_clip.pretrained._PRETRAINED[SIGLIP]
    assert by_tag.preprocess_cfg["mean"] == by_file.preprocess_cfg["mean"] == (0.5,) * 3
    assert by_tag.preprocess_cfg["std"] == (0.5,) * 3


def test_eva_with_a_fused_qkv_projection(images):
    """EVA-01-style attention (one qkv Linear, separate q/v biases, a zero k bias) gives the same identities."""
    clip = open_clip.create_model(EVA)
    clip.visual.trunk = timm.create_model("denserc_eva02_tiny_patch16_clip", qkv_fused=True, num_classes=32)
    model = randomize_(DenseRCModel(clip, model_name=EVA, model_cfg=open_clip.get_model_config(EVA),
                                    preprocess_cfg={}, gating="none", num_layers=1), seed=6).eval()
    trunk = clip.visual.trunk
    inputs = block_inputs(trunk, images)
    qk = variant(model, gating="qk", num_layers=1)
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), clip.visual(images))
        for block, (x, rope) in zip(trunk.blocks, inputs):
            torch.testing.assert_close(qk._value_branch(block, x, rope), attention_branch(block, x, rope)[:, 1:],
                                       rtol=1e-5, atol=1e-5)
        block, (x, _) = trunk.blocks[-1], inputs[-1]
        attn = block.attn
        values = block.norm1(x)[:, 1:] @ attn.qkv.weight[128:].T + attn.v_bias
        branch = layer_norm(values, attn.norm) @ attn.proj.weight.T + attn.proj.bias
        torch.testing.assert_close(model.encode_dense(images), to_grid(eva_joint(model, branch), 14, 14),
                                   rtol=1e-4, atol=1e-5)


def image_tower_only(name: str) -> nn.Module:
    """A module with open_clip's image tower of ``name`` as ``.visual``, on the meta device (no memory)."""
    config = open_clip.get_model_config(name)
    with torch.device("meta"):
        clip = nn.Module()
        clip.visual = _build_vision_tower(config["embed_dim"], config["vision_cfg"])
    return clip


@pytest.mark.slow
@pytest.mark.parametrize("name,family,layout", [
    ("EVA02-B-16", "EVA (timm Eva)", (768, 12, 12, 16, (224, 224))),
    ("EVA02-L-14-336", "EVA (timm Eva)", (1024, 16, 24, 14, (336, 336))),
    ("ViT-B-16-SigLIP2", "timm ViT (SigLIP)", (768, 12, 12, 16, (224, 224))),
])
def test_the_real_eva02_and_siglip_towers_are_decomposed(name, family, layout):
    """open_clip's own configs of the families (image towers built on the meta device: structure only)."""
    tower = tower_for(image_tower_only(name), name)
    assert tower.family == family
    assert (tower.width, tower.heads, len(tower.blocks), tower.patch_size, tower.native_size) == layout


@pytest.mark.slow
def test_eva02_e_with_post_norm_blocks_is_refused_with_the_reason():
    clip = image_tower_only("EVA02-E-14")
    with pytest.raises(UnsupportedModelError, match="'EVA02-E-14' has an image tower DenseRC cannot decompose "
                                                    r"\(block 0 is EvaBlockPostNorm"):
        tower_for(clip, "EVA02-E-14")


def test_grad_checkpointing_and_deepcopy_keep_the_tower_in_step(model, images):
    grads = []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        model.encode_dense(images[:1]).square().mean().backward()
        grads.append(model.visual.trunk.patch_embed.proj.weight.grad.clone())
    model.set_grad_checkpointing(False)
    model.zero_grad()
    torch.testing.assert_close(grads[0], grads[1])
    copied = copy.deepcopy(model)  # the trainer's export copies the student
    assert copied.tower.visual is copied.visual and copied.visual is not model.visual
