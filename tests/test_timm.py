"""The timm interface of every backbone, checked the way timm's own test suite checks its models.

timm's ``tests/test_models.py`` asks of every registered model: a complete ``pretrained_cfg`` whose
``first_conv``/``classifier`` name real weights and whose ``pool_size`` matches ``forward_features``;
``num_classes``/``num_features``/``head_hidden_size``; ``forward_head(pre_logits=True)`` of width
``head_hidden_size``; ``reset_classifier(0)`` giving pooled features and ``reset_classifier(0, '')`` (or
``num_classes=0, global_pool=''``) the feature map; ``features_only`` and ``forward_intermediates`` whose
channels and strides match ``feature_info``, with ``forward_intermediates``' final output equal to
``forward_features``; grad checkpointing that does not change the output. Those checks run here on every
``anorm_*`` name (reduced widths), plus what timm's machinery adds on top of our models: the three feature
wrappers agreeing with ``forward_intermediates``, ``pretrained_cfg_overlay``, loading one's own weights, and
stochastic depth against its definition.
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import an
import models
from models._timm import timm_name
from tests.test_models import small

timm = pytest.importorskip("timm")

pytestmark = pytest.mark.usefixtures("single_thread")

BUILTIN_NORMS = ("bn", "gn", "sn", "an", "an_gn", "iebn")
NAMES = timm.list_models("anorm_*")
FAMILY = ["resnet50", "resnet18", "mobilenetv2", "densenet121", "aognet12m"]
# pretrained_cfg keys every name must fill (timm's resnet cfg has these, plus the tag of the registration).
CFG_KEYS = (
    "architecture",
    "tag",
    "input_size",
    "pool_size",
    "crop_pct",
    "interpolation",
    "mean",
    "std",
    "num_classes",
    "first_conv",
    "classifier",
    "license",
    "description",
)


def split_name(name: str) -> tuple[str, str]:
    """``'anorm_resnet50_an_gn'`` -> ``('resnet50', 'an_gn')``."""
    for model in models.list_models():
        norm = name.removeprefix(f"anorm_{model}_")
        if norm != name and norm in an.list_norms():
            return model, norm
    raise AssertionError(f"{name} is not a (model, norm) name")


def calibrate(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Running statistics from one batch, then eval mode.

    An untrained network with AN w/ BN overflows in eval mode with the initial running statistics (mean 0,
    var 1: nothing normalises, and every AN layer scales by about K/2 at init; DenseNet-AN reaches inf/NaN,
    AOGNet-AN 1e19 at 224 pixels), so eval-mode checks first estimate the statistics from ``x``.
    """
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: after one batch, that batch's statistics
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


def test_names_say_the_norm():
    """Every (model, norm) pair has a name; there is no bare ``anorm_<model>`` that picks a norm silently."""
    expected = {timm_name(m, n) for m in models.list_models() for n in BUILTIN_NORMS}
    assert expected <= set(NAMES)
    assert len(NAMES) == len(models.list_models()) * len(an.list_norms())
    assert timm_name("resnet50", "AN-GN") == "anorm_resnet50_an_gn"
    for bare in (f"anorm_{m}" for m in models.list_models()):
        assert not timm.is_model(bare)
    with pytest.raises(RuntimeError, match="Unknown model"):
        timm.create_model("anorm_resnet50")
    assert models.register_timm_models() == [timm_name(m, n) for m in models.list_models() for n in an.list_norms()]


