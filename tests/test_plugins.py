"""Plug-ins: found through entry points, registered once and only when the core looks up a name it does not know,
and the public extension points they register through (docs/architecture.md)."""
import importlib.metadata
import json
import sys
import types

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import denserc
import denserc.cli
from denserc import plugins
from denserc.cli import main
from denserc.data import build_source, source_types
from denserc.data import datasets as data_sources
from denserc.eval import (DEFAULT_PROTOCOLS, SEGMENTATION_DATASETS, SegmentationDataset, SegmentationLayout,
                          SegmentationProtocol, detect_segmentation_dataset, protocol_for,
                          register_segmentation_dataset)
from denserc.models import register_pretrained

from helpers import TINY, isolate_open_clip_configs

TOY_TYPE = "toy-plugin-images"
TOY_PLUGIN = f'''
CALLS = []


def register():
    from denserc.data import GeneratedSource, register_source
    CALLS.append("register")
    register_source("{TOY_TYPE}")(lambda config: GeneratedSource(config.num_images, 32, seed=config.seed))
'''


def data_config(type_: str, num_images: int = 3):
    return types.SimpleNamespace(type=type_, num_images=num_images, seed=0, image_size=32, options={})


@pytest.fixture
def install_plugin(tmp_path, monkeypatch):
    """``install_plugin(source)``: a plug-in module announced by an entry point, as an installed package would."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(plugins, "_loaded", {})  # the installed plug-ins stay registered from earlier lookups

    def install(source: str):
        (tmp_path / "toy_plugin.py").write_text(source)
        entry = importlib.metadata.EntryPoint("toy", "toy_plugin:register", plugins.ENTRY_POINT_GROUP)
        monkeypatch.setattr(plugins, "entry_points", lambda group: [entry] if group == plugins.ENTRY_POINT_GROUP
                            else [])
    yield install
    sys.modules.pop("toy_plugin", None)
    data_sources.SOURCES.remove(TOY_TYPE)


def test_a_plugin_registers_once_and_only_when_a_name_is_unknown(install_plugin):
    install_plugin(TOY_PLUGIN)
    assert len(build_source(data_config("generated"))) == 3  # a known type: no plug-in is loaded
    assert "toy_plugin" not in sys.modules
    assert len(build_source(data_config(TOY_TYPE, num_images=5))) == 5
    assert len(build_source(data_config(TOY_TYPE))) == 3
    assert sys.modules["toy_plugin"].CALLS == ["register"]
    assert plugins.load_plugins() == {"toy": "toy_plugin:register"}
    assert sys.modules["toy_plugin"].CALLS == ["register"]
    with pytest.raises(ValueError, match=rf"data.type: unknown data type 'nope'; known: .*{TOY_TYPE}"):
        build_source(data_config("nope"))


def test_a_failing_plugin_is_named(install_plugin):
    install_plugin("def register():\n    raise ImportError('needs the package foo')\n")
    with pytest.raises(RuntimeError, match=r"denserc plug-in 'toy' \(toy_plugin:register, entry point group "
                                           r"'denserc.plugins'\) failed to register: ImportError: needs the package"):
        build_source(data_config(TOY_TYPE))
    assert TOY_TYPE not in source_types()


def test_register_pretrained_makes_a_tag_of_a_local_weights_file(tmp_path, monkeypatch, images):
    isolate_open_clip_configs(monkeypatch)  # the Toy-Plugin-16 config below does not outlive the test
    monkeypatch.setattr(open_clip.pretrained, "_PRETRAINED",
                        {name: dict(tags) for name, tags in open_clip.pretrained._PRETRAINED.items()})
    reference = open_clip.create_model(TINY).eval()
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(weights))
    register_pretrained(TINY, "my-weights", weights)
    expected = reference.encode_image(images)
    assert torch.equal(denserc.create_model(TINY, "my-weights").eval().encode_image(images), expected)
    assert torch.equal(denserc.models.from_spec(f"{TINY}:my-weights").eval().encode_image(images), expected)
    plain = open_clip.create_model(TINY, pretrained="my-weights").eval()  # open_clip's own factory knows it too
    assert torch.equal(plain.encode_image(images), expected)
    with pytest.raises(ValueError, match=f"{TINY} already has a pretrained tag 'my-weights'"):
        register_pretrained(TINY, "my-weights", weights)
    # a model open_clip does not ship comes with its config
    config = tmp_path / "Toy-Plugin-16.json"
    config.write_text(json.dumps(open_clip.get_model_config(TINY)))
    register_pretrained("Toy-Plugin-16", "v1", weights, config=config)
    assert torch.equal(denserc.create_model("Toy-Plugin-16", "v1").eval().encode_image(images), expected)
    with pytest.raises(ValueError, match="must be an existing open_clip model config file named Other.json"):
        register_pretrained("Other", "v1", weights, config=config)
    with pytest.raises(ValueError, match="unknown open_clip model 'Other'; pass its config file"):
        register_pretrained("Other", "v1", weights)


def _my_pairs(layout, root):
    return [(image, root / "labels" / image.name) for image in sorted((root / "images").glob("*.png"))]


def test_register_segmentation_dataset_makes_it_readable_and_detectable_by_name(tmp_path):
    layout = SegmentationLayout("my-scans", "My scans", "voc20", 20, False, False,
                                "my-scans/\n  images/<name>.png\n  labels/<name>.png   0..19, 255 = ignore",
                                ("images", "labels"), _my_pairs)
    label = np.array([[0, 19], [255, 3]], dtype=np.uint8)
    for folder, array in (("images", np.zeros((2, 2, 3), np.uint8)), ("labels", label)):
        (tmp_path / folder).mkdir()
        Image.fromarray(array).save(tmp_path / folder / "a.png")
    try:
        register_segmentation_dataset(layout, SegmentationProtocol(short_side=64, window=32, stride=16))
        sample = SegmentationDataset("my-scans", tmp_path)[0]
        assert torch.equal(sample["label"], torch.from_numpy(label))
        assert detect_segmentation_dataset(tmp_path) == "my-scans"
        assert protocol_for("my-scans", stride=8) == SegmentationProtocol(short_side=64, window=32, stride=8)
        with pytest.raises(ValueError, match="segmentation dataset 'my-scans' is already registered"):
            register_segmentation_dataset(layout)
    finally:
        SEGMENTATION_DATASETS.remove("my-scans")
        DEFAULT_PROTOCOLS.pop("my-scans", None)
    with pytest.raises(ValueError, match="unknown segmentation dataset 'my-scans'; known: ade20k, "):
        SegmentationDataset("my-scans", tmp_path)


def test_plugin_commands_and_defaults_join_the_command_line(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    listed = capsys.readouterr().out
    assert all(command in listed for command in ("train", "eval", "segment", "testbed", "pretrain-testbed",
                                                 "testbed-probe"))


def test_without_a_plugin_default_train_and_segment_ask_for_a_config_and_a_model(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(plugins, "entry_points", lambda group: [])
    assert main(["train", "optim.lr=1e-4"]) == 1
    assert "no CONFIG given and no plug-in sets a built-in default; give a shipped config (" in capsys.readouterr().err
    image = tmp_path / "photo.png"
    Image.new("RGB", (32, 32)).save(image)
    assert main(["segment", str(image), "--classes", "a,b"]) == 1
    assert "no --model given and no installed plug-in sets a default model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["testbed"])
    assert "invalid choice: 'testbed'" in capsys.readouterr().err
