"""The frozen side of training: teacher crops cut on the device, the teacher's embeddings, the VFM."""
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

import denserc
from denserc.data import grid_boxes
from denserc.models import normalize_images
from denserc.train.teacher import Teacher, crop_and_resize, letterbox_crops
from denserc.train.vfm import VFM

TINY_VFM = {"depth": 1, "embed_dim": 24, "num_heads": 2}


@pytest.fixture(scope="module")
def student():
    torch.manual_seed(0)
    return denserc.create_model("ViT-Tiny-16")


def test_crops_of_native_sized_cells_are_exact_slices():
    image = torch.randn(1, 3, 8, 12)
    boxes = grid_boxes(2, 3, 8, 12)  # 4 x 4 cells
    crops = crop_and_resize(image, [boxes], (4, 4))
    slices = torch.stack([image[0, :, y:y + 4, x:x + 4] for y in (0, 4) for x in (0, 4, 8)])
    torch.testing.assert_close(crops, slices, rtol=0, atol=1e-6)


@pytest.mark.parametrize("factor", [2, 4])
def test_crops_of_larger_cells_equal_area_resizing_of_the_slice(factor):
    """Downscaling by an integer factor averages each factor x factor block, as an area resize does."""
    size = 6
    images = torch.randn(2, 3, 2 * size * factor, 3 * size * factor)
    boxes = [grid_boxes(2, 3, *images.shape[-2:]), grid_boxes(1, 1, *images.shape[-2:])]
    crops = crop_and_resize(images, boxes, (size, size))
    expected = []
    for image, image_boxes in zip(images, boxes):
        for x1, y1, x2, y2 in image_boxes.long().tolist():
            cell = image[None, :, y1:y2, x1:x2]
            expected.append(F.interpolate(cell, size=(size, size), mode="area")[0])
    torch.testing.assert_close(crops, torch.stack(expected), rtol=0, atol=1e-5)