@pytest.mark.parametrize("name", NAMES)
def test_every_name(name):
    """Registered config with every key; the model it builds is ``create_model(model, norm)`` exactly."""
    model, norm = split_name(name)
    cfg = timm.models.get_pretrained_cfg(name).to_dict()
    missing = [k for k in CFG_KEYS if cfg.get(k) in (None, "")]
    assert not missing, f"{name}: pretrained_cfg lacks {missing}"
    assert cfg["architecture"] == name and cfg["tag"] == "untrained" and cfg["num_classes"] == 1000
    assert cfg["pool_size"] == tuple(s // 32 for s in cfg["input_size"][1:])  # every backbone has stride 32
    assert f"norm='{norm}'" in cfg["description"]

    kw = small(model)
    torch.manual_seed(0)
    m = timm.create_model(name, num_classes=3, **kw)
    torch.manual_seed(0)
    ref = models.create_model(model, norm, num_classes=3, **kw)
    assert [type(x) for x in m.modules()] == [type(x) for x in ref.modules()]
    sd, ref_sd = m.state_dict(), ref.state_dict()
    assert list(sd) == list(ref_sd) and all(torch.equal(sd[k], ref_sd[k]) for k in sd)
    assert cfg.items() <= m.pretrained_cfg.items()
    assert cfg["first_conv"] + ".weight" in sd and cfg["classifier"] + ".weight" in sd
    y = m(torch.randn(2, 3, 32, 32))
    assert y.shape == (2, 3) and torch.isfinite(y).all()


@pytest.mark.parametrize("model", models.list_models())
def test_timm_model_checklist(model):
    """timm's test_model_default_cfgs / forward_intermediates / grad-checkpointing checks, AN models."""
    name, kw = timm_name(model, "an"), small(model)
    x = torch.randn(2, 3, 64, 64)
    m = calibrate(timm.create_model(name, **kw), x)
    cfg = m.pretrained_cfg
    assert m.num_classes == 1000 and m.num_features > 0 and m.head_hidden_size == m.num_features

    feats = m.forward_features(x)
    assert feats.shape == (2, m.num_features, 2, 2)  # 64 / 32, as pool_size is 224 / 32
    pre = m.forward_head(feats, pre_logits=True)
    assert pre.shape == (2, m.head_hidden_size)
    logits = m(x)
    torch.testing.assert_close(logits, m.get_classifier()(pre))
    assert m.get_classifier(name_only=True) == cfg["classifier"]

    info = timm.models.FeatureInfo(m.feature_info, len(m.feature_info))
    assert len(info) == 5 and info.reduction() == [2, 4, 8, 16, 32]
    final, inter = m.forward_intermediates(x)
    assert [t.shape[1] for t in inter] == info.channels()
    assert [t.shape[-1] for t in inter] == [math.ceil(64 / r) for r in info.reduction()]
    torch.testing.assert_close(final, feats)
    last_two = m.forward_intermediates(x, indices=2, intermediates_only=True)
    torch.testing.assert_close(last_two, inter[3:])
    early, picked = m.forward_intermediates(x, indices=[0, -3], stop_early=True)
    torch.testing.assert_close(picked, [inter[0], inter[2]])
    torch.testing.assert_close(early, inter[2])

    m.set_grad_checkpointing()
    torch.testing.assert_close(m(x), logits)
    torch.testing.assert_close(m.forward_intermediates(x)[0], feats)
    m.set_grad_checkpointing(False)

    m.reset_classifier(0)
    assert m.num_classes == 0 and m.get_classifier() is not None
    torch.testing.assert_close(m(x), pre)
    m.reset_classifier(0, "")
    torch.testing.assert_close(m(x), feats)
    m.reset_classifier(7, "catavgmax")
    assert m.head_hidden_size == 2 * m.num_features and m.get_classifier().in_features == 2 * m.num_features
    assert m(x).shape == (2, 7) and not m.training  # new head follows the model's mode
    m.reset_classifier(5, "max")
    torch.testing.assert_close(m.forward_head(feats, pre_logits=True), feats.amax((2, 3)))

    m = timm.create_model(name, num_classes=0, global_pool="", **kw).eval()
    assert m(x).shape == feats.shape


@pytest.mark.parametrize("model", FAMILY)
def test_feature_wrappers_agree(model):
    """features_only with timm's list (default), hook and getter wrappers returns forward_intermediates'
    features; out_indices selects; the getter prunes what it does not need."""
    name, kw = timm_name(model, "an"), small(model, drop_rate=0.0)  # no dropout: train-mode outputs are exact
    x = torch.randn(2, 3, 64, 64)
    torch.manual_seed(0)
    full = timm.create_model(name, **kw)
    expected = full.forward_intermediates(x, intermediates_only=True)
    for cls, out_indices in (("list", (0, 1, 2, 3, 4)), ("hook", (1, 2, 3, 4)), ("getter", (1, 3))):
        torch.manual_seed(0)
        f = timm.create_model(name, features_only=True, feature_cls=cls, out_indices=out_indices, **kw)
        assert f.feature_info.channels() == [full.feature_info[i]["num_chs"] for i in out_indices]
        assert f.feature_info.reduction() == [2 ** (i + 1) for i in out_indices]
        torch.testing.assert_close(f(x), [expected[i] for i in out_indices], msg=f"{model} {cls}")
        if cls == "list":
            assert type(f).__name__ == "FeatureListNet"
    assert models.count_params(f) < models.count_params(full)  # the getter dropped stage 4 and the head


@pytest.mark.parametrize("model", FAMILY)
def test_grad_checkpointing_keeps_gradients(model):
    """Checkpointed training step = plain step (same loss and gradients)."""
    kw = small(model, drop_rate=0.0, zero_init_last=False)
    kw = {k: v for k, v in kw.items() if k in models.model_options(model)}
    torch.manual_seed(0)
    m = models.create_model(model, "an", num_classes=5, **kw)
    x = torch.randn(2, 3, 64, 64)
    grads = []
    for enable in (False, True):
        m.zero_grad()
        m.set_grad_checkpointing(enable)
        m(x).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    assert m._checkpointed  # something was checkpointed
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], msg=n)


