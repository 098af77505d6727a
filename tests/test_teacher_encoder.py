"""The teacher's crop encoder: encode_image's result (on the letterboxed crops) through SDPA blocks, in chunks, in
the autocast precision."""
import pytest
import torch

import denserc
from denserc.data import grid_boxes
from denserc.models.teacher import Teacher, letterbox_crops


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
