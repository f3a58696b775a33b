"""Backbones and registry: every model x norm trains at reduced size, pinned parameter counts, placements,
errors, torchvision compatibility, timm registration, MAC counts and a golden-logits file.

Regenerate the golden file (only on purpose, e.g. after an intended init or numerics change):
``python -m tests.test_models --regen``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import an
import models
from models import count_macs, count_params, create_model

GOLDEN = Path(__file__).resolve().parent / "assets" / "models_golden.json"

# Reduced widths that keep every stage and block of the full model (depths untouched).
SMALL = {
    "resnet": {"base_width": 8},
    "densenet": {"growth_rate": 4, "bn_size": 2, "num_init_features": 8},
    "mobilenetv2": {"width_mult": 0.25},
    "aognet": {"filter_list": (8, 16, 24, 32, 48)},
}


pytestmark = pytest.mark.usefixtures("single_thread")


def small(name: str, **extra) -> dict:
    family = next(k for k in SMALL if name.startswith(k))
    return {**SMALL[family], **extra}


def meta(name: str, norm: str = "bn", **kwargs) -> nn.Module:
    with torch.device("meta"):
        return create_model(name, norm, **kwargs)


def test_registry_lists():
    assert models.list_models() == sorted(
        [
            "resnet18",
            "resnet34",
            "resnet50",
            "resnet101",
            "resnet152",
            "densenet121",
            "densenet169",
            "densenet201",
            "mobilenetv2",
            "aognet12m",
            "aognet40m",
        ]
    )
    assert an.list_norms()[:6] == ["bn", "gn", "sn", "an", "an_gn", "iebn"]
    assert an.list_attns() == ["se"]


def _supported(name: str, **kwargs) -> dict:
    """The subset of ``kwargs`` that the model takes as options."""
    return {k: v for k, v in kwargs.items() if k in models.model_options(name)}


VARIANTS = [(norm, {}) for norm in an.list_norms()] + [("bn", {"attn_layer": "se", "attn_kwargs": {"reduction": 4}})]


@pytest.mark.parametrize("name", models.list_models())
def test_every_norm_trains(name):
    """Forward + backward at reduced width for every registered norm and SE: shape, finite, every parameter
    gets a grad."""
    for norm, extra in VARIANTS:
        torch.manual_seed(0)
        m = create_model(name, norm, num_classes=7, **extra, **_supported(name, **small(name, zero_init_last=False)))
        y = m(torch.randn(2, 3, 64, 64))
        assert y.shape == (2, 7), (name, norm)
        assert torch.isfinite(y).all(), (name, norm)
        y.square().mean().backward()
        for pname, p in m.named_parameters():
            assert p.grad is not None, f"{name}/{norm}: {pname} got no gradient"
            assert torch.isfinite(p.grad).all(), f"{name}/{norm}: {pname} has a non-finite gradient"
        for lname, layer in _an_layers(m):  # every AN branch (mixture and attention) is used
            for pname, p in layer.named_parameters():
                assert p.grad.abs().sum() > 0, f"{name}/{norm}: {lname}.{pname} got a zero gradient"


# Exact counts of this implementation at 1000 classes; the paper's figure (docs/AN.md 5) is checked to 0.1%.
PARAMS = [
    ("resnet18", "bn", {}, 11_689_512, None),
    ("resnet34", "bn", {}, 21_797_672, 21.798e6),
    ("resnet34", "an", {}, 21_996_060, 21.996e6),  # AN at bn1 (the basic-block default)
    ("resnet50", "bn", {}, 25_557_032, 25.557e6),
    ("resnet50", "gn", {}, 25_557_032, 25.557e6),
    ("resnet50", "sn", {}, 25_557_350, 25.56e6),
    ("resnet50", "an", {}, 25_755_420, 25.755e6),
    ("resnet50", "an_gn", {}, 25_755_420, None),
    ("resnet50", "bn", {"attn_layer": "se"}, 28_088_024, 28.09e6),
    ("resnet50", "bn", {"attn_layer": "se", "attn_kwargs": {"bias": False}}, 28_071_976, 28.072e6),
    ("resnet50", "iebn", {}, 25_602_472, None),
    ("resnet50", "an", {"norm_placement": "bn3"}, 26_349_084, 26.349e6),
    ("resnet50", "an", {"norm_placement": "all"}, 26_947_472, 26.947e6),
    ("resnet50", "bn", {"deep_stem": True, "avg_down": True}, 25_576_264, 25.576e6),
    ("resnet50", "an", {"deep_stem": True, "avg_down": True}, 25_774_652, 25.775e6),
    ("resnet101", "bn", {}, 44_549_160, 44.549e6),
    ("resnet101", "an", {}, 45_000_644, 45.001e6),
    ("resnet101", "bn", {"deep_stem": True, "avg_down": True}, 44_568_392, 44.568e6),
    ("resnet101", "an", {"deep_stem": True, "avg_down": True}, 45_019_876, 45.020e6),
    ("resnet152", "bn", {}, 60_192_808, None),
    ("mobilenetv2", "bn", {}, 3_504_872, 3.505e6),
    ("mobilenetv2", "an", {}, 3_672_760, 3.673e6),
    ("densenet121", "bn", {}, 7_978_856, 7.979e6),
    ("densenet121", "an", {}, 8_342_288, 8.342e6),
    ("densenet169", "bn", {}, 14_149_480, None),
    ("densenet201", "bn", {}, 20_013_928, None),
    ("aognet12m", "bn", {}, 12_259_099, 12.259e6),
    ("aognet12m", "an", {}, 12_373_355, 12.373e6),
    ("aognet40m", "bn", {}, 40_153_004, 40.153e6),
    ("aognet40m", "an", {}, 40_388_880, 40.389e6),
]


def test_full_size_parameter_counts():
    for name, norm, kwargs, exact, paper in PARAMS:
        n = count_params(meta(name, norm, **kwargs))
        assert n == exact, (name, norm, kwargs, n)
        if paper is not None:
            assert abs(n - paper) / paper < 1e-3, (name, norm, kwargs, n, paper)


@pytest.mark.parametrize(
    ("name", "tv_name"),
    [
        ("resnet18", "resnet18"),
        ("resnet50", "resnet50"),
        ("resnet101", "resnet101"),
        ("densenet121", "densenet121"),
        ("densenet201", "densenet201"),
        ("mobilenetv2", "mobilenet_v2"),
    ],
)
def test_bn_models_match_torchvision_state_dict(name, tv_name):
    """With BN our names and shapes equal torchvision's, so its ImageNet weights load unchanged."""
    torchvision = pytest.importorskip("torchvision")
    with torch.device("meta"):
        ref = getattr(torchvision.models, tv_name)()
    ours = meta(name)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


