"""`denserc segment` / `denserc heatmap` end to end: files written, every kind of model, every error."""
import numpy as np
import open_clip
import pytest
from PIL import Image
from safetensors.torch import save_file

import denserc
from denserc.cli import main
from denserc.viz import draw
from denserc_testbed.plugin import DEFAULT_MODEL

from helpers import TINY

CLASSES = ["dog", "grass", "sky"]
FAST = ["--short-side", "112", "--window", "112"]  # a handful of small windows per image: fast on a CPU


@pytest.fixture
def photo(tmp_path):
    """An odd-sized RGB photo (123 x 77)."""
    pixels = np.random.default_rng(0).integers(0, 256, (77, 123, 3), dtype=np.uint8)
    path = tmp_path / "photo.png"
    Image.fromarray(pixels).save(path)
    return path


def test_segment_writes_an_overlay_of_the_input_size_and_the_label_maps(photo, tmp_path, capsys):
    out = tmp_path / "out" / "seg.png"
    code = main(["segment", str(photo), "--classes", " dog, grass,sky ", "-o", str(out), *FAST,
                 "--labels", str(tmp_path / "labels.npy")])
    assert code == 0
    assert Image.open(out).size == (123, 77)
    metadata = draw.read_png_metadata(out)
    assert metadata["classes"] == CLASSES and [e["name"] for e in metadata["legend"]] == CLASSES
    assert sum(e["fraction"] for e in metadata["legend"]) == pytest.approx(1.0)
    labels = np.load(tmp_path / "labels.npy")
    assert labels.shape == (77, 123) and labels.dtype == np.uint8 and labels.max() < 3
    assert main(["segment", str(photo), "--classes", "dog,grass,sky", "-o", str(out), *FAST,
                 "--labels", str(tmp_path / "labels.png")]) == 0
    as_png = Image.open(tmp_path / "labels.png")
    assert as_png.mode == "L" and (np.asarray(as_png) == labels).all()  # same seed, same random model
    assert draw.read_png_metadata(tmp_path / "labels.png") == {"classes": CLASSES}
    assert f"wrote {out} (123x77): dog " in capsys.readouterr().out


def test_heatmap_writes_a_picture_of_the_input_size_and_the_scores(photo, tmp_path, capsys):
    out = tmp_path / "heat.png"
    assert main(["heatmap", str(photo), "--query", "a red umbrella", "-o", str(out), *FAST,
                 "--scores", str(tmp_path / "scores.npy")]) == 0
    assert Image.open(out).size == (123, 77)
    scores = np.load(tmp_path / "scores.npy")
    assert scores.shape == (77, 123) and scores.dtype == np.float32
    metadata = draw.read_png_metadata(out)
    assert metadata["query"] == "a red umbrella"
    assert (metadata["vmin"], metadata["vmax"]) == pytest.approx((scores.min(), scores.max()), abs=1e-6)
    assert "cosine similarity" in capsys.readouterr().out


@pytest.mark.slow
def test_default_output_names_and_model(photo, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["segment", str(photo), "--classes", "a,b", *FAST]) == 0
    assert main(["heatmap", str(photo), "--query", "a", *FAST]) == 0
    assert (tmp_path / "photo_segment.png").is_file() and (tmp_path / "photo_heatmap.png").is_file()
    assert draw.read_png_metadata(tmp_path / "photo_segment.png")["model"] == DEFAULT_MODEL
    assert "random weights" not in capsys.readouterr().err  # the default is the shipped testbed CLIP
    assert main(["segment", str(photo), "--classes", "a,b", "--model", "ViT-Tiny-16", *FAST]) == 0
    assert "note: ViT-Tiny-16 has random weights" in capsys.readouterr().err


@pytest.mark.parametrize("make", ["rgba", "gray16", "exif"])
def test_odd_image_modes_give_a_picture_of_the_displayed_size(tmp_path, make):
    path = tmp_path / f"{make}.png"
    if make == "rgba":
        Image.new("RGBA", (100, 60), (200, 10, 10, 90)).save(path)
        shown = (100, 60)
    elif make == "gray16":
        Image.fromarray(np.linspace(0, 65535, 90 * 70).reshape(70, 90).astype(np.uint16)).save(path)
        shown = (90, 70)
    else:
        path = tmp_path / "phone.jpg"
        exif = Image.Exif()
        exif[0x0112] = 8  # rotate 90 degrees counter-clockwise to display
        Image.new("RGB", (100, 70), (10, 150, 10)).save(path, exif=exif.tobytes())
        shown = (70, 100)
    assert main(["segment", str(path), "--classes", "dog,grass", "-o", str(tmp_path / "s.png"), *FAST,
                 "--labels", str(tmp_path / "l.npy")]) == 0
    assert Image.open(tmp_path / "s.png").size == shown
    assert np.load(tmp_path / "l.npy").shape == shown[::-1]


