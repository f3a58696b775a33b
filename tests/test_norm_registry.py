"""The norm registry: a norm registered from outside the package trains in every backbone through a config.

The new norm here is PyTorch's own ``nn.InstanceNorm2d`` (affine), registered in this test module only, with the
placement data "at the AN positions, BN elsewhere". Nothing in ``models/`` or ``engine/`` knows about it.
"""

from __future__ import annotations

import pytest
import torch
import yaml
from torch import nn

import an
import models
import train
from engine import checkpoint as ck
from engine.config import ConfigError, config_from_dict, validate_model
from tests.conftest import tiny_config

pytestmark = pytest.mark.usefixtures("single_thread")


def instance_norm(num_features: int, *, eps: float = 1e-5) -> nn.Module:
    """The whole new norm: one builder (the file a user would write)."""
    return nn.InstanceNorm2d(num_features, eps=eps, affine=True)


@pytest.fixture
def inorm():
    with an.registered_norm("inorm", instance_norm, plain="bn", description="InstanceNorm at the AN positions"):
        yield
    assert "inorm" not in an.list_norms()


def _placed(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.InstanceNorm2d)]


def test_registered_norm_is_placed_where_an_goes(inorm):
    """Same positions as AN in every family (AN's placement counts: 16, 17, 58, 24)."""
    expected = {"resnet50": 16, "mobilenetv2": 17, "densenet121": 58, "aognet12m": 24}
    for name, count in expected.items():
        with torch.device("meta"):
            ours = models.create_model(name, norm="inorm")
            ref = models.create_model(name, norm="an")
        got = _placed(ours)
        an_layers = [n for n, m in ref.named_modules() if isinstance(m, an.AttentiveNorm2d)]
        assert got == an_layers and len(got) == count, name
        plain = [m for n, m in ours.named_modules() if isinstance(m, nn.BatchNorm2d)]
        assert plain, name  # BN stays everywhere else


@pytest.mark.parametrize(
    ("model", "extra"),
    [("resnet50", {"base_width": 8}), ("aognet12m", {"filter_list": [8, 16, 24, 32, 48]})],
    ids=["resnet50", "aognet12m"],
)
def test_registered_norm_trains_through_the_config(inorm, tmp_path, model, extra):
    """model.norm: inorm is accepted by config validation and trains one step with train.py."""
    config = tiny_config(
        tmp_path,
        sched={"epochs": 1, "warmup_epochs": 0},
        train={"output_dir": str(tmp_path / "run"), "steps_per_epoch": 1, "val_steps": 1},
    )
    text = yaml.safe_load(config.read_text())
    text["model"] = {"name": model, "norm": "inorm", "num_classes": 10, **extra}
    config.write_text(yaml.safe_dump(text))
    assert train.main(["--config", str(config)]) == 0
    saved = ck.load_checkpoint(tmp_path / "run" / "last.pth")
    assert saved["config"]["model"]["norm"] == "inorm"
    with torch.device("meta"):
        fresh = models.create_model(model, norm="inorm", num_classes=10, **extra)
    placed = {f"{n}.weight" for n in _placed(fresh)}
    assert placed and placed <= set(saved["model"])
    assert not any(k.replace(".weight", ".running_mean") in saved["model"] for k in placed)  # no BN statistics
    assert saved["global_update"] == 1


def test_norm_kwargs_of_a_registered_norm_are_validated(inorm):
    validate_model(config_from_dict({"model": {"norm": "inorm", "norm_kwargs": {"eps": 1e-3}}}), "x.yaml")
    with pytest.raises(ConfigError, match=r"norm 'inorm' got unexpected keyword\(s\) 'momentum'.*Valid.*: eps"):
        validate_model(config_from_dict({"model": {"norm": "inorm", "norm_kwargs": {"momentum": 0.1}}}), "x.yaml")


def test_registry_rules():
    assert an.list_norms()[:6] == ["bn", "gn", "sn", "an", "an_gn", "iebn"]
    assert an.norm_entry("AN").name == "an" and an.norm_entry("an-gn").name == "an_gn"
    assert an.norm_entry("an").plain == "bn" and an.norm_entry("an").per_stage_k
    assert an.norm_entry("iebn").shortcut == "bn" and an.norm_entry("bn").plain is None
    with pytest.raises(ValueError, match=r"norm 'bn' is already registered; pass replace=True"):
        an.register_norm("bn", instance_norm)
    with pytest.raises(ValueError, match=r"Unknown norm 'iebnn'\. Did you mean 'iebn'"):
        an.norm_entry("iebnn")
    with pytest.raises(TypeError, match=r"norm 'gn' got unexpected keyword\(s\) 'group'\. Did you mean 'groups'"):
        an.create_norm("gn", 64, group=8)
    layer = an.get_norm_layer("an", k=3)(16)
    assert isinstance(layer, an.AttentiveBatchNorm2d) and layer.k == 3
    assert an.norm_entry("an").options["k"] == 10 and an.norm_entry("gn").options == {"groups": 32, "eps": 1e-5}
    assert isinstance(an.create_attn("se", 32, reduction=8), an.SqueezeExcite)


def test_decorator_registration_and_removal():
    @an.register_norm("tmp_ln", description="LayerNorm over C, H, W")
    def layer_norm(num_features: int) -> nn.Module:
        return nn.GroupNorm(1, num_features)

    try:
        assert "tmp_ln" in an.list_norms()
        x = torch.randn(2, 4, 3, 3)
        torch.testing.assert_close(an.create_norm("tmp_ln", 4)(x), nn.functional.group_norm(x, 1))
        with torch.device("meta"):
            m = models.create_model("resnet18", norm="tmp_ln")
        assert isinstance(m.bn1, nn.GroupNorm)  # plain=None: the norm goes everywhere
    finally:
        an.unregister_norm("tmp_ln")
    assert "tmp_ln" not in an.list_norms()