def _an_layers(m: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, x) for n, x in m.named_modules() if isinstance(x, an.AttentiveNorm2d)]


def test_an_placement_and_k():
    # ResNet-50: bn2 of the 16 bottlenecks, K per stage.
    layers = _an_layers(meta("resnet50", "an"))
    assert len(layers) == 16 and all(n.endswith(".bn2") for n, _ in layers)
    assert {n.split(".")[0]: x.k for n, x in layers} == {"layer1": 10, "layer2": 10, "layer3": 20, "layer4": 20}
    assert len(_an_layers(meta("resnet101", "an"))) == 33
    # Basic blocks default to bn1; bn2 available.
    assert all(n.endswith(".bn1") for n, _ in _an_layers(meta("resnet34", "an")))
    assert all(n.endswith(".bn2") for n, _ in _an_layers(meta("resnet34", "an", norm_placement="bn2")))
    # 'all': every norm incl. stem and shortcuts; bn3 only bn3.
    m = meta("resnet50", "an", norm_placement="all")
    assert not [
        n
        for n, x in m.named_modules()
        if isinstance(x, nn.BatchNorm2d) and "attention" not in n and not n.endswith(".norm")
    ]
    assert isinstance(m.bn1, an.AttentiveNorm2d) and isinstance(m.layer1[0].downsample[1], an.AttentiveNorm2d)
    assert all(n.endswith(".bn3") for n, _ in _an_layers(meta("resnet50", "an", norm_placement="bn3")))
    # MobileNetV2: the 17 depthwise norms, K per (t, c, n, s) row.
    layers = _an_layers(meta("mobilenetv2", "an"))
    assert len(layers) == 17 and all(n.endswith("conv.0.1") or n.endswith("conv.1.1") for n, _ in layers)
    assert [x.k for _, x in layers] == [5] * 1 + [5] * 2 + [5] * 3 + [5] * 4 + [10] * 3 + [10] * 3 + [10]
    # DenseNet-121: norm2 of the 58 dense layers.
    layers = _an_layers(meta("densenet121", "an"))
    assert len(layers) == 58 and all(n.endswith(".norm2") for n, _ in layers)
    assert [x.k for _, x in layers] == [10] * 18 + [20] * 40
    # AOGNet: the 3x3 norm of full-width nodes (24 in 12M, 28 in 40M).
    layers = _an_layers(meta("aognet12m", "an"))
    assert len(layers) == 24 and all(n.endswith(".bn2") for n, _ in layers)
    assert len(_an_layers(meta("aognet40m", "an"))) == 28
    # Custom K.
    layers = _an_layers(meta("resnet50", "an", norm_k=[1, 2, 3, 4]))
    assert sorted({x.k for _, x in layers}) == [1, 2, 3, 4]