@pytest.mark.slow
def test_plain_open_clip_weights_a_denserc_folder_and_variants(photo, tmp_path):
    """NAME:FILE (a plain open_clip checkpoint), a saved DenseRC folder, and ablation switches; the CLI's
    label map equals the Python API's on the same model."""
    weights = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in open_clip.create_model(TINY).state_dict().items()}, str(weights))
    folder = tmp_path / "denserc"
    denserc.create_model(TINY, pretrained=weights, gating="qq").save(folder)
    runs = {"file": [f"{TINY}:{weights}"], "folder": [str(folder)],
            "variant": [str(folder), "--construction", "x+v", "--gating", "none"],
            "multi": [f"{TINY}:{weights}", "--num-layers", "2", "--gating", "qk"]}
    for name, model_args in runs.items():
        labels = tmp_path / f"{name}.npy"
        assert main(["segment", str(photo), "--classes", ",".join(CLASSES), "--model", *model_args,
                     "-o", str(tmp_path / f"{name}.png"), *FAST, "--labels", str(labels)]) == 0, name
    fast = dict(short_side=112, window=112)
    from_api = denserc.segment(denserc.load(folder).eval(), photo, CLASSES, **fast)
    assert (np.load(tmp_path / "folder.npy") == from_api.numpy()).all()
    variant = denserc.load(folder, construction="x+v", gating="none").eval()
    assert (np.load(tmp_path / "variant.npy") == denserc.segment(variant, photo, CLASSES, **fast).numpy()).all()


def test_seed_fixes_a_random_weight_model(photo, tmp_path):
    outputs = []
    for seed in ("0", "0", "1"):
        path = tmp_path / f"scores{len(outputs)}.npy"
        assert main(["heatmap", str(photo), "--query", "dog", "-o", str(tmp_path / "h.png"), *FAST, "--seed", seed,
                     "--model", "ViT-Tiny-16", "--scores", str(path)]) == 0
        outputs.append(np.load(path))
    assert np.array_equal(outputs[0], outputs[1]) and not np.array_equal(outputs[0], outputs[2])


@pytest.mark.parametrize("args, code, message", [
    (["segment", "{missing}", "--classes", "a,b"], 1, "image file not found: {missing}"),
    (["segment", "{notes}", "--classes", "a,b"], 1, "cannot read {notes} as an image: not a format Pillow"),
    (["heatmap", "{folder}", "--query", "a"], 1, "is a folder; expected an image file"),
    (["segment", "{photo}", "--classes", "dog"], 1, "needs at least two classes to choose between"),
    (["segment", "{photo}", "--classes", "dog,,sky"], 1, "has an empty class name"),
    (["segment", "{photo}", "--classes", "dog,sky,dog"], 1, "lists a class twice"),
    (["segment", "{photo}", "--classes", "a,b", "-o", "x.jpg"], 1, "-o x.jpg must end in .png"),
    (["segment", "{photo}", "--classes", "a,b", "--labels", "x.txt"], 1, "--labels x.txt must end in .npy or .png"),
    (["heatmap", "{photo}", "--query", " "], 1, "--query is empty"),
    (["heatmap", "{photo}", "--query", "a", "--scores", "x.png"], 1, "--scores x.png must end in .npy"),
    (["heatmap", "{photo}", "--query", "a", "--vmin", "1", "--vmax", "0"], 1, "--vmax 0.0 is below --vmin 1.0"),
    (["segment", "{photo}", "--classes", "a,b", "--alpha", "1.5"], 1, "--alpha must be in [0, 1], got 1.5"),
    (["segment", "{photo}", "--classes", "a,b", "--model", "NoSuchNet"], 1,
     "model spec 'NoSuchNet' is neither a folder"),
])
def test_errors_are_one_clear_line(photo, tmp_path, capsys, args, code, message):
    """Every bad input, a wrong argument or a failure while running, is one line and exit code 1 (cli.main)."""
    (tmp_path / "notes.png").write_text("hello")
    names = {"missing": tmp_path / "missing.png", "notes": tmp_path / "notes.png", "folder": tmp_path,
             "photo": photo}
    args = [a.format(**names) for a in args]
    assert main([*args, *FAST]) == code
    err = capsys.readouterr().err
    assert f"denserc {args[0]}: error: " in err and message.format(**names) in err
    assert "Traceback" not in err


def test_non_positive_sizes_are_refused_by_argparse(photo, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["segment", str(photo), "--classes", "a,b", "--window", "0"])
    assert exit_info.value.code == 2
    assert "--window: must be a positive integer, got 0" in capsys.readouterr().err


def test_commands_are_listed_in_the_top_level_help(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "segment" in out and "heatmap" in out