def _branch_check(block: nn.Module, x: torch.Tensor, branch, shortcut, finish, p: float) -> None:
    """Per sample, a block with stochastic depth p returns either finish(shortcut) (branch dropped) or
    finish(branch / (1 - p) + shortcut) (kept, rescaled): timm's DropPath as its definition."""
    torch.manual_seed(1)
    block.train()
    with torch.no_grad():
        y, b, s = block(x), branch(x), shortcut(x)
    dropped = finish(s)
    kept = finish(b / (1 - p) + s)
    for i in range(x.shape[0]):
        is_dropped = torch.allclose(y[i], dropped[i], atol=1e-5)
        is_kept = torch.allclose(y[i], kept[i], atol=1e-5)
        assert is_dropped != is_kept, f"sample {i}: neither dropped nor kept-and-rescaled"
    counts = sum(torch.allclose(y[i], dropped[i], atol=1e-5) for i in range(x.shape[0]))
    assert 0 < counts < x.shape[0]  # p = 0.5 over 32 samples: both outcomes occur
    block.eval()
    with torch.no_grad():
        torch.testing.assert_close(block(x), finish(branch(x) + shortcut(x)))  # identity in eval


def test_drop_path_follows_its_definition():
    torch.manual_seed(0)
    p = 0.5
    # ResNet bottleneck (branch = conv1..bn3, shortcut = projection).
    net = models.create_model("resnet50", "an", base_width=8, drop_path_rate=p, zero_init_last=False)
    blk = net.layer4[2]  # the last block has the full rate
    assert blk.drop_path.drop_prob == p and net.layer1[0].drop_path is None  # linear from 0
    x = torch.randn(32, blk.conv1.in_channels, 2, 2)

    def bottleneck_branch(t):
        out = blk.relu(blk.bn1(blk.conv1(t)))
        out = blk.relu(blk.bn2(blk.conv2(out)))
        return blk.bn3(blk.conv3(out))

    _branch_check(blk, x, bottleneck_branch, lambda t: t, nn.functional.relu, p)

    # MobileNetV2 inverted residual with an identity shortcut.
    net = models.create_model("mobilenetv2", "bn", width_mult=0.25, drop_path_rate=p)
    blk = net.features[16]
    assert blk.use_res_connect and blk.drop_path.drop_prob == pytest.approx(p * 15 / 16)
    assert net.features[2].drop_path is None  # no identity shortcut, no stochastic depth
    x = torch.randn(32, blk.conv[0][0].in_channels, 2, 2)
    _branch_check(blk, x, blk.conv, lambda t: t, lambda t: t, blk.drop_path.drop_prob)

    # AOGNet node op: drop path on the branch, before the residual addition.
    net = models.create_model("aognet12m", "bn", filter_list=(8, 16, 24, 32, 48), drop_path_rate=p, drop_rate=0.0)
    rates = [{n.drop_path.drop_prob if n.drop_path else 0.0 for n in b.nodes.values()} for b in net.modules()
             if isinstance(b, models.aognet.AOGBlock)]  # fmt: skip
    assert rates[0] == {0.0} and rates[-1] == {p} and all(len(r) == 1 for r in rates)
    node = next(n for n in net.stage4.block1.nodes.values() if n.shortcut is None)
    x = torch.randn(32, node.conv1.in_channels, 2, 2)

    def node_branch(t):
        out = node.relu(node.bn1(node.conv1(t)))
        out = node.relu(node.bn2(node.conv2(out)))
        return node.bn3(node.conv3(out))

    _branch_check(_Pair(node), x, node_branch, lambda t: t, nn.functional.relu, p)

    with pytest.raises(ValueError, match="densenet121 does not support option 'drop_path_rate'"):
        timm.create_model("anorm_densenet121_an", drop_path_rate=0.1)  # no residual branch
    m = timm.create_model("anorm_resnet18_bn", drop_path_rate=0.1, base_width=8)
    assert max(b.drop_path.drop_prob for b in m.modules() if hasattr(b, "drop_path") and b.drop_path) == 0.1


