"""Image files as a new user meets them (issue 16): every PIL mode, 16-bit PNGs, unreadable files named by every
reader, and an unreadable training image as a weightless placeholder."""

import numpy as np
import pytest
import torch
from PIL import Image

from denserc.data import SquareResize
from denserc.data.datasets import FileListSource
from denserc.eval.datasets import read_image
from denserc.images import ImageReadError, centred_letterbox, fit_within, load_image, short_side_size

SIDE = 8


def _odd_images(folder):
    """One SIDE x SIDE file per mode that cameras, scanners and editors write, and its RGB as a viewer shows it."""
    folder.mkdir(parents=True, exist_ok=True)
    ramp = np.arange(SIDE * SIDE).reshape(SIDE, SIDE)
    deep = (ramp * 1000).astype(np.uint16)  # 0..63000: PIL's own convert("RGB") clips all but 0 to 255
    palette = Image.new("P", (SIDE, SIDE))
    palette.putpalette([10, 20, 30, 90, 80, 70] + [0] * 762)
    palette.putdata([index % 2 for index in range(SIDE * SIDE)])
    made = {
        "i16.png": (Image.fromarray(deep), np.round(deep.astype(np.int64) * 255 / 65535)),
        "i32.tif": (Image.fromarray(deep.astype(np.int32)), np.round(deep.astype(np.int64) * 255 / 65535)),
        "palette.png": (palette, np.where(ramp % 2 == 1, 255, np.array(10))),
        "la.png": (Image.fromarray(np.stack([(ramp * 4).astype(np.uint8)] * 2, -1), "LA"), None),
        "cmyk.jpg": (Image.new("CMYK", (SIDE, SIDE), (0, 255, 255, 0)), None),
        "bits.png": (Image.fromarray(ramp % 3 == 0), np.where(ramp % 3 == 0, 255, 0)),
    }
    files = {}
    for name, (image, first_channel) in made.items():
        path = folder / name
        image.save(path, transparency=1) if name == "palette.png" else image.save(path)
        files[path] = first_channel
    return files


def test_every_image_mode_reads_the_same_in_training_evaluation_and_viz(tmp_path):
    files = _odd_images(tmp_path / "odd")
    assert Image.open(tmp_path / "odd" / "i16.png").mode == "I;16"
    for path, first_channel in files.items():
        shown = np.asarray(load_image(path))  # what `denserc segment` reads
        if first_channel is not None:
            assert np.array_equal(shown[..., 0], first_channel), path.name
        training, size = SquareResize(SIDE)(FileListSource([path]).open(0))
        assert size == (SIDE, SIDE) and np.array_equal(training.permute(1, 2, 0).numpy(), shown), path.name
        opened_raw, _ = SquareResize(SIDE)(Image.open(path))  # a plug-in's source may hand over any mode
        assert np.array_equal(opened_raw.permute(1, 2, 0).numpy(), shown), path.name
        assert np.array_equal(read_image(path).permute(1, 2, 0).numpy(), shown), path.name


def test_a_16_bit_png_is_not_white_in_training(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.array([[0, 257], [32896, 65535]], dtype=np.uint16)).save(path)
    pixels, _ = SquareResize(2)(FileListSource([path]).open(0))
    assert pixels[0].tolist() == [[0, 1], [128, 255]]


