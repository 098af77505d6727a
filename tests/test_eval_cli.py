"""`denserc eval region|seg` end to end on fixtures: the JSON report and the printed Markdown table."""
import json

import numpy as np
import pytest

from denserc.cli import main
from denserc.models import TABLE5_VARIANTS
from helpers import TINY
from eval_fixtures import grey_image, grey_levels, stripes, tiny_model, write_panoptic, \
    write_segmentation_dataset, write_templates


def _table(output: str) -> list[list[str]]:
    rows = [line for line in output.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]


def _common(tmp_path, out):
    templates = write_templates(tmp_path / "templates.txt", "a photo of {article} {}.")
    return ["--templates", str(templates), "--workers", "0", "--cache-dir", str(tmp_path / "cache"),
            "--out", str(out), "--no-progress", "--device", "cpu"]


@pytest.mark.slow
def test_seg_two_models_write_json_and_print_one_row_each(tmp_path, capsys):
    levels = grey_levels([0, 3])
    labels = [stripes(112, 144, [0, 3, 255], rows=32), stripes(112, 128, [3, 0], rows=32)]
    root = write_segmentation_dataset("ade20k", tmp_path / "ADEChallengeData2016", labels,
                                      [grey_image(label, levels) for label in labels])
    saved = tiny_model(seed=1).save(tmp_path / "model")
    out = tmp_path / "seg.json"
    code = main(["eval", "seg", "--model", TINY, "--model", str(saved), "--data", str(root),
                 "--short-side", "112", "--window", "112", "--stride", "56", *_common(tmp_path, out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert (report["task"], report["dataset"], report["world_size"]) == ("seg", "ade20k", 1)  # dataset detected
    results = report["results"]
    assert [r["model"] for r in results] == [TINY, str(saved)]
    for result in results:
        assert result["num_images"] == 2 and len(result["per_class"]) == 150
        assert result["protocol"]["short_side"] == 112 and result["protocol"]["logit_scale"] == 40.0
        assert result["config"] == {"model_name": TINY, "construction": "multi-v", "gating": "hsg", "num_layers": 3}
        pixels = {c: entry["pixels"] for c, entry in enumerate(result["per_class"]) if entry["pixels"]}
        assert pixels == {0: 32 * 144 + 16 * 144 + 48 * 128, 3: 32 * 144 + 64 * 128}  # the stripes, 255 ignored
        ious = [entry["IoU"] for entry in result["per_class"] if entry["IoU"] is not None]
        assert result["mIoU"] == pytest.approx(sum(ious) / len(ious))
        hits = sum(result["per_class"][c]["Acc"] * n for c, n in pixels.items())
        assert result["aAcc"] == pytest.approx(hits / sum(pixels.values()))
    table = _table(capsys.readouterr().out)
    assert table[0] == ["model", "construction", "gating", "L", "images", "mIoU", "mAcc", "aAcc"]
    assert table[1] == ["---"] * 8
    for row, result in zip(table[2:], results):
        assert row == [result["model"], "multi-v", "hsg", "3", "2",
                       *(f"{result[k]:.2f}" for k in ("mIoU", "mAcc", "aAcc"))]
    assert len(table) == 4


@pytest.mark.slow
def test_region_variants_give_one_row_per_table5_variant(tmp_path, capsys):
    ids = np.zeros((64, 96), np.int64)
    ids[:, :48], ids[:, 48:] = 1, 2
    label_map = np.where(ids == 1, 0, 80).astype(np.uint8)
    scenes = [(grey_image(label_map, grey_levels([0, 80])), ids, {1: 0, 2: 80})] * 2
    root = write_panoptic(tmp_path / "coco", scenes)
    saved = tiny_model().save(tmp_path / "model")
    out = tmp_path / "region.json"
    code = main(["eval", "region", "--model", str(saved), "--variants", "--data", str(root), "--image-size", "96",
                 "--limit", "1", *_common(tmp_path, out)])
    assert code == 0
    results = json.loads(out.read_text())["results"]
    assert [(r["config"]["construction"], r["config"]["gating"]) for r in results] == list(TABLE5_VARIANTS.values())
    assert [r["config"]["num_layers"] for r in results] == [1, 1, 3, 3, 3, 3]
    for result in results:
        assert result["num_images"] == 1 and result["image_size"] == 96 and result["templates"].endswith(".txt")
        assert result["boxes"]["segments"] == 2 and result["masks_stuff"]["segments"] == 1
    table = _table(capsys.readouterr().out)
    assert table[0] == ["model", "construction", "gating", "L", "images", "boxes top-1", "boxes top-5",
                        "thing masks top-1", "thing masks top-5", "stuff masks top-1", "stuff masks top-5"]
    assert [row[1:4] for row in table[2:]] == [[c, g, str(r["config"]["num_layers"])]
                                               for (c, g), r in zip(TABLE5_VARIANTS.values(), results)]
    assert table[2][5:] == [f"{results[0][key][stat]:.2f}" for key in ("boxes_thing", "masks_thing", "masks_stuff")
                            for stat in ("mean_top1", "mean_top5")]


def test_variants_reject_an_explicit_construction(tmp_path, capsys):
    assert main(["eval", "region", "--model", TINY, "--variants", "--gating", "qk", "--data", str(tmp_path),
                 "--device", "cpu", "--no-progress"]) == 1
    assert capsys.readouterr().err == ("denserc eval region: error: --variants sets construction and gating itself; "
                                       "drop --construction/--gating\n")


def test_seg_without_dataset_on_an_ambiguous_layout_asks_for_one(tmp_path, capsys):
    label = stripes(32, 32, [1, 2])
    root = write_segmentation_dataset("voc21", tmp_path / "VOC2012", [label], [grey_image(label, {})])
    assert main(["eval", "seg", "--model", TINY, "--data", str(root), "--device", "cpu", "--no-progress"]) == 1
    assert capsys.readouterr().err == (f"denserc eval seg: error: {root} has the layout of voc20 and voc21: choose one "
                                       "with --dataset\n")
