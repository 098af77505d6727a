"""The teacher's crop encoder: encode_image's result (on the letterboxed crops) through SDPA blocks, in chunks, in
the autocast precision; the last block only for the pooled token; open_clip blocks into reused buffers."""
import pytest
import torch

import denserc
from denserc.data import grid_boxes
from open_clip.transformer import LayerScale, QuickGELU

from denserc.models.towers import Workspace, run_open_clip_block_into
from denserc.train.teacher import Teacher, letterbox_crops
from denserc.models.towers import run_block


@pytest.fixture(scope="module")
def student():
    torch.manual_seed(0)
    return denserc.create_model("ViT-Tiny-16")


@pytest.mark.parametrize("name, crops_per_chunk", [("ViT-Tiny-16", 1), ("ViT-Tiny-16", 3), ("ViT-Tiny-16", 64),
                                                   ("EVA02-Tiny-16", 3), ("ViT-Tiny-16-MAP", 3)])
def test_crop_embeddings_equal_open_clips_encode_image_of_the_same_crops_in_any_chunking(name, crops_per_chunk):
    """For every tower family (OpenAI-style, EVA-02 with RoPE, SigLIP with its attention-pool head)."""
    torch.manual_seed(0)
    model = denserc.create_model(name)
    teacher = Teacher(model, crops_per_chunk=crops_per_chunk)
    height, width = 2 * model.native_size[0], model.native_size[1]
    images = torch.randn(2, 3, height, width)
    boxes = [grid_boxes(2, 2, height, width), grid_boxes(3, 1, height, width)]
    crops = letterbox_crops(images, boxes, model.native_size, teacher.black)
    model.clip.eval()
    with torch.no_grad():
        expected = model.clip.encode_image(crops, normalize=True)  # open_clip's own forward
    embeddings = teacher(images, boxes)
    assert embeddings.shape == (7, model.embed_dim) and embeddings.dtype == torch.float32
    torch.testing.assert_close(embeddings, expected, rtol=1e-5, atol=1e-5)


def test_the_blocks_run_scaled_dot_product_attention_not_the_multihead_module(student, monkeypatch):
    teacher = Teacher(student)
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))
    for block in teacher.visual.transformer.resblocks:
        block.attn.forward = lambda *args, **kwargs: pytest.fail("nn.MultiheadAttention ran")
    teacher(torch.randn(1, 3, 64, 64), [grid_boxes(1, 2, 64, 64)])
    assert len(calls) == len(teacher.visual.transformer.resblocks)


def test_under_bf16_autocast_the_teacher_runs_in_bf16_and_returns_float32(student):
    teacher = Teacher(student)
    dtypes = []
    teacher.visual.transformer.resblocks[-1].mlp.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    images, boxes = torch.randn(1, 3, 64, 64), [grid_boxes(2, 2, 64, 64)]
    full = teacher(images, boxes)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = teacher(images, boxes)
    assert dtypes == [torch.float32, torch.bfloat16] and half.dtype == torch.float32
    torch.testing.assert_close(half, full, rtol=0, atol=0.05)


def test_crops_per_chunk_must_be_positive(student):
    with pytest.raises(ValueError, match="crops_per_chunk must be at least 1, got 0"):
        Teacher(student, crops_per_chunk=0)


@pytest.mark.parametrize("name, pooled_rows", [("ViT-Tiny-16", 1), ("EVA02-Tiny-16", 1), ("ViT-Tiny-16-MAP", None)])
def test_the_last_block_runs_only_the_token_the_pooling_reads(name, pooled_rows):
    """Class-token towers: the last block's MLP sees the class token alone (its keys and values still come
    from every token); an attention-pool ("map") head reads every token, so its tower runs the whole block."""
    torch.manual_seed(0)
    model = denserc.create_model(name)
    teacher = Teacher(model)
    tokens_seen = []
    teacher.tower.blocks[-1].mlp.register_forward_hook(lambda m, i, out: tokens_seen.append(i[0].shape[1]))
    size = model.native_size
    teacher(torch.randn(1, 3, *size), [grid_boxes(1, 2, *size)])
    every_token = teacher.tower.num_prefix_tokens + teacher.tower.native_grid[0] * teacher.tower.native_grid[1]
    assert tokens_seen == [pooled_rows or every_token]


def test_a_patch_average_pooling_eva_tower_runs_the_whole_last_block_and_equals_encode_image():
    torch.manual_seed(0)
    model = denserc.create_model("EVA02-Tiny-16")
    model.visual.trunk.global_pool = "avg"
    teacher = Teacher(model)
    assert teacher.tower.pooled_tokens() is None
    size = model.native_size
    images, boxes = torch.randn(1, 3, *size), [grid_boxes(2, 1, *size)]
    crops = letterbox_crops(images, boxes, model.native_size, teacher.black)
    model.clip.eval()
    with torch.no_grad():
        expected = model.clip.encode_image(crops, normalize=True)
    torch.testing.assert_close(teacher(images, boxes), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["ViT-Tiny-16", "EVA02-Tiny-16"])
def test_run_block_leading_equals_the_whole_blocks_first_token(name):
    torch.manual_seed(0)
    model = denserc.create_model(name)
    model.clip.eval()
    tower = model.tower
    images = torch.randn(2, 3, *model.native_size)
    with torch.no_grad():
        x, rope = tower.embed(images, tower.pos_embed)
        for block in tower.blocks:
            whole = run_block(block, x, rope)
            torch.testing.assert_close(tower.run_block_leading(block, x, rope, 1), whole[:, :1], rtol=1e-5, atol=1e-6)
            x = whole


def test_the_buffered_open_clip_block_equals_run_block_with_layer_scale_and_quick_gelu(student):
    """Reused output buffers, in-place GELU and residual: the same numbers as ``run_block``, also for a block with
    LayerScale and QuickGELU, and for a smaller chunk after a larger one (buffers are sliced, not reallocated)."""
    teacher = Teacher(student)
    block = teacher.visual.transformer.resblocks[0]
    block.ls_1, block.ls_2 = LayerScale(student.width, 0.5), LayerScale(student.width, 2.0)
    block.mlp.gelu = QuickGELU()
    workspace = Workspace()
    with torch.no_grad():
        for crops in (5, 3):
            x = torch.randn(crops, 17, student.width)
            kept = x.clone()
            out = run_open_clip_block_into(block, x, workspace)
            torch.testing.assert_close(out, run_block(block, x), rtol=1e-5, atol=1e-6)
            assert torch.equal(x, kept)  # the caller's tokens are not changed in place
    assert workspace.buffers["qkv"].shape == (5 * 17, 3 * student.width)


def test_with_gradients_enabled_encode_runs_the_blocks_own_path(student):
    teacher = Teacher(student)
    crops = torch.randn(2, 3, *student.native_size)
    with torch.no_grad():
        expected = teacher.encode(crops)
    torch.testing.assert_close(teacher.encode(crops), expected, rtol=1e-5, atol=1e-6)
