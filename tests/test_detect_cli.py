"""``denserc detect eval|draw`` and the Python API on an exported (untrained) tiny detector."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from denserc.cli import main
from denserc.detect import load
from denserc.detect.config import DetectConfig, TextConfig
from denserc.detect.detector import build_heads, build_tower, save_detector
from denserc.detect.model import DetectorConfig
from denserc.detect.protocols import OV_COCO_IDS, Split
from denserc.viz.draw import read_png_metadata

from test_detect_evaluation import _as_detections, _coco_ground_truth


def test_eval_scores_a_results_json_and_writes_the_report(tmp_path, capsys):
    ground_truth = _coco_ground_truth([{"id": cid, "name": name} for name, cid in OV_COCO_IDS.items()])
    (tmp_path / "gt.json").write_text(json.dumps(ground_truth))
    (tmp_path / "dets.json").write_text(json.dumps(_as_detections(ground_truth)))
    code = main(["detect", "eval", "--annotations", str(tmp_path / "gt.json"), "--detections",
                 str(tmp_path / "dets.json"), "--protocol", "ov-coco", "--out", str(tmp_path / "report.json")])
    assert code == 0
    assert "| dets.json | 100.0 | 100.0 | 100.0 |" in capsys.readouterr().out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["ap50_novel"] == report["ap50_base"] == report["ap50_all"] == pytest.approx(100.0)


def test_eval_with_a_detector_needs_images(tmp_path, capsys):
    code = main(["detect", "eval", "--annotations", "gt.json", "--detector", "d", "--protocol", "ov-coco"])
    assert code == 2
    assert "--detector needs --images" in capsys.readouterr().err


@pytest.fixture
def exported_detector(tmp_path, tiny_model):
    config = DetectConfig(model=DetectorConfig(taps=[0, 1, 2, 3], fpn_channels=16, head_fc=32, score_threshold=0.0),
                          text=TextConfig(templates=["a photo of {}."]))
    config.data.image_size = 96
    split = Split((1, 2, 3), ("cat", "dog", "kite"), (False, False, True))
    torch.manual_seed(0)
    heads = build_heads(config, tiny_model, split)
    return save_detector(tmp_path / "detector", tiny_model, heads, config, split)


def test_exported_detector_loads_and_predicts_any_class_names(exported_detector, tmp_path):
    detector = load(exported_detector)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (70, 120, 3), dtype=np.uint8))
    result = detector.predict(image, ["tram", "dog"])
    assert result["class_names"] == ["tram", "dog"]
    assert detector.model.heads.classifier.novel.tolist() == [True, False]  # dog was a base class
    assert len(result["boxes"]) > 0 and set(result["labels"].tolist()) <= {0, 1}
    assert result["boxes"][:, 2].max() <= 120 + 1e-4 and result["boxes"][:, 3].max() <= 70 + 1e-4


def test_draw_writes_a_png_with_the_detections_in_its_metadata(exported_detector, tmp_path, capsys):
    path = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    out = tmp_path / "out.png"
    code = main(["detect", "draw", str(path), "--detector", str(exported_detector), "--classes", "cat,dog",
                 "--min-score", "0", "-o", str(out), "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    metadata = read_png_metadata(out)
    assert metadata["classes"] == ["cat", "dog"] and len(metadata["detections"]) > 0
    assert Image.open(out).size == (64, 64)


@pytest.mark.slow
def test_eval_runs_a_detector_on_a_protocol_split(exported_detector, tmp_path, capsys):
    from denserc_testbed import write_split
    paths = write_split(tmp_path / "scenes", "val", 3, seed=11, progress=False)
    code = main(["detect", "eval", "--detector", str(exported_detector), "--annotations", str(paths["instances"]),
                 "--images", str(paths["images"]), "--protocol", "ov-testbed", "--device", "cpu",
                 "--out", str(tmp_path / "report.json"), "--save-detections", str(tmp_path / "dets.json")])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["num_images"] == 3 and {"ap50_novel", "ap50_base", "ap50_all"} <= report.keys()
    detections = json.loads((tmp_path / "dets.json").read_text())
    assert detections and {d["category_id"] for d in detections} <= set(range(1, 49))


def test_a_detector_on_an_eva_folder_saves_loads_and_predicts(tmp_path):
    """The EVA-02 path a new user takes after `denserc train eva02_b16_coco`: a DenseRC EVA folder as backbone."""
    import denserc
    torch.manual_seed(0)
    denserc.create_model("EVA02-Tiny-16", num_layers=2).save(tmp_path / "eva")
    config = DetectConfig(model=DetectorConfig(taps=[0, 1, 2, 3], fpn_channels=16, head_fc=32, score_threshold=0.0),
                          text=TextConfig(templates=["a photo of {}."]))
    config.backbone.model = str(tmp_path / "eva")
    tower = build_tower(config)
    split = Split((1, 2, 3), ("cat", "dog", "kite"), (False, False, True))
    detector = load(save_detector(tmp_path / "detector", tower, build_heads(config, tower, split), config, split))
    assert detector.model.tower.family == "EVA (timm Eva)" and detector.model.tower.config["construction"] == "multi-v"
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (70, 120, 3), dtype=np.uint8))
    assert len(detector.predict(image, ["tram", "dog"])["boxes"]) > 0
