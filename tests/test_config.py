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


@pytest.mark.parametrize(
    "text, message",
    [
        # a typo gets "did you mean"
        ("optim:\n  weight_decy: 0.1\n", r"Did you mean 'weight_decay'"),
        ("optm:\n  lr: 0.1\n", r"Unknown config section 'optm'.*Did you mean 'optim'"),
        # a wrong type or a bad value
        ("data:\n  batch_size: many\n", r"data.batch_size.*expected an integer"),
        ("data:\n  batch_size: 0\n", r"data.batch_size.*expected an integer >= 1"),
        ("train:\n  amp: bf61\n", r"train.amp.*one of 'bf16', 'fp16', 'none'.*Did you mean 'bf16'"),
        ("train:\n  channels_last: 1\n", r"train.channels_last.*true/false"),  # an int is not silently a bool
        ("data:\n  scale: [0.9, 0.1]\n", r"data.scale"),
        ("model:\n  norm_k: [10, 0, 20, 20]\n", r"ResNet: 'norm_k' must be an integer >= 1, got 0"),
        ("model: resnet50\n", r"must be a mapping"),
    ],
)
def test_typo_wrong_type_and_bad_value(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


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
    assert cfg.model.options["norm_k"] == [5, 5, 10, 10]
    assert cfg.optim.clip_grad is None and cfg.train.steps_per_epoch is None
    cfg = load_config(path, ["train.output_dir=/tmp/x"])
    assert cfg.train.output_dir == "/tmp/x"


def test_bad_overrides(tmp_path):
    path = write(tmp_path, "model:\n  name: resnet18\n")
    with pytest.raises(ConfigError, match=r"expected section.key=value"):
        load_config(path, ["optim.lr"])
    with pytest.raises(ConfigError, match=r"must be section.key"):
        load_config(path, ["lr=0.1"])
    with pytest.raises(ConfigError, match=r"Unknown config key 'optim.lrate'.*command-line override"):
        load_config(path, ["optim.lrate=0.1"])
    with pytest.raises(ConfigError, match=r"optim.lr.*command-line override 'optim.lr=fast'"):
        load_config(path, ["optim.lr=fast"])
    assert parse_override("data.root=/a=b") == ("data", "root", (), "/a=b")
    with pytest.raises(ConfigError, match=r"'optim.lr' is not a mapping"):
        load_config(path, ["optim.lr.x=1"])


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
    cfg = load_config(path)  # validates the model section against the model (built on the meta device)
    C.validate_model(cfg, str(path))


def test_unknown_model_and_norm_names():
    with pytest.raises(ConfigError, match=r"Unknown model 'resnet05'.*Did you mean 'resnet50'"):
        C.validate_model(config_from_dict({"model": {"name": "resnet05"}}), "x.yaml")
    with pytest.raises(ConfigError, match=r"Unknown norm 'ann'.*Valid norms: bn, gn, sn, an, an_gn, iebn"):
        C.validate_model(config_from_dict({"model": {"norm": "ann"}}), "x.yaml")


def test_model_options_come_from_the_model_signature(tmp_path):
    """Option names, types and defaults are the model class's keyword-only parameters; values are checked by
    building the model, so the config needs no table of its own."""
    import models

    for name in models.list_models():
        cfg = config_from_dict({"model": {"name": name}})
        options = models.model_options(name)
        for key, (default, _) in options.items():
            if key not in ("norm", "num_classes"):
                cfg.model.options[key] = default  # every default passes the config's own type check
        C.validate_model(cfg, name)
    with pytest.raises(ConfigError, match=r"Unknown option 'model.deep_stem' for model 'mobilenetv2'.*in x.yaml"):
        C.validate_model(config_from_dict({"model": {"name": "mobilenetv2", "deep_stem": True}}), "x.yaml")
    with pytest.raises(ConfigError, match=r"'model.norm_placment'.*Did you mean 'norm_placement'"):
        C.validate_model(config_from_dict({"model": {"norm_placment": "bn3"}}), "x.yaml")
    with pytest.raises(ConfigError, match=r"Bad value for 'model.deep_stem' in x.yaml: got 'yes', expected true/false"):
        C.validate_model(config_from_dict({"model": {"deep_stem": "yes"}}), "x.yaml")
    with pytest.raises(ConfigError, match=r"x.yaml.*'drop_rate' must be a number in \[0.0, 1.0\), got 1.5"):
        C.validate_model(config_from_dict({"model": {"drop_rate": 1.5}}), "x.yaml")
    bad_kwargs = config_from_dict({"model": {"norm": "an", "norm_kwargs": {"attention": "sigmod"}}})
    with pytest.raises(ConfigError, match=r"x.yaml.*'attention' must be one of.*Did you mean 'sigmoid'"):
        C.validate_model(bad_kwargs, "x.yaml")
    cfg = config_from_dict({"model": {"norm_k": [1.0, 2, 3, 4]}})
    C.validate_model(cfg, "x.yaml")
    assert cfg.model.options["norm_k"] == [1, 2, 3, 4] and all(type(k) is int for k in cfg.model.options["norm_k"])


def test_nested_override_of_a_mapping_option(tmp_path):
    path = write(tmp_path, "model:\n  norm: an\n  norm_kwargs:\n    attention: sigmoid\n")
    cfg = load_config(path, ["model.norm_kwargs.impl=reference"])
    assert cfg.model.options["norm_kwargs"] == {"attention": "sigmoid", "impl": "reference"}
    assert "norm_kwargs:\n    attention: sigmoid\n    impl: reference" in cfg.dump()  # options written back flat
    with pytest.raises(ConfigError, match=r"norm 'an' got unexpected keyword\(s\) 'imp'.*Did you mean 'impl'"):
        load_config(path, ["model.norm_kwargs.imp=fused"])
