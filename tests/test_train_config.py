"""Training configs: paper defaults, shipped YAML files, base inheritance, overrides, clear errors."""
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from omegaconf import MISSING

from denserc.cli import main
from denserc.engine.config import ConfigError, OptimConfig, TrainConfig, changed_keys, load_structured
from denserc.engine.shipped import available_configs
from denserc.train.config import Config, load_config
from denserc.train.shipped import CONFIG_DIR

REPO = Path(__file__).resolve().parent.parent


def test_defaults_are_the_papers_recipe():
    config = Config()
    assert (config.model.name, config.model.pretrained, config.model.construction, config.model.gating) == \
        ("ViT-B-16", "openai", "multi-v", "hsg")
    assert config.vfm.name == "vit_base_patch14_reg4_dinov2"
    assert (config.optim.lr, config.optim.weight_decay, config.optim.warmup_steps) == (1e-5, 0.1, 1000)
    assert (config.train.epochs, config.train.global_batch_size, config.data.image_size) == (6, 16, 1024)
    assert config.loss.coherence_weight == 0.025
    assert (config.data.grid_rule, config.data.grid_max_cells) == ("clipself", 6)


def test_real_data_configs_carry_the_peers_recipe_choices():
    """docs/training.md#recipe-choices: blocks train (stem, ln_post, proj frozen), aspect kept, CLIPSelf's grid
    rule and 20 cells, DeCLIP's L_coherence, a 0.7 export (EVA-L: CLIPSelf's 0.95)."""
    for name in ("vitb16_coco", "vitl14_coco", "eva02_b16_coco", "eva02_l14_coco"):
        config = load_config(name)
        assert not config.model.train_stem_and_head, name
        assert (config.data.aspect, config.data.grid_rule, config.data.grid_max_cells, config.data.grid_max_boxes,
                config.loss.coherence_form, config.loss.coherence_weight) == ("pad", "clipself", 6, 20, "declip",
                                                                              0.025), name
    assert [load_config(name).export.alpha for name in ("vitb16_coco", "vitl14_coco")] == [0.7, 0.7]
    assert [load_config(name).model.unlocked_blocks for name in ("vitb16_coco", "vitl14_coco")] == [None, None]
    testbed = load_config("testbed")
    assert (testbed.export.alpha, testbed.data.grid_rule, testbed.loss.coherence_form) == (1.0, "clipself", "declip")
    with pytest.raises(ConfigError, match=r"loss.coherence_form: must be one of \['declip', 'mse'\], got 'l2'"):
        load_config("smoke", ["loss.coherence_form=l2"])
    with pytest.raises(ConfigError, match="data.grid_max_boxes: must be at least 1 or null, got 0"):
        load_config("smoke", ["data.grid_max_boxes=0"])


def test_every_table5_variant_and_model_has_a_shipped_config():
    expected = {"ablation_xv": ("x+v", "none"), "ablation_v": ("v", "none"), "ablation_multiv": ("multi-v", "none"),
                "ablation_qk": ("multi-v", "qk"), "ablation_qq": ("multi-v", "qq"), "ablation_hsg": ("multi-v", "hsg")}
    assert set(expected) | {"smoke", "vitb16_coco", "vitl14_coco"} <= set(available_configs(CONFIG_DIR))
    for name, (construction, gating) in expected.items():
        config = load_config(name)
        assert (config.model.construction, config.model.gating) == (construction, gating), name
        assert config.optim.lr == 1e-5 and config.data.image_size == 1024, name  # inherited recipe
        eva = load_config(name.replace("ablation_", "ablation_eva02_"))  # Table 5 on the detection backbone
        assert (eva.model.name, eva.model.construction, eva.model.gating, eva.model.num_layers) == (
            "EVA02-B-16", construction, gating, config.model.num_layers), name
        assert eva.model.unlocked_blocks == 12 and eva.export.alpha == 0.7, name
    assert load_config("eva02_l14_coco").vfm.name == "vit_large_patch14_reg4_dinov2"  # DeCLIP's L/14 VFM
    large = load_config("vitl14_coco")
    assert (large.model.name, large.data.image_size % 14, large.train.global_batch_size) == ("ViT-L-14", 0, 16)


def test_configs_folder_at_the_top_links_to_the_shipped_ones():
    assert (REPO / "configs").is_symlink() and (REPO / "configs").resolve() == CONFIG_DIR
    by_path = load_config(REPO / "configs" / "vitb16_coco.yaml")
    assert by_path == load_config("vitb16_coco")


def test_overrides_are_dotted_and_read_as_yaml():
    config = load_config("smoke", ["train.epochs=1", "optim.lr=2e-5", "model.pretrained=null",
                                   "optim.betas=[0.9, 0.98]", "data.strict=true", "vfm.model_kwargs={depth: 1}"])
    assert config.train.epochs == 1 and config.optim.lr == 2e-5 and config.model.pretrained is None
    assert config.optim.betas == [0.9, 0.98] and config.data.strict is True
    assert config.vfm.model_kwargs == {"depth": 1}  # a mapping value replaces, it is not merged


