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
from denserc.detect.protocols import COCO_IDS, OV_COCO_IDS, Split
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
    assert code == 1
    assert "--detector needs --images" in capsys.readouterr().err


@pytest.fixture
def exported_detector(tmp_path, tiny_model):
    config = DetectConfig(detector=DetectorConfig(taps=[0, 1, 2, 3], fpn_channels=16, head_fc=32, score_threshold=0.0),
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


def test_a_detector_exported_by_an_earlier_version_loads_as_written(exported_detector):
    """Old detector.json keys: ``format``, the heads' section called ``model``, no data.mean/std (the tower's
    own normalisation)."""
    meta_path = exported_detector / "detector.json"
    meta = json.loads(meta_path.read_text())
    meta["format"] = meta.pop("format_version")
    meta["config"]["model"] = meta["config"].pop("detector")
    del meta["config"]["data"]["mean"], meta["config"]["data"]["std"]
    expected = load(exported_detector).config
    meta_path.write_text(json.dumps(meta))
    config = load(exported_detector).config
    assert config.detector == expected.detector and (config.data.mean, config.data.std) == (None, None)


def test_a_folder_without_the_detectors_files_is_refused_by_name(exported_detector):
    (exported_detector / "heads.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"is not a detector folder: missing heads.safetensors \(expected "
                                                r"detector.json, heads.safetensors, tower written by `denserc detect train`\)"):
        load(exported_detector)


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
    config = DetectConfig(detector=DetectorConfig(taps=[0, 1, 2, 3], fpn_channels=16, head_fc=32, score_threshold=0.0),
                          text=TextConfig(templates=["a photo of {}."]))
    config.backbone.model = str(tmp_path / "eva")
    tower = build_tower(config)
    split = Split((1, 2, 3), ("cat", "dog", "kite"), (False, False, True))
    detector = load(save_detector(tmp_path / "detector", tower, build_heads(config, tower, split), config, split))
    assert detector.model.tower.family == "EVA (timm Eva)" and detector.model.tower.config["construction"] == "multi-v"
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (70, 120, 3), dtype=np.uint8))
    assert len(detector.predict(image, ["tram", "dog"])["boxes"]) > 0


@pytest.fixture
def coco_images(tmp_path):
    """Two images of a COCO-named file (80 classes) with one person each."""
    folder = tmp_path / "val2017"
    folder.mkdir()
    rng = np.random.default_rng(2)
    for image_id in (1, 2):
        Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(folder / f"{image_id}.png")
    ground_truth = {"images": [{"id": i, "file_name": f"{i}.png", "height": 60, "width": 80} for i in (1, 2)],
                    "annotations": [{"id": i, "image_id": i, "category_id": 1, "bbox": [10, 10, 30, 20], "area": 600,
                                     "iscrowd": 0} for i in (1, 2)],
                    "categories": [{"id": cid, "name": name} for name, cid in COCO_IDS.items()]}
    (tmp_path / "instances_val2017.json").write_text(json.dumps(ground_truth))
    return tmp_path / "instances_val2017.json", folder


def _record_settings(detector, seen):
    detect = detector.detect

    def recording(batch, with_masks=True):
        config = detector.model.heads.config
        seen.append((config.alpha, config.clip_temperature, config.fixed_temperature, with_masks))
        return detect(batch, with_masks=with_masks)
    detector.detect = recording


def test_transfer_protocols_run_with_clipselfs_transfer_head_settings_then_restore(exported_detector, coco_images):
    from denserc.detect.validation import evaluate_detector
    detector, seen = load(exported_detector), []
    _record_settings(detector, seen)
    report, _ = evaluate_detector(detector, *coco_images, "coco", progress=False)
    assert seen == [(0.2, 120.0, 50.0, False)] and {"ap", "ap50", "ap75"} <= report.keys()
    assert detector.model.heads.classifier.novel.sum() == 0  # all 80 classes scored as seen (alpha)
    config = detector.model.heads.config
    assert (config.alpha, config.clip_temperature, config.fixed_temperature) == (0.1, 75.0, None)  # restored
    evaluate_detector(detector, *coco_images, "coco", progress=False, settings={"alpha": 0.5})
    assert seen[-1][0] == 0.5
    with pytest.raises(ValueError, match=r"detector.taps: not an inference setting"):
        with detector.settings(taps=[0, 1, 2, 3]):
            pass
    with pytest.raises(ValueError, match=r"inference settings \{'alpha': 'high'\}"):
        with detector.settings(alpha="high"):
            pass