class _Pair(nn.Module):
    """A node op called with the same tensor as op input and residual input."""

    def __init__(self, node: nn.Module) -> None:
        super().__init__()
        self.node = node

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.node(x, x)


def test_pretrained_cfg_overlay_norm_override_and_own_weights(tmp_path):
    m = timm.create_model(
        "anorm_resnet18_an", base_width=8, pretrained_cfg_overlay=dict(input_size=(3, 160, 160), crop_pct=0.95)
    )
    data = timm.data.resolve_model_data_config(m)
    assert m.pretrained_cfg["input_size"] == (3, 160, 160) and data["input_size"] == (3, 160, 160)
    assert data["crop_pct"] == 0.95 and data["interpolation"] == "bilinear"
    m = timm.create_model("anorm_resnet50_bn", deep_stem=True, base_width=8)
    assert m.pretrained_cfg["first_conv"] == "conv1.0" and "conv1.0.weight" in m.state_dict()

    m = timm.create_model("anorm_resnet50_bn", norm="an", base_width=8)  # norm= overrides the name's norm
    assert sum(isinstance(x, an.AttentiveBatchNorm2d) for x in m.modules()) == 16

    with pytest.raises(ValueError, match=r"no pretrained weights are published.*pretrained_cfg_overlay=dict\(file="):
        timm.create_model("anorm_resnet18_an", pretrained=True)
    torch.manual_seed(3)
    trained = models.create_model("resnet18", "an", num_classes=10, base_width=8)
    path = tmp_path / "best.pth"
    torch.save({"model": trained.state_dict(), "epoch": 3}, path)  # the framework's checkpoint layout
    m = timm.create_model(
        "anorm_resnet18_an", pretrained=True, num_classes=10, base_width=8,
        pretrained_cfg_overlay=dict(file=str(path), num_classes=10),
    )  # fmt: skip
    for k, v in trained.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k


def test_device_and_dtype_keywords():
    m = timm.create_model("anorm_aognet12m_an", device="meta")
    assert models.count_params(m) == 12_373_355 and next(m.parameters()).is_meta
    m = timm.create_model("anorm_resnet18_an", base_width=8, dtype=torch.float64)
    assert next(m.parameters()).dtype == torch.float64


def test_global_pool_option_errors():
    with pytest.raises(ValueError, match=r"global_pool='' \(no pooling\).*num_classes=0"):
        models.create_model("resnet18", global_pool="")
    with pytest.raises(ValueError, match=r"'global_pool' must be one of 'avg', 'max'.*Did you mean 'avg'"):
        models.create_model("mobilenetv2", global_pool="avgg")
    assert {"global_pool", "drop_path_rate"} <= set(models.model_options("aognet12m"))
    assert "drop_path_rate" not in models.model_options("densenet121")


def test_a_registered_norm_gets_timm_names():
    """After an.register_norm, register_timm_models() adds its names (in a fresh process: timm's registry has
    no removal, and this test must not leave names behind)."""
    code = textwrap.dedent(
        """
        import timm, torch
        from torch import nn
        import an, models

        def instance_norm(num_features, *, eps=1e-5):
            return nn.InstanceNorm2d(num_features, eps=eps, affine=True)

        an.register_norm("in", instance_norm, plain="bn")
        assert not timm.is_model("anorm_resnet50_in")
        assert "anorm_resnet50_in" in models.register_timm_models()
        m = timm.create_model("anorm_resnet50_in", base_width=8)
        assert sum(isinstance(x, nn.InstanceNorm2d) for x in m.modules()) == 16
        print(timm.models.get_pretrained_cfg("anorm_resnet50_in").description)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    assert "norm='in'" in out.stdout
