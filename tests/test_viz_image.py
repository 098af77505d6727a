"""Reading users' image files: odd modes become the RGB a viewer shows; bad files get clear errors."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from denserc.viz import ImageReadError, load_image
from denserc.viz.image import resized_size, to_model_input


def test_rgba_is_composited_on_white(tmp_path):
    pixels = np.zeros((4, 6, 4), dtype=np.uint8)
    pixels[..., 0] = 200                  # red everywhere ...
    pixels[:, :3, 3] = 255                # ... opaque on the left,
    pixels[:, 3:5, 3] = 0                 # transparent in the middle,
    pixels[:, 5, 3] = 128                 # half transparent at the right edge
    Image.fromarray(pixels, "RGBA").save(tmp_path / "a.png")
    image = load_image(tmp_path / "a.png")
    assert image.mode == "RGB" and image.size == (6, 4)
    rgb = np.asarray(image)
    assert (rgb[:, :3] == (200, 0, 0)).all()
    assert (rgb[:, 3:5] == (255, 255, 255)).all()
    assert np.abs(rgb[:, 5].astype(int) - (228, 127, 127)).max() <= 1  # 200*128/255 + 255*127/255


def test_grayscale_and_grayscale_with_alpha(tmp_path):
    gray = np.arange(24, dtype=np.uint8).reshape(4, 6) * 10
    Image.fromarray(gray, "L").save(tmp_path / "l.png")
    assert (np.asarray(load_image(tmp_path / "l.png")) == gray[..., None]).all()
    with_alpha = np.stack([gray, np.zeros_like(gray)], axis=-1)
    Image.fromarray(with_alpha, "LA").save(tmp_path / "la.png")
    assert (np.asarray(load_image(tmp_path / "la.png")) == 255).all()


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    rgb = np.asarray(load_image(tmp_path / "deep.png"))
    assert rgb[0, :, 0].tolist() == [0, 1, 128, 255]  # PIL's convert("L") would give 0, 255, 255, 255
    assert (rgb[..., 0] == rgb[..., 2]).all()


def test_palette_image_with_transparent_index(tmp_path):
    image = Image.new("P", (4, 2))
    image.putpalette([10, 20, 30, 90, 80, 70] + [0] * 762)
    image.putdata([0, 0, 1, 1, 0, 0, 1, 1])
    image.save(tmp_path / "p.png", transparency=1)
    rgb = np.asarray(load_image(tmp_path / "p.png"))
    assert (rgb[:, :2] == (10, 20, 30)).all() and (rgb[:, 2:] == 255).all()


def test_exif_rotated_jpeg_is_shown_upright(tmp_path):
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:, :20] = (230, 20, 20)   # left half red
    stored[:, 20:] = (20, 20, 230)   # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6                 # Orientation: rotate 90 degrees clockwise to display
    Image.fromarray(stored).save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    image = load_image(tmp_path / "phone.jpg")
    assert image.size == (20, 40)    # displayed portrait: width 20, height 40
    rgb = np.asarray(image).astype(int)
    assert np.abs(rgb[2:18, 2:18] - (230, 20, 20)).max() < 30   # the stored left half is now on top
    assert np.abs(rgb[22:38, 2:18] - (20, 20, 230)).max() < 30


def test_float_image_is_refused_by_name(tmp_path):
    Image.fromarray(np.ones((3, 3), dtype=np.float32) * 0.5, "F").save(tmp_path / "f.tif")
    with pytest.raises(ImageReadError, match=r"f\.tif: 32-bit float images are not supported"):
        load_image(tmp_path / "f.tif")


def test_missing_file_and_folder_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"image file not found: .*nope\.png"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(IsADirectoryError, match="is a folder; expected an image file"):
        load_image(tmp_path)


def test_unreadable_and_truncated_files(tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ImageReadError, match=r"cannot read .*notes\.png as an image: not a format Pillow recognises"):
        load_image(tmp_path / "notes.png")
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    (tmp_path / "cut.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageReadError, match=r"cut\.png as an image: the file is truncated or corrupt"):
        load_image(tmp_path / "cut.png")


def test_decompression_bomb_is_a_read_error(tmp_path, monkeypatch):
    Image.new("RGB", (30, 30)).save(tmp_path / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 900 pixels > 2 x the limit: Pillow refuses
    with pytest.raises(ImageReadError, match=r"cannot read .*huge\.png: Image size \(900 pixels\) exceeds"):
        load_image(tmp_path / "huge.png")


def test_resized_size_keeps_aspect_and_caps_panoramas():
    assert resized_size((400, 300), 448) == (597, 448)
    assert resized_size((300, 400), 448) == (448, 597)
    assert resized_size((50, 50), 448) == (448, 448)            # small images are enlarged
    assert resized_size((10000, 100), 100) == (400, 4)           # long side capped at 4x the short side
    with pytest.raises(ValueError, match="short_side must be positive"):
        resized_size((10, 10), 0)


def test_model_input_is_normalised_with_the_model_mean_and_std():
    image = Image.new("RGB", (30, 20), (51, 102, 204))
    cfg = {"mean": (0.2, 0.3, 0.4), "std": (0.5, 0.25, 0.1)}
    pixels = to_model_input(image, cfg, 40)
    assert pixels.shape == (1, 3, 40, 60)
    expected = torch.tensor([(0.2 - 0.2) / 0.5, (0.4 - 0.3) / 0.25, (0.8 - 0.4) / 0.1])
    torch.testing.assert_close(pixels[0, :, 17, 29], expected, atol=1e-5, rtol=0)
