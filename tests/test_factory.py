"""Creating, saving and loading models; the error cases users hit first."""
import hashlib
import json
import time

import open_clip
import pytest
import torch
from safetensors.torch import save_file

import denserc
from denserc.models import UnsupportedModelError, factory, hub, serialization

from helpers import TINY, isolate_open_clip_configs, randomize_


def test_save_load_round_trip_is_identical(tmp_path, images):
    model = denserc.create_model(TINY, num_layers=2).eval()
    randomize_(model.gate, seed=5)
    model.save(tmp_path / "out")
    loaded = denserc.load(tmp_path / "out").eval()
    assert loaded.config == {"model_name": TINY, "construction": "multi-v", "gating": "hsg", "num_layers": 2}
    assert torch.equal(loaded.encode_dense(images), model.encode_dense(images))
    assert torch.equal(loaded.encode_image(images), model.encode_image(images))


def test_saved_folder_is_an_open_clip_model(tmp_path, images):
    model = denserc.create_model(TINY).eval()
    model.save(tmp_path)
    plain = open_clip.create_model(f"local-dir:{tmp_path}").eval()
    assert torch.equal(plain.encode_image(images), model.encode_image(images))
    by_path = open_clip.create_model(TINY, pretrained=str(tmp_path / serialization.CLIP_WEIGHTS)).eval()
    assert torch.equal(by_path.encode_image(images), model.encode_image(images))
    tokens = denserc.get_tokenizer(tmp_path)(["a cat"])
    assert torch.equal(tokens, open_clip.get_tokenizer(TINY)(["a cat"]))


def test_load_with_other_variant_keeps_clip_weights(tmp_path, images):
    model = denserc.create_model(TINY).eval()
    model.save(tmp_path)
    as_v = denserc.load(tmp_path, construction="v", gating="none").eval()
    assert (as_v.construction, as_v.gating, as_v.num_layers, as_v.gate) == ("v", "none", 1, None)
    assert torch.equal(as_v.encode_image(images), model.encode_image(images))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_pretrained_path_loads_plain_open_clip_checkpoints(tmp_path, images, suffix):
    reference = open_clip.create_model(TINY).eval()
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pt":
        torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, path)
    else:
        save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    model = denserc.create_model(TINY, pretrained=path).eval()
    assert torch.equal(model.encode_image(images), reference.encode_image(images))


def test_openai_weights_from_a_hub_cache_file_under_a_gelu_name_are_refused(tmp_path):
    """open_clip's 'openai' tag sets QuickGELU; the same weights as a file under 'ViT-B-16' would build GELU."""
    snapshot = tmp_path / "models--timm--vit_base_patch16_clip_224.openai" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    path = snapshot / "open_clip_model.safetensors"
    path.write_bytes(b"not read: refused before loading")
    with pytest.raises(ValueError, match=r"is the 'openai' release of ViT-B-16, trained with QuickGELU, but "
                                         r"'ViT-B-16' builds GELU .*load it as 'ViT-B-16-quickgelu'"):
        denserc.create_model("ViT-B-16", pretrained=path)
    # a GELU release of the same architecture (LAION's) and any other folder pass the check
    laion = tmp_path / "models--laion--CLIP-ViT-B-16-laion2B-s34B-b88K" / "open_clip_model.safetensors"
    laion.parent.mkdir()
    laion.write_bytes(b"")
    config = open_clip.get_model_config("ViT-B-16")
    factory._refuse_quick_gelu_release_without_quick_gelu("ViT-B-16", config, str(laion))
    factory._refuse_quick_gelu_release_without_quick_gelu("ViT-B-16-quickgelu",
                                                          open_clip.get_model_config("ViT-B-16-quickgelu"), str(path))