def test_eval_command_takes_inference_overrides_with_a_detector_only(exported_detector, coco_images, tmp_path,
                                                                     capsys, monkeypatch):
    from denserc.detect import detector as detector_module
    seen, loaded = [], detector_module.load

    def load_recording(folder, device="cpu"):
        detector = loaded(folder, device)
        _record_settings(detector, seen)
        return detector
    monkeypatch.setattr(detector_module, "load", load_recording)
    annotations, images = coco_images
    code = main(["detect", "eval", "--detector", str(exported_detector), "--annotations", str(annotations),
                 "--images", str(images), "--protocol", "coco", "--device", "cpu", "detector.alpha=0.25",
                 "detector.fixed_temperature=null"])
    assert code == 0, capsys.readouterr().err
    assert seen == [(0.25, 120.0, None, False)] and "| model | AP | AP50 | AP75 |" in capsys.readouterr().out
    code = main(["detect", "eval", "--detector", str(exported_detector), "--annotations", str(annotations),
                 "--images", str(images), "--protocol", "coco", "alpha=0.25"])
    assert code == 1 and "'alpha=0.25': expected detector.KEY=VALUE" in capsys.readouterr().err
    code = main(["detect", "eval", "--detections", "d.json", "--annotations", str(annotations), "--protocol", "coco",
                 "detector.alpha=0.25"])
    assert code == 1 and "detector.KEY=VALUE go with --detector" in capsys.readouterr().err


def test_inputs_are_normalised_as_the_peer_config_and_old_exports_keep_the_towers(exported_detector, tiny_model):
    from denserc.detect.config import DetectDataConfig, load_detect_config
    from denserc.detect.data import normalisation
    mean, std = normalisation(DetectDataConfig(), tiny_model)
    assert [round(255 * m, 3) for m in mean] == [123.675, 116.28, 103.53]  # img_norm_cfg of CLIPSelf's configs
    assert [round(255 * s, 3) for s in std] == [58.395, 57.12, 57.375]
    assert load_detect_config("fvit_testbed").data.mean == pytest.approx(mean)
    assert normalisation(DetectDataConfig(mean=None, std=None), tiny_model) == (
        list(tiny_model.preprocess_cfg["mean"]), list(tiny_model.preprocess_cfg["std"]))
    assert load(exported_detector).config.data.mean == pytest.approx(mean)
    meta_path = exported_detector / "detector.json"
    meta = json.loads(meta_path.read_text())
    del meta["config"]["data"]["mean"], meta["config"]["data"]["std"]  # written before the setting existed
    meta_path.write_text(json.dumps(meta))
    assert load(exported_detector).config.data.mean is None


def test_class_embeddings_show_progress_once_and_come_from_the_cache_after(tiny_model, tmp_path, monkeypatch, capsys):
    from denserc.detect.detector import class_embeddings
    from denserc.eval import text
    monkeypatch.setenv("DENSERC_CACHE", str(tmp_path))
    calls = []
    real = text.build_zero_shot_classifier
    monkeypatch.setattr(text, "build_zero_shot_classifier", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = class_embeddings(tiny_model, ["cat", "dog"], ["a photo of {}.", "a {} in the scene."])
    assert "embedding 4 prompts (2 names x 2 templates)" in capsys.readouterr().err
    again = class_embeddings(tiny_model, ["cat", "dog"], ["a photo of {}.", "a {} in the scene."])
    assert len(calls) == 1 and torch.equal(first, again) and capsys.readouterr().err == ""
    assert len(list((tmp_path / "text").glob("*.safetensors"))) == 1