def test_unknown_keys_are_errors_naming_the_key_and_the_valid_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.epoch'; valid keys in train: .*'epochs'"):
        load_config("smoke", ["train.epoch=3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'optimizer'.*'optim'"):
        load_config("smoke", ["optimizer.lr=1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: smoke\ndata:\n  image_sise: 64\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'data\.image_sise'.*'image_size'"):
        load_config(bad)


def test_bad_values_are_errors_naming_the_key():
    with pytest.raises(ConfigError, match=r"train\.epochs: expected int, got 'two'"):
        load_config("smoke", ["train.epochs=two"])
    with pytest.raises(ConfigError, match=r"model\.gating: must be one of .*'hsg'.*got 'gate'"):
        load_config("smoke", ["model.gating=gate"])
    with pytest.raises(ConfigError, match=r"train\.batch_size: must be at least 1"):
        load_config("smoke", ["train.batch_size=0"])
    with pytest.raises(ConfigError, match="not of the form section.key=value"):
        load_config("smoke", ["epochs"])
    with pytest.raises(ConfigError, match="neither a YAML file nor a shipped config"):
        load_config("vitb99_coco")


def test_base_chains_resolve_relative_to_the_file_and_reject_loops(tmp_path):
    (tmp_path / "parent.yaml").write_text("base: smoke\ntrain:\n  epochs: 7\n")
    (tmp_path / "child.yaml").write_text("base: parent.yaml\noptim:\n  lr: 0.5\n")
    config = load_config(tmp_path / "child.yaml")
    assert (config.train.epochs, config.optim.lr, config.model.name) == (7, 0.5, "ViT-Tiny-16")
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "a.yaml")


def test_cli_reports_config_and_data_errors_without_a_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "smoke", "train.epoch=1"]) == 1
    assert "unknown config key 'train.epoch'" in capsys.readouterr().err
    assert main(["train", "vitb16_coco", f"data.root={tmp_path / 'coco' / 'train2017'}"]) == 1
    err = capsys.readouterr().err
    assert "data.root" in err and "does not exist" in err and "Traceback" not in err
    assert main(["train", "smoke", "model.pretrained=/no/such/weights.safetensors"]) == 1
    assert "neither a file nor a pretrained tag" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "runs" / "smoke" / "checkpoints")


def test_cli_prints_the_resolved_config_with_overrides_and_no_config_name(capsys):
    assert main(["train", "train.epochs=9", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "name: ViT-Testbed-P8" in out and "epochs: 9" in out


def test_no_config_runs_the_testbed_before_after_with_the_overrides(monkeypatch):
    import denserc_testbed.run as testbed_run
    calls = []
    monkeypatch.setattr(testbed_run, "run_and_print", lambda **kwargs: calls.append(kwargs) or 0)
    assert main(["train"]) == 0
    assert main(["train", "optim.lr=2e-4"]) == 0
    assert calls == [{"overrides": []}, {"overrides": ["optim.lr=2e-4"]}]


# ------------------------------------------------------------- any schema (another task's config)
@dataclass
class HeadConfig:
    num_classes: int = MISSING
    temperature: float = 50.0


@dataclass
class DetectorLikeConfig:
    head: HeadConfig = field(default_factory=HeadConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)


def test_any_dataclass_schema_loads_by_name_with_bases_overrides_and_interpolation(tmp_path):
    (tmp_path / "base_det.yaml").write_text("head:\n  num_classes: 48\noptim:\n  lr: 1.0e-4\n")
    (tmp_path / "det.yaml").write_text("base: base_det\ntrain:\n  epochs: 3\n  seed: ${head.num_classes}\n")
    config = load_structured(DetectorLikeConfig, "det", ["optim.clip_grad_norm=1", "head.temperature=25"],
                             config_dir=tmp_path)
    assert isinstance(config, DetectorLikeConfig) and isinstance(config.head, HeadConfig)
    assert (config.head.num_classes, config.head.temperature, config.train.epochs) == (48, 25.0, 3)
    assert (config.optim.lr, config.optim.clip_grad_norm, config.optim.weight_decay) == (1e-4, 1.0, 0.1)
    assert config.train.seed == 48
    assert available_configs(tmp_path) == ["base_det", "det"]
    with pytest.raises(ConfigError, match=r"unknown config key 'head\.classes'; valid keys in head: "
                                          r"\['num_classes', 'temperature'\] \(override 'head\.classes=3'\)"):
        load_structured(DetectorLikeConfig, "det", ["head.classes=3"], config_dir=tmp_path)
    (tmp_path / "no_head.yaml").write_text("train:\n  epochs: 1\n")
    with pytest.raises(ConfigError, match=r"head\.num_classes: has no value; set it in the config or with "
                                          r"head\.num_classes=\.\.\."):
        load_structured(DetectorLikeConfig, "no_head", config_dir=tmp_path)
    (tmp_path / "bad.yaml").write_text("base: det\nhead:\n  temperature: hot\n")
    with pytest.raises(ConfigError, match=r"head\.temperature: expected float, got 'hot' \(in .*bad\.yaml\)"):
        load_structured(DetectorLikeConfig, "bad", config_dir=tmp_path)


def test_changed_keys_names_each_differing_leaf_once():
    old = dataclasses.asdict(load_config("smoke"))
    new = load_config("smoke", ["train.log_every=3", "vfm.model_kwargs={depth: 1}", "model.pretrained=x.pt"])
    assert changed_keys(old, new) == ["model.pretrained: None -> 'x.pt'", "train.log_every: 4 -> 3",
                                      "vfm.model_kwargs.depth: 2 -> 1", "vfm.model_kwargs.embed_dim: 48 -> None",
                                      "vfm.model_kwargs.num_heads: 3 -> None"]
    assert changed_keys(old, load_config("smoke")) == []