def test_crop_of_the_whole_image_upscaled_equals_bilinear_resizing():
    image = torch.randn(1, 3, 5, 7)
    crop = crop_and_resize(image, [torch.tensor([[0.0, 0.0, 7.0, 5.0]])], (16, 16))
    expected = F.interpolate(image, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(crop, expected, rtol=0, atol=1e-5)


def pil_letterbox(cell: torch.Tensor, size: int) -> torch.Tensor:
    """CLIPSelf's ``ResizeMaxSize(size, fill=0)`` written with PIL: longer side to ``size`` (bilinear), centred,
    black padding; per channel in PIL's float mode "F", so that no uint8 rounding enters."""
    height, width = cell.shape[-2:]
    scale = size / max(height, width)
    new_h, new_w = round(height * scale), round(width * scale)
    out = torch.zeros(cell.shape[0], size, size)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    for channel in range(cell.shape[0]):
        resized = Image.fromarray(cell[channel].numpy(), mode="F").resize((new_w, new_h), Image.Resampling.BILINEAR)
        out[channel, top:top + new_h, left:left + new_w] = torch.from_numpy(np.array(resized))
    return out


@pytest.mark.parametrize("cell_size", [(20, 40), (40, 14), (28, 28), (30, 56)])
def test_letterboxed_cell_equals_pil_letterboxing_of_the_cell_alone(student, cell_size):
    """A cell of a larger image, letterboxed on the device, equals the cell cut out and letterboxed by PIL.

    The image around the cell repeats the cell's edge pixels, so that bilinear samples falling just
    outside the cell (roi_align) read what PIL's edge clamping reads."""
    height, width = cell_size
    cell = torch.rand(3, height, width, generator=torch.Generator().manual_seed(height))
    image = F.pad(cell[None], (8, 24, 16, 4), mode="replicate")
    box = torch.tensor([[8.0, 16.0, 8.0 + width, 16.0 + height]])
    black = torch.tensor([-1.0, -2.0, -3.0])  # a distinct fill per channel
    crop = letterbox_crops(image, [box], (56, 56), black)[0]
    expected = pil_letterbox(cell, 56)
    valid = expected.abs().sum(0) > 0  # the test cell has no all-black pixel
    torch.testing.assert_close(crop[:, valid], expected[:, valid], rtol=0, atol=1e-5)
    assert torch.equal(crop[:, ~valid], black[:, None].expand(3, int((~valid).sum())))
    if height != width:  # the old behaviour, a stretched 56 x 56 crop, is far from it
        stretched = crop_and_resize(image, [box], (56, 56))[0]
        assert (stretched[:, valid] - expected[:, valid]).abs().max() > 0.1


def test_teacher_embedding_of_a_non_square_cell_equals_pil_letterboxing(student):
    teacher = Teacher(student)
    size = student.native_size[0]
    cell = torch.rand(3, 40, 100, generator=torch.Generator().manual_seed(0))
    pixels = F.pad(cell[None], (0, 28, 0, 88), mode="replicate")  # a 128 x 128 image, the cell at the top left
    images = normalize_images(pixels, student.preprocess_cfg, white=1.0)
    boxes = [torch.tensor([[0.0, 0.0, 100.0, 40.0], [0.0, 40.0, 128.0, 128.0]])]
    embeddings = teacher(images, boxes)
    reference = normalize_images(pil_letterbox(cell, size), student.preprocess_cfg, white=1.0)
    with torch.no_grad():
        expected = student.encode_image(reference[None], normalize=True)[0]
        stretched = student.encode_image(crop_and_resize(images, boxes[:1], (size, size)), normalize=True)[0]
    torch.testing.assert_close(embeddings[0], expected, rtol=0, atol=2e-5)
    assert (stretched - expected).abs().max() > 1e-3
    black = normalize_images(torch.zeros(3, 1, 1), student.preprocess_cfg, white=1.0).flatten()
    assert torch.equal(teacher.black, black)


def test_teacher_embeds_each_cell_like_the_student_at_the_start(student):
    teacher = Teacher(student)
    images = torch.randn(2, 3, 64, 96)
    boxes = [grid_boxes(1, 2, 64, 96), grid_boxes(2, 1, 64, 96)]
    embeddings = teacher(images, boxes)
    assert embeddings.shape == (4, student.embed_dim)
    crops = letterbox_crops(images, boxes, student.native_size, teacher.black)
    with torch.no_grad():
        expected = student.encode_image(crops, normalize=True)
    torch.testing.assert_close(embeddings, expected, rtol=1e-4, atol=1e-5)


def test_teacher_is_a_frozen_copy_that_stays_in_eval_mode(student):
    teacher = Teacher(student)
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training and not teacher.visual.training
    with torch.no_grad():
        student.visual.proj.add_(1.0)  # training the student must not move the teacher
    try:
        assert not torch.equal(teacher.visual.proj, student.visual.proj)
    finally:
        with torch.no_grad():
            student.visual.proj.sub_(1.0)


def test_vfm_features_are_on_the_students_patch_grid_without_prefix_tokens():
    vfm = VFM("vit_small_patch14_reg4_dinov2", pretrained=False, model_kwargs=TINY_VFM)
    assert vfm.patch_size == 14 and vfm.model.num_prefix_tokens == 5  # cls + 4 registers
    pixels = torch.rand(2, 3, 64, 48)
    features = vfm(pixels, (4, 3))
    assert features.shape == (2, 12, 24)
    resized = F.interpolate(pixels, size=(56, 42), mode="bilinear", align_corners=False, antialias=True)
    tokens = vfm.model.forward_features(_imagenet_style(resized, vfm.model.pretrained_cfg))
    assert tokens.shape[1] == 12 + 5
    torch.testing.assert_close(features, tokens[:, 5:])
    assert not any(p.requires_grad for p in vfm.parameters())


def test_vfm_loads_a_local_weights_file(tmp_path):
    reference = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=0, **TINY_VFM)
    path = tmp_path / "dinov2_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    vfm = VFM("vit_small_patch14_reg4_dinov2", weights=path, model_kwargs=TINY_VFM)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(vfm.model.state_dict()[name], tensor), name


def test_vfm_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="vfm.weights: .*missing.pth does not exist"):
        VFM("vit_small_patch14_reg4_dinov2", weights=tmp_path / "missing.pth", model_kwargs=TINY_VFM)
    with pytest.raises(ValueError, match="vfm.name: unknown timm model 'dinov9'"):
        VFM("dinov9", pretrained=False)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"weight": torch.zeros(2)}, str(wrong))
    with pytest.raises(ValueError, match="does not fit timm model"):
        VFM("vit_small_patch14_reg4_dinov2", weights=wrong, model_kwargs=TINY_VFM)


def test_vfm_without_reachable_weights_fails_fast_with_instructions(monkeypatch, tmp_path):
    monkeypatch.setattr("denserc.models.hub.reachable", lambda host: False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))  # nothing cached
    with pytest.raises(RuntimeError, match="unreachable.*vfm.weights=/path/to/file"):
        VFM("vit_small_patch14_reg4_dinov2", model_kwargs=TINY_VFM)


def _imagenet_style(pixels, config):
    """The VFM's own normalisation, written out: (pixels - mean) / std with its pretrained_cfg."""
    mean, std = (torch.tensor(config[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    return (pixels - mean) / std
