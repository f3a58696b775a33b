"""Typed config: loading, strict validation, error messages, overrides and file resolution."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from engine import config as C
from engine.config import ConfigError, config_from_dict, load_config, parse_override

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_and_file_values(tmp_path):
    path = write(tmp_path, "model:\n  name: resnet101\n  norm: an\noptim:\n  lr: 0.2\n  weight_decay: 1e-4\n")
    cfg = load_config(path)
    assert cfg.model.name == "resnet101" and cfg.model.norm == "an"
    assert cfg.optim.lr == 0.2
    assert cfg.optim.weight_decay == 1e-4  # YAML 1.1 reads "1e-4" as a string; the loader converts it
    assert cfg.data.batch_size == C.DataConfig().batch_size  # untouched keys keep their defaults
    assert cfg.train.output_dir == str(Path("runs") / "exp")  # default run folder named after the file


def test_unknown_key_names_key_file_and_suggestion(tmp_path):
    path = write(tmp_path, "optim:\n  learning_rate: 0.1\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "optim.learning_rate" in msg and str(path) in msg and "Valid keys of 'optim'" in msg and "lr" in msg


def test_typo_gets_did_you_mean(tmp_path):
    with pytest.raises(ConfigError, match=r"Did you mean 'weight_decay'"):
        load_config(write(tmp_path, "optim:\n  weight_decy: 0.1\n"))
    with pytest.raises(ConfigError, match=r"Unknown config section 'optm'.*Did you mean 'optim'"):
        load_config(write(tmp_path, "optm:\n  lr: 0.1\n"))


def test_wrong_type_and_bad_value(tmp_path):
    with pytest.raises(ConfigError, match=r"data.batch_size.*expected an integer"):
        load_config(write(tmp_path, "data:\n  batch_size: many\n"))
    with pytest.raises(ConfigError, match=r"data.batch_size.*expected an integer >= 1"):
        load_config(write(tmp_path, "data:\n  batch_size: 0\n"))
    with pytest.raises(ConfigError, match=r"train.amp.*one of 'bf16', 'fp16', 'none'.*Did you mean 'bf16'"):
        load_config(write(tmp_path, "train:\n  amp: bf61\n"))
    with pytest.raises(ConfigError, match=r"train.channels_last.*true/false"):
        load_config(write(tmp_path, "train:\n  channels_last: 1\n"))  # an int is not silently a bool
    with pytest.raises(ConfigError, match=r"data.scale"):
        load_config(write(tmp_path, "data:\n  scale: [0.9, 0.1]\n"))
    with pytest.raises(ConfigError, match=r"model.norm_k"):
        load_config(write(tmp_path, "model:\n  norm_k: [10, 0, 20, 20]\n"))
    with pytest.raises(ConfigError, match=r"must be a mapping"):
        load_config(write(tmp_path, "model: resnet50\n"))


def test_int_accepted_for_float_and_integral_float_for_int():
    cfg = config_from_dict({"optim": {"lr": 1}, "data": {"batch_size": 64.0}})
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == 1.0
    assert isinstance(cfg.data.batch_size, int) and cfg.data.batch_size == 64
    with pytest.raises(ConfigError):
        config_from_dict({"data": {"batch_size": 64.5}})


def test_override_precedence(tmp_path):
    path = write(tmp_path, "optim:\n  lr: 0.2\ndata:\n  root: /from/file\n")
    cfg = load_config(path, ["optim.lr=0.3", "data.root=/d", "optim.lr=0.4"])
    assert cfg.optim.lr == 0.4  # later overrides win over earlier ones and over the file
    assert cfg.data.root == "/d"
    cfg = load_config(path, ["model.norm_k=[5, 5, 10, 10]", "optim.clip_grad=null", "train.steps_per_epoch=None"])
    assert cfg.model.norm_k == [5, 5, 10, 10] and cfg.optim.clip_grad is None and cfg.train.steps_per_epoch is None
    cfg = load_config(path, ["train.output_dir=/tmp/x"])
    assert cfg.train.output_dir == "/tmp/x"


def test_bad_overrides(tmp_path):
    path = write(tmp_path, "")
    with pytest.raises(ConfigError, match=r"expected section.key=value"):
        load_config(path, ["optim.lr"])
    with pytest.raises(ConfigError, match=r"must be section.key"):
        load_config(path, ["lr=0.1"])
    with pytest.raises(ConfigError, match=r"Unknown config key 'optim.lrate'.*command-line override"):
        load_config(path, ["optim.lrate=0.1"])
    with pytest.raises(ConfigError, match=r"optim.lr.*command-line override 'optim.lr=fast'"):
        load_config(path, ["optim.lr=fast"])
    assert parse_override("data.root=/a=b") == ("data", "root", "/a=b")


def test_config_file_resolution(tmp_path, monkeypatch):
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "resnet50_an.yaml").write_text("model:\n  name: resnet50\n  norm: an\n")
    monkeypatch.setattr(C, "CONFIG_DIR", configs)
    monkeypatch.chdir(tmp_path)
    assert load_config("resnet50_an.yaml").model.norm == "an"  # not a path here: found in configs/
    assert load_config("resnet50_an").model.norm == "an"  # the suffix is optional
    own = write(tmp_path, "model:\n  norm: gn\n", "resnet50_an.yaml")
    assert load_config(own).model.norm == "gn"  # an existing path wins over configs/
    with pytest.raises(ConfigError, match=r"resnet50_ab.yaml.*not found.*Did you mean 'resnet50_an.yaml'"):
        load_config("resnet50_ab.yaml")


def test_yaml_is_loaded_safely(tmp_path):
    path = write(tmp_path, "model: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match=r"not valid YAML"):
        load_config(path)


def test_resolved_config_round_trips():
    cfg = config_from_dict({"model": {"norm": "an", "norm_k": [1, 2, 3, 4]}, "optim": {"lr": 0.3}})
    again = config_from_dict(yaml.safe_load(cfg.dump()))
    assert again == cfg


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_names_are_valid(path):
    cfg = load_config(path)
    C.validate_names(cfg, str(path))


def test_unknown_model_and_norm_names():
    with pytest.raises(ConfigError, match=r"Unknown model 'resnet05'.*Did you mean 'resnet50'"):
        C.validate_names(config_from_dict({"model": {"name": "resnet05"}}), "x.yaml")
    with pytest.raises(ConfigError, match=r"Unknown norm 'ann'.*Valid norms"):
        C.validate_names(config_from_dict({"model": {"norm": "ann"}}), "x.yaml")