def test_unreadable_files_are_named_by_every_reader(tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    Image.fromarray(np.zeros((4, 4), np.float32)).save(tmp_path / "float.tif")
    for path, problem in ((text, "not a format Pillow recognises"), (tmp_path / "float.tif", "32-bit float")):
        for read in (load_image, read_image, lambda file: FileListSource([file]).open(0)):
            with pytest.raises(ImageReadError, match=rf"{path.name}.*{problem}"):
                read(path)


def test_a_placeholder_of_an_unreadable_image_has_no_weight_in_the_losses():
    from denserc.losses import distillation_loss
    torch.manual_seed(0)
    dense, vfm = torch.randn(3, 8, 4, 4, requires_grad=True), torch.randn(3, 16, 5)
    boxes = [torch.tensor([[0.0, 0, 32, 32], [8, 8, 24, 40]]), torch.tensor([[0.0, 0, 64, 64]]),
             torch.tensor([[16.0, 0, 48, 64], [0, 0, 16, 16], [0, 32, 64, 64]])]
    teacher = torch.randn(6, 8)
    valid = torch.tensor([True, False, True])
    masked = distillation_loss(dense, boxes, teacher, vfm, 16, valid=valid)
    kept = distillation_loss(dense[[0, 2]], [boxes[0], boxes[2]], teacher[[0, 1, 3, 4, 5]], vfm[[0, 2]], 16)
    for name in ("loss_semantics", "loss_coherence", "loss"):
        torch.testing.assert_close(masked[name], kept[name])
    masked["loss"].backward()
    assert dense.grad[1].abs().max() == 0 and dense.grad[0].abs().max() > 0
    unmasked = distillation_loss(dense, boxes, teacher, vfm, 16)
    torch.testing.assert_close(distillation_loss(dense, boxes, teacher, vfm, 16, valid=torch.ones(3, dtype=bool))
                               ["loss"], unmasked["loss"])
    nothing = distillation_loss(dense, boxes, teacher, vfm, 16, valid=torch.zeros(3, dtype=bool))
    assert nothing["loss"].item() == 0 and nothing["loss"].requires_grad  # every rank still steps


def test_a_corrupt_training_image_is_a_weightless_placeholder_not_a_duplicate(tmp_path):
    from denserc.data import TrainingImages
    files = [tmp_path / f"{index}.png" for index in range(3)]
    for index, path in enumerate(files):
        Image.new("RGB", (8, 8), (80 * index, 0, 0)).save(path)
    files[1].write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    samples = [TrainingImages(FileListSource(files), SquareResize(8))[index] for index in range(3)]
    assert [(s["index"], s["valid"], s["skipped"]) for s in samples] == [(0, True, 0), (1, False, 1), (2, True, 0)]
    assert [int(s["image"][0, 0, 0]) for s in samples] == [0, 0, 160]  # image 2 appears once, as itself


def test_fit_within_is_the_keep_aspect_fit_of_resize_max_size():
    """One formula for the three letterboxes: scale = min(H / h, W / w), sides rounded half to even."""
    sizes, scales = fit_within((480, 640), (1024, 1024))
    assert sizes.tolist() == [768, 1024] and scales.item() == 1.6
    # a batch of sizes at once, as the teacher's cells: 0.5 rounds to 0 then is clamped to 1, 1.5 rounds to 2
    sizes, scales = fit_within(torch.tensor([[4.0, 1.0], [4.0, 3.0], [2.0, 5.0], [300.0, 100.0]]), (2, 2))
    assert sizes.tolist() == [[2, 1], [2, 2], [1, 2], [2, 1]]
    assert scales.tolist() == [0.5, 0.5, 0.4, 2 / 300]
    # a non-square bound: the tighter side decides
    assert fit_within((100, 100), (50, 200))[0].tolist() == [50, 50]
    # centred: offsets floor((bound - size) / 2), as ResizeMaxSize's pad_h // 2, pad_w // 2 (4.5 rounds to 4)
    fitted, offsets = centred_letterbox(torch.tensor([[10.0, 20.0], [3.0, 5.0], [7.0, 7.0]]), (8, 9))
    assert fitted.tolist() == [[4, 9], [5, 9], [8, 8]] and offsets.tolist() == [[2, 0], [1, 0], [0, 0]]


def test_short_side_size_is_mmsegs_keep_ratio_resize():
    assert short_side_size(480, 640, 448, 2048) == (448, 597)
    assert short_side_size(4, 6, 3, 2048) == (3, 5)  # 4.5 rounds up, as mmseg's int(x + 0.5) (Python's round: 4)
    assert short_side_size(100, 10000, 100, 400) == (4, 400)  # the long side's cap wins
    with pytest.raises(ValueError, match="short_side must be positive, got 0"):
        short_side_size(10, 10, 0, 100)