def test_an_gn_iebn_se_semantics():
    m = meta("resnet50", "an_gn")
    assert len(_an_layers(m)) == 16 and all(isinstance(x, an.AttentiveGroupNorm2d) for _, x in _an_layers(m))
    plain = [x for n, x in m.named_modules() if isinstance(x, nn.BatchNorm2d) and "attention" not in n]
    assert plain == []  # GN everywhere else (the only BNs are AN's attention BNs over the K logits)
    m = meta("resnet50", "iebn")
    assert isinstance(m.bn1, an.IEBatchNorm2d) and isinstance(m.layer1[0].bn3, an.IEBatchNorm2d)
    assert type(m.layer1[0].downsample[1]) is nn.BatchNorm2d  # projection shortcuts keep BN
    se_counts = {"resnet50": 16, "resnet18": 8, "mobilenetv2": 17, "densenet121": 58, "aognet12m": 4 * 7 + 3 * 21}
    for name, count in se_counts.items():
        m = meta(name, "bn", attn_layer="se")
        assert sum(isinstance(x, an.SqueezeExcite) for x in m.modules()) == count, name
    blk = meta("resnet50", "an", attn_layer="se").layer1[0]  # an attention layer combines with any norm
    assert list(dict(blk.named_children()))[:7] == ["conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "se"]
    assert blk.se.fc1.out_channels == 256 // 16 and blk.se.fc1.bias is not None
    for norm in ("gn", "an_gn"):  # GN groups fall back to a divisor of odd widths
        m = meta("mobilenetv2", norm)
        assert all(x.num_channels % x.num_groups == 0 for x in m.modules() if isinstance(x, nn.GroupNorm))


def test_zero_init_last_and_options():
    m = create_model("resnet50", "an", norm_placement="bn3", **small("resnet50"))
    assert all(b.bn3.mixture_weight.abs().sum() == 0 for b in m.modules() if isinstance(b, models.resnet.Bottleneck))
    m = create_model("resnet50", "bn", zero_init_last=False, **small("resnet50"))
    assert m.layer1[0].bn3.weight.abs().sum() > 0
    m = create_model("resnet50", "bn", **small("resnet50"))
    assert m.layer1[0].bn3.weight.abs().sum() == 0  # default on, as the official ResNet configs
    m = meta("resnet50", deep_stem=True, avg_down=True)
    assert isinstance(m.conv1, nn.Sequential) and isinstance(m.maxpool, nn.MaxPool2d) and m.maxpool.kernel_size == 2
    assert isinstance(m.layer2[0].downsample[0], nn.AvgPool2d) and m.layer2[0].downsample[1].stride == (1, 1)
    assert m.layer2[0].conv2.stride == (2, 2)  # v1.5
    m = meta("aognet12m")
    drops = {n.split(".")[0]: x.p for n, x in m.named_modules() if isinstance(x, nn.Dropout2d)}
    assert drops == {"stage3": 0.1, "stage4": 0.1}
    drops = {
        n.split(".")[0]: x.p for n, x in meta("aognet12m", drop_rate=0.2).named_modules() if isinstance(x, nn.Dropout2d)
    }
    assert drops == {"stage3": 0.2, "stage4": 0.2}
    assert meta("mobilenetv2").classifier[0].p == 0.2
    m = create_model("resnet18", "bn", num_classes=0, in_chans=1, **small("resnet18"))
    assert m(torch.randn(2, 1, 64, 64)).shape == (2, m.num_features)


def test_errors():
    with pytest.raises(ValueError, match=r"Unknown model 'resnet5'\. Did you mean 'resnet50'.*Valid models: aognet12m"):
        create_model("resnet5")
    with pytest.raises(ValueError, match=r"^mobilenetv2 does not support option 'deep_stem'\. Supported: norm, "):
        create_model("mobilenetv2", deep_stem=True)
    with pytest.raises(ValueError, match=r"densenet121 does not support option 'norm_placement'"):
        create_model("densenet121", norm_placement="bn2")
    with pytest.raises(ValueError, match=r"densenet121 does not support option 'zero_init_last'"):
        create_model("densenet121", zero_init_last=True)  # no residual branch
    with pytest.raises(ValueError, match=r"'norm_k' must have 4 entries \(one K per stage\)"):
        create_model("resnet50", "an", norm_k=[10, 10, 20])
    with pytest.raises(ValueError, match=r"'norm_k' must have 7 entries \(one K per inverted-residual row"):
        create_model("mobilenetv2", "an", norm_k=[10, 10, 20, 20])
    with pytest.raises(ValueError, match=r"'norm_k' must have 4 entries \(one K per dense block\)"):
        create_model("densenet121", "an", norm_k=[10])
    with pytest.raises(ValueError, match=r"Unknown norm 'bnn'.*Did you mean 'bn'"):
        create_model("resnet50", "bnn")
    with pytest.raises(ValueError, match=r"'norm_placement' must be one of 'bn1', 'bn2', 'all', got 'bn3'"):
        create_model("resnet18", "an", norm_placement="bn3")
    with pytest.raises(ValueError, match=r"'attention' must be one of 'hsigmoid', 'sigmoid', 'softmax'"):
        create_model("resnet50", "an", norm_kwargs={"attention": "relu"})
    with pytest.raises(ValueError, match=r"norm 'bn' got unexpected keyword\(s\) 'attention'"):
        create_model("resnet50", "bn", norm_kwargs={"attention": "sigmoid"})  # a BN has no attention
    with pytest.raises(ValueError, match=r"set K with 'norm_k'"):
        create_model("resnet50", "an", norm_kwargs={"k": 5})
    with pytest.raises(ValueError, match=r"Unknown attention layer 'sse'.*Did you mean 'se'"):
        create_model("resnet50", attn_layer="sse")
    with pytest.raises(ValueError, match=r"'attn_kwargs' given without 'attn_layer'"):
        create_model("resnet50", attn_kwargs={"reduction": 4})
    with pytest.raises(ValueError, match="must be True or False"):
        create_model("resnet50", deep_stem="yes")


def test_norm_kwargs_reach_the_right_positions():
    """AN's options reach the AN layers only; GN's groups reach every GN position of an_gn."""
    m = meta("resnet50", "an", norm_kwargs={"attention": "sigmoid", "eps": 1e-3})
    assert {x.attention.mode for _, x in _an_layers(m)} == {"sigmoid"}
    assert m.bn1.eps == 1e-3 and type(m.bn1) is nn.BatchNorm2d  # the shared option reaches the plain BNs too
    m = meta("resnet50", "an_gn", norm_kwargs={"groups": 16})
    gns = [x for x in m.modules() if isinstance(x, nn.GroupNorm)]
    assert gns and {x.num_groups for x in gns} == {16}


def test_timm_registration_is_best_effort(monkeypatch):
    """A registry API that changed (or fails) must not break anything: nothing registered, no exception."""
    timm_models = pytest.importorskip("timm.models")

    def broken(fn):
        raise TypeError("register_model() changed")

    monkeypatch.setattr(timm_models, "register_model", broken)
    monkeypatch.setattr(timm_models, "is_model", lambda name: False)
    assert models.register_timm_models() == []
    monkeypatch.setattr(models._timm, "_timm_api", lambda: None)
    assert models.register_timm_models() == []


def test_mac_counts():
    """conv + linear MACs at 224 (torchvision's convention); thop-style adds 4 per norm output element."""
    assert count_macs(meta("resnet50")) == 4_089_184_256
    assert count_macs(meta("resnet50", "an")) == 4_089_184_256  # AN keeps the MACs
    assert abs(count_macs(meta("mobilenetv2")) - 300.77e6) < 0.01e6
    assert abs(count_macs(meta("aognet12m"), norm_cost=4) - 2.175e9) < 0.005e9  # docs/AN.md 3.1: thop 2.17-2.18G
    m = create_model("resnet18", **small("resnet18")).train()
    count_macs(m, 64)
    assert m.training and m.layer1.training  # mode restored


def _golden_models() -> dict[str, nn.Module]:
    specs = {
        "resnet50_an": ("resnet50", "an", small("resnet50", zero_init_last=False)),
        "resnet18_se": (
            "resnet18",
            "bn",
            small("resnet18", zero_init_last=False, attn_layer="se", attn_kwargs={"reduction": 4}),
        ),
        "mobilenetv2_an": ("mobilenetv2", "an", small("mobilenetv2", drop_rate=0.0)),
        "densenet121_an_gn": ("densenet121", "an_gn", small("densenet121")),
        "aognet12m_an": ("aognet12m", "an", small("aognet12m", drop_rate=0.0)),
    }
    out = {}
    for key, (name, norm, kwargs) in specs.items():
        torch.manual_seed(0)
        out[key] = create_model(name, norm, num_classes=5, **kwargs)
    return out


def _golden_logits() -> dict[str, list[list[float]]]:
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return {k: m.train()(x).tolist() for k, m in _golden_models().items()}


def test_golden_logits():
    expected = json.loads(GOLDEN.read_text())
    got = _golden_logits()
    assert sorted(got) == sorted(expected["logits"])
    for key, logits in got.items():
        hint = f"{key} differs from {GOLDEN.name}; if intended, regenerate: python -m tests.test_models --regen"
        torch.testing.assert_close(
            torch.tensor(logits),
            torch.tensor(expected["logits"][key]),
            rtol=1e-4,
            atol=1e-5,
            msg=lambda m, hint=hint: f"{hint}\n{m}",
        )


def main(argv: list[str]) -> int:
    if argv != ["--regen"]:
        print("usage: python -m tests.test_models --regen   (rewrites tests/assets/models_golden.json)")
        return 2
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "about": "Logits of tiny fixed-seed models (tests/test_models.py::_golden_models), train-mode forward of "
        "torch.randn(2, 3, 64, 64) with seed 1. Regenerate: python -m tests.test_models --regen",
        "torch": torch.__version__,
        "logits": {k: [[round(v, 6) for v in row] for row in rows] for k, rows in _golden_logits().items()},
    }
    GOLDEN.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {GOLDEN}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