def test_a_quick_gelu_release_is_recognised_by_the_sha256_in_its_url(tmp_path, monkeypatch, images):
    """OpenAI's download URLs carry the file's SHA-256: a renamed copy anywhere is still recognised."""
    reference = open_clip.create_model(TINY).eval()
    path = tmp_path / "renamed.pt"
    torch.save(reference.state_dict(), path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, TINY,
                        {"openai": {"url": f"https://example.invalid/clip/{digest}/{TINY}.pt", "quick_gelu": True}})
    with pytest.raises(ValueError, match=rf"renamed.pt is the 'openai' release of {TINY}, trained with QuickGELU.*"
                                         r"register a model config with \"quick_gelu\": true"):
        denserc.create_model(TINY, pretrained=path)
    other = tmp_path / "other.pt"
    torch.save(reference.state_dict() | {"logit_scale": torch.tensor(1.0)}, other)  # other bytes: loads
    assert torch.equal(denserc.create_model(TINY, pretrained=other).eval().encode_image(images),
                       reference.encode_image(images))


def test_checkpoint_of_another_model_names_the_first_mismatching_key(tmp_path):
    state = open_clip.create_model(TINY).state_dict()
    state["visual.conv1.weight"] = torch.zeros(64, 3, 32, 32)
    path = tmp_path / "wrong.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(ValueError, match=r"key 'visual.conv1.weight' has shape \(64, 3, 32, 32\) but the "
                                         r"model expects \(64, 3, 16, 16\)"):
        denserc.create_model(TINY, pretrained=path)


def test_saved_folder_with_wrong_shapes_names_the_key(tmp_path):
    model = denserc.create_model(TINY)
    model.save(tmp_path)
    bad = dict(model.gate.state_dict())
    bad["linear.weight"] = torch.zeros(8, 64)
    save_file(bad, str(tmp_path / serialization.GATE_WEIGHTS))
    with pytest.raises(ValueError, match=r"key 'linear.weight' has shape \(8, 64\)"):
        denserc.load(tmp_path)
    state = {k: v.contiguous() for k, v in model.clip.state_dict().items() if k != "logit_scale"}
    save_file(state, str(tmp_path / serialization.CLIP_WEIGHTS))
    with pytest.raises(ValueError, match="missing key 'logit_scale'"):
        denserc.load(tmp_path)


def test_load_errors_name_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing denserc_config.json"):
        denserc.load(tmp_path)
    denserc.create_model(TINY).save(tmp_path)
    (tmp_path / serialization.DENSERC_CONFIG).write_text(json.dumps({"format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99 is not supported"):
        denserc.load(tmp_path)


def test_pretrained_spec_errors(tmp_path):
    with pytest.raises(ValueError, match="neither a file nor a pretrained tag"):
        denserc.create_model("ViT-B-16", pretrained="no-such-tag")
    with pytest.raises(ValueError, match="is a folder"):
        denserc.create_model(TINY, pretrained=tmp_path)
    with pytest.raises(ValueError, match="unknown open_clip model 'ViT-Nope'"):
        denserc.create_model("ViT-Nope")


def test_offline_pretrained_tag_fails_fast_with_a_way_out(monkeypatch):
    monkeypatch.setattr(hub, "reachable", lambda host, timeout=3.0: False)
    monkeypatch.setenv("HF_HOME", "/nonexistent-denserc-test-cache")
    start = time.monotonic()
    with pytest.raises(RuntimeError) as error:
        denserc.create_model("ViT-B-16", pretrained="openai")
    assert time.monotonic() - start < 10
    message, spec = str(error.value), "ViT-B-16-quickgelu:/path/to/open_clip_model.safetensors"
    assert "unreachable (offline)" in message
    # each command's own way of naming a weights file (denserc train, detect train and catseg train take no --model)
    for hint in ("denserc train ... model.name=ViT-B-16-quickgelu model.pretrained=/path/to/open_clip_model.safetensors",
                 f"denserc detect train ... backbone.model={spec}", f"denserc catseg train ... clip.model={spec}",
                 f"--model {spec}` for eval, segment and heatmap",
                 "denserc.create_model('ViT-B-16-quickgelu', pretrained='/path/to/open_clip_model.safetensors')"):
        assert hint in message, hint


def test_hub_offline_mode_set_by_the_user_fails_fast_without_probing(monkeypatch):
    from huggingface_hub import constants

    def no_probe(host, timeout=3.0):
        raise AssertionError("the network was probed although HF_HUB_OFFLINE is set")
    monkeypatch.setattr(hub, "reachable", no_probe)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", "/nonexistent-denserc-test-cache")
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"in offline mode \(HF_HUB_OFFLINE\).*pretrained='/path/to/"):
        denserc.create_model("ViT-B-16", pretrained="openai")
    assert time.monotonic() - start < 10


def test_unreachable_hub_switches_the_hub_offline_for_the_download_only(monkeypatch):
    from huggingface_hub import constants
    kept = dict(host="example.org", what="x", remedy="y")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "reachable", lambda host, timeout=3.0: False)
    assert hub.download(constants.is_offline_mode, **kept) is True
    assert constants.HF_HUB_OFFLINE is False
    monkeypatch.setattr(hub, "reachable", lambda host, timeout=3.0: True)
    assert hub.download(constants.is_offline_mode, **kept) is False
    with pytest.raises(RuntimeError, match=r"cannot get pretrained weights x: download failed: OSError: boom. y"):
        hub.download(lambda: (_ for _ in ()).throw(OSError("boom")), **kept)


