"""Real data as a new user meets it (issue 16): one image loader everywhere, wrong inputs caught up front,
one-line errors, seeded random models, progress while the text classifier is built."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from denserc.cli import main
from denserc.data import SquareResize
from denserc.data.datasets import FileListSource
from denserc.eval import build_text_classifier, evaluate_segmentation, load_class_names, segmentation_layout
from denserc.eval.cli import MAX_DEFAULT_WORKERS
from denserc.eval.datasets import read_image
from denserc.images import ImageReadError, load_image
from denserc.models import from_spec, get_tokenizer, random_weights
from helpers import TINY
from eval_fixtures import grey_image, grey_levels, stripes, tiny_model, write_segmentation_dataset, \
    write_templates

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


# ------------------------------------------------------------------------------------ evaluation inputs
def _coco_stuff(root, count=3, raw_value_in=None):
    """COCO-Stuff fixture of ``count`` 32x48 images with classes 0 and 3; ``raw_value_in``: that image's label
    map also holds 175, a raw COCO-Stuff id (a 'wood' region) that the converted numbering does not have."""
    levels = grey_levels([0, 3])
    labels = [stripes(32, 48, [0, 3], rows=16) for _ in range(count)]
    if raw_value_in is not None:
        labels[raw_value_in][:4] = 175
    return write_segmentation_dataset("coco-stuff", root, labels, [grey_image(label, levels) for label in labels])


def test_raw_coco_stuff_labels_are_caught_before_the_first_image(tmp_path):
    root = _coco_stuff(tmp_path / "coco_stuff164k", count=3, raw_value_in=2)
    # only image 0 is evaluated and its labels are all < 171; the check reads maps across the dataset anyway,
    # before the model is touched (None would fail at once)
    with pytest.raises(ValueError, match=r"000000000003_labelTrainIds\.png: label value\(s\) \[175\].*raw 0\.\.181 "
                                         r"numbering.*coco_stuff164k\.py"):
        evaluate_segmentation(None, None, root, "coco-stuff", limit=1, workers=0, progress=False)


def test_a_label_of_the_wrong_size_stops_the_run_before_the_first_image(tmp_path):
    root = _coco_stuff(tmp_path / "coco_stuff164k", count=2)
    label = root / "annotations/val2017/000000000002_labelTrainIds.png"
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(label)
    with pytest.raises(ValueError, match=rf"{label}: label size \(10, 10\) differs from image"):
        evaluate_segmentation(None, None, root, "coco-stuff", workers=0, progress=False)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


@pytest.mark.slow
def test_a_truncated_image_is_named_or_skipped_and_counted(tmp_path, capsys):
    root = _coco_stuff(tmp_path / "coco_stuff164k", count=2)
    broken = root / "images/val2017/000000000002.jpg"
    _truncate(broken)
    templates = write_templates(tmp_path / "t.txt", "{}")
    common = ["eval", "seg", "--model", TINY, "--data", str(root), "--dataset", "coco_stuff", "--templates",
              str(templates), "--short-side", "32", "--window", "32", "--stride", "16", "--workers", "0",
              "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--device", "cpu"]
    assert main([*common, "--out", str(tmp_path / "a.json")]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith(f"denserc eval seg: error: cannot read {broken} as an image: the file is truncated")
    assert error[-1].endswith("count this one as skipped)") and "--skip-unreadable" in error[-1]
    assert "Traceback" not in "\n".join(error)
    assert not (tmp_path / "a.json").exists()

    assert main([*common, "--skip-unreadable", "--out", str(tmp_path / "b.json")]) == 0
    result = json.loads((tmp_path / "b.json").read_text())["results"][0]
    assert (result["num_images"], result["unreadable_images"]) == (1, 1)
    assert (result["random_weights"], result["seed"]) == (True, 0)
    out = capsys.readouterr().out
    assert f"{TINY}: random weights (seed 0)" in out and "1 unreadable image(s) skipped" in out


def test_random_weights_are_seeded():
    assert random_weights(TINY) and not random_weights(f"{TINY}:some-tag")
    first = from_spec(TINY, seed=3).state_dict()
    torch.rand(100)  # whatever ran before does not matter
    second = from_spec(TINY, seed=3).state_dict()
    other = from_spec(TINY, seed=4).state_dict()
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert not all(torch.equal(first[key], other[key]) for key in first)


def test_text_classifier_says_what_it_embeds_and_that_it_is_cached(tmp_path, capsys):
    model, tokenizer = tiny_model(), get_tokenizer(TINY)
    names, templates = [["cat"], ["dog", "puppy"]], ["a photo of a {}.", "{}"]
    build_text_classifier(model, tokenizer, names, templates, cache_dir=tmp_path, progress=True)
    err = capsys.readouterr().err
    assert err.startswith(f"text classifier: embedding 6 prompts (3 names x 2 templates) with the text tower, "
                          f"once; cached in {tmp_path} for later runs\n")
    assert "100%" in err  # the bar over the batches of names
    build_text_classifier(model, tokenizer, names, templates, cache_dir=tmp_path, progress=True)
    assert capsys.readouterr().err == ""  # read from the cache: nothing to wait for


# ---------------------------------------------------------------------------------------- command line
def test_dataset_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    argv = ["eval", "seg", "--model", TINY, "--data", str(missing), "--no-progress"]
    assert main(argv) == 1
    assert capsys.readouterr().err == f"denserc eval seg: error: dataset folder {missing} does not exist\n"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main([*argv, "--debug"])
    assert main(argv[:-1]) == 1  # with progress on, a first line comes before torch is imported
    assert capsys.readouterr().err.splitlines() == [f"denserc eval seg: loading {TINY} (torch, open_clip)...",
                                                    f"denserc eval seg: error: dataset folder {missing} does not exist"]


def test_class_count_mismatch_is_one_line(tmp_path, capsys):
    root = _coco_stuff(tmp_path / "coco_stuff164k", count=1)
    assert main(["eval", "seg", "--model", TINY, "--data", str(root), "--class-names", "voc20", "--workers", "0",
                 "--no-progress", "--device", "cpu"]) == 1
    note, error = capsys.readouterr().err.splitlines()
    assert note.startswith(f"note: {TINY} has random weights")
    assert error == "denserc eval seg: error: COCO-Stuff-171 has 171 classes but the class-name list 'voc20' has 20"


def test_both_spellings_of_coco_stuff_are_accepted():
    assert segmentation_layout("coco_stuff").name == segmentation_layout("coco-stuff").name == "coco-stuff"
    assert load_class_names("coco-stuff") == load_class_names("coco_stuff")
    assert len(load_class_names("coco-stuff")) == 171


def test_workers_default_to_the_cores_this_process_may_use(tmp_path):
    from denserc.cli import build_parser
    args = build_parser().parse_args(["eval", "seg", "--model", TINY, "--data", str(tmp_path)])
    assert args.workers == min(MAX_DEFAULT_WORKERS, len(os.sched_getaffinity(0)))
    assert "--templates simple" in build_parser()._subparsers._group_actions[0].choices["eval"] \
        ._subparsers._group_actions[0].choices["seg"].format_help().replace("\n", " ").replace("  ", " ")


@pytest.mark.slow
def test_segment_says_it_created_the_output_folder(tmp_path, capsys):
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(photo)
    out = tmp_path / "new" / "deeper" / "s.png"
    assert main(["segment", str(photo), "--classes", "a,b", "-o", str(out), "--model", TINY,
                 "--short-side", "64", "--window", "64"]) == 0
    assert out.is_file()
    assert capsys.readouterr().out.splitlines()[0].endswith(f"(created folder {out.parent})")


def test_help_and_argument_errors_load_no_torch():
    """A fresh interpreter: `denserc --help`, a command's help and an argument error import neither torch nor
    open_clip, timm or matplotlib (they take seconds to import; the commands load them when they run)."""
    code = "\n".join([
        "import sys",
        "from denserc.cli import main",
        "for argv in (['--help'], ['eval', 'seg', '--help'], ['segment', '--help'], ['testbed', '--help'],",
        "             ['train', '--help'], ['eval', 'seg'], ['segment', 'x.png'], ['heatmap', '--bogus']):",
        "    try:",
        "        main(argv)",
        "    except SystemExit:",
        "        pass",
        "print(sorted(m for m in ('torch', 'open_clip', 'timm', 'matplotlib') if m in sys.modules))",
    ])
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
    assert "the following arguments are required: --model, --data" in result.stderr
    assert "testbed-probe" in result.stdout  # the plug-ins' commands are listed all the same


def test_eval_help_names_every_bundled_dataset():
    from denserc.eval import SEGMENTATION_DATASETS
    from denserc.cli import build_parser
    bundled = sorted(name for name, layout in SEGMENTATION_DATASETS.items()
                     if layout.list_pairs.__module__ == "denserc.eval.datasets")
    seg = build_parser()._subparsers._group_actions[0].choices["eval"]._subparsers._group_actions[0].choices["seg"]
    assert f"dataset name: {', '.join(bundled)} (docs/evaluation.md)" in " ".join(seg.format_help().split())


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


@pytest.mark.slow
def test_a_later_model_failing_keeps_the_finished_rows(tmp_path, capsys):
    root = _coco_stuff(tmp_path / "coco_stuff164k", count=1)
    out = tmp_path / "r.json"
    templates = write_templates(tmp_path / "t.txt", "{}")
    assert main(["eval", "seg", "--model", TINY, "--model", "ViT-Nope", "--data", str(root), "--templates",
                 str(templates), "--short-side", "32", "--window", "32", "--workers", "0", "--no-progress",
                 "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--out", str(out)]) == 1
    report = json.loads(out.read_text())
    assert [row["model"] for row in report["results"]] == [TINY] and report["results"][0]["num_images"] == 1
    assert "'ViT-Nope' is neither a folder" in report["incomplete"]
    err = capsys.readouterr().err
    assert f"wrote the 1 finished row(s) to {out} before the error below" in err
    assert err.splitlines()[-1].startswith("denserc eval seg: error: model spec 'ViT-Nope' is neither a folder")
