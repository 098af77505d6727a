"""Evaluation inputs as a new user meets them (issue 16): wrong labels caught before the first image, truncated
images named or skipped, seeded random models, the text classifier's progress, finished rows kept."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from denserc.cli import main
from denserc.eval import build_text_classifier, evaluate_segmentation
from denserc.models import from_spec, get_tokenizer, random_weights
from helpers import TINY
from eval_fixtures import tiny_model, write_coco_stuff, write_templates

def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def test_raw_coco_stuff_labels_are_caught_before_the_first_image(tmp_path):
    root = write_coco_stuff(tmp_path / "coco_stuff164k", count=3, raw_value_in=2)
    # only image 0 is evaluated and its labels are all < 171; the check reads maps across the dataset anyway,
    # before the model is touched (None would fail at once)
    with pytest.raises(ValueError, match=r"000000000003_labelTrainIds\.png: label value\(s\) \[175\].*raw 0\.\.181 "
                                         r"numbering.*coco_stuff164k\.py"):
        evaluate_segmentation(None, None, root, "coco-stuff", limit=1, workers=0, progress=False)


def test_a_label_of_the_wrong_size_stops_the_run_before_the_first_image(tmp_path):
    root = write_coco_stuff(tmp_path / "coco_stuff164k", count=2)
    label = root / "annotations/val2017/000000000002_labelTrainIds.png"
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(label)
    with pytest.raises(ValueError, match=rf"{label}: label size \(10, 10\) differs from image"):
        evaluate_segmentation(None, None, root, "coco-stuff", workers=0, progress=False)


@pytest.mark.slow
def test_a_truncated_image_is_named_or_skipped_and_counted(tmp_path, capsys):
    root = write_coco_stuff(tmp_path / "coco_stuff164k", count=2)
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


@pytest.mark.slow
def test_a_later_model_failing_keeps_the_finished_rows(tmp_path, capsys):
    root = write_coco_stuff(tmp_path / "coco_stuff164k", count=1)
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