@pytest.mark.parametrize("vision_cfg,kind", [
    ({"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "head_width": 16}, "ModifiedResNet"),
    ({"image_size": 64, "timm_model_name": "convnext_atto", "timm_model_pretrained": False,
      "timm_pool": "avg", "timm_proj": "linear"}, "TimmModel"),
])
def test_towers_that_cannot_be_decomposed_are_rejected(tmp_path, monkeypatch, vision_cfg, kind):
    isolate_open_clip_configs(monkeypatch)
    name = f"Tiny-{kind}"
    config = {"embed_dim": 32, "vision_cfg": vision_cfg,
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / f"{name}.json")
    with pytest.raises(UnsupportedModelError, match=f"model '{name}' has an image tower of type {kind}"):
        denserc.create_model(name)


def test_from_spec_builds_from_names_files_and_folders(tmp_path):
    model = denserc.create_model(TINY)
    model.save(tmp_path / "saved")
    assert denserc.models.from_spec(tmp_path / "saved", gating="none").gating == "none"
    assert denserc.models.from_spec(f"{TINY}:{tmp_path / 'saved' / serialization.CLIP_WEIGHTS}").gating == "hsg"
    with pytest.raises(ValueError, match="neither a folder written by DenseRCModel.save"):
        denserc.models.from_spec("not-a-model:openai")


def test_cli_version_and_help(capsys):
    from denserc.cli import main
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"denserc {denserc.__version__}"
    assert main([]) == 0
    assert "usage: denserc" in capsys.readouterr().out


def test_saved_files_get_the_usual_permissions(tmp_path):
    import os
    denserc.create_model(TINY).save(tmp_path)
    umask = os.umask(0)
    os.umask(umask)
    for name in (serialization.CLIP_WEIGHTS, serialization.DENSERC_CONFIG, serialization.GATE_WEIGHTS):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


@pytest.mark.slow
def test_the_testbed_clip_is_found_through_its_plugin_only_when_asked_for():
    """`import denserc` loads no plug-in; asking for the testbed's model name loads the testbed plug-in."""
    import subprocess
    import sys
    code = ("import sys, denserc; before = any(m.startswith('denserc_testbed') for m in sys.modules); "
            "m = denserc.create_model('ViT-Testbed-P8', pretrained='testbed'); "
            "print(before, 'denserc_testbed.plugin' in sys.modules, m.model_name, m.embed_dim)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "True", "ViT-Testbed-P8", "64"]


def test_the_tokenizer_comes_from_any_model_spec(tmp_path):
    torch.manual_seed(0)
    denserc.create_model(TINY).save(tmp_path / "folder")
    text = ["a photo of a cat"]
    expected = denserc.get_tokenizer(TINY)(text)
    for spec in (f"{TINY}:openai", f"{TINY}:/some/weights.safetensors", tmp_path / "folder"):
        assert torch.equal(denserc.get_tokenizer(spec)(text), expected), spec
