"""Our norm layers in other frameworks' builders and tools: torchvision's and timm's ``norm_layer``, timm's norm+act
layers, TorchScript, torch.jit.trace, torch.fx and torch.export, SyncBN converters (an/registry.py, an/norm_act.py,
an/standardize.py, the layers' ``forward_plain``)."""

from __future__ import annotations

import copy
import functools
import io

import pytest
import torch
from torch import nn

import an

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

pytestmark = pytest.mark.usefixtures("single_thread")


def _count(model: nn.Module, kind: type = an.AttentiveNorm2d) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


# ------------------------------------------------------------------------------------------- builders
def test_torchvision_builders_take_our_norm_layer():
    """torchvision's init loop sets .weight/.bias of every nn.BatchNorm2d/nn.GroupNorm: AN's standardizer is neither."""
    torch.manual_seed(0)
    m = torchvision.models.resnet50(norm_layer=an.get_norm_layer("an", k=4), zero_init_residual=True)
    assert _count(m) == 53 and all(x.k == 4 for x in m.modules() if isinstance(x, an.AttentiveNorm2d))
    bn = m.layer1[0].bn2
    assert bn.weight is None and isinstance(bn.norm, an.BatchStandardize2d)
    assert torch.equal(bn.attention.bn.weight, torch.ones(4))  # the init loop reached the attention BN: 1, 0
    m18 = torchvision.models.resnet18(norm_layer=an.get_norm_layer("iebn"), zero_init_residual=True)
    assert torch.equal(m18.layer1[0].bn2.weight, torch.zeros(64))  # IEBN has a per-channel weight: zero-init works
    mnv2 = torchvision.models.mobilenet_v2(norm_layer=an.get_norm_layer("an_gn", k=3, groups=8))
    assert _count(mnv2, an.AttentiveGroupNorm2d) == 52
    for model in (m, m18, mnv2):
        y = model.train()(torch.randn(2, 3, 64, 64))
        y.sum().backward()
        assert y.shape == (2, 1000) and torch.isfinite(y).all()


def test_timm_builders_take_our_norm_layer_and_norm_act_layer():
    norm_layer = an.get_norm_layer("an", k=5, attention="sigmoid")
    # timm unbinds a partial's keywords and rebinds them: name and options survive.
    unbound = timm.layers.get_norm_layer(norm_layer)
    assert isinstance(unbound, functools.partial) and unbound.keywords == norm_layer.keywords
    layer = timm.layers.create_norm_layer(norm_layer, 32, device="meta", dtype=torch.float64)
    assert isinstance(layer, an.AttentiveBatchNorm2d) and layer.k == 5 and layer.attention.mode == "sigmoid"
    assert layer.mixture_weight.is_meta and layer.mixture_weight.dtype == torch.float64
    m = timm.create_model("resnet50", norm_layer=norm_layer, num_classes=3)
    assert _count(m) == 53
    with torch.device("meta"):  # timm passes device=/dtype= to norm layers; so does building under a device
        assert next(timm.create_model("resnet18", norm_layer=an.AttentiveBatchNorm2d).parameters()).is_meta
    # EfficientNet-style builders call a norm+act layer; the activation is bound by get_norm_act_layer.
    eff = timm.create_model("efficientnet_b0", norm_layer=an.get_norm_act_layer("an", act_layer=nn.SiLU, k=5))
    wrappers = [x for x in eff.modules() if isinstance(x, an.NormAct2d)]
    assert len(wrappers) == _count(eff) == 49
    assert type(eff.blocks[1][0].bn2.act) is nn.SiLU and type(eff.blocks[1][0].bn3.act) is nn.Identity  # apply_act
    y = eff.train()(torch.randn(2, 3, 64, 64))
    y.sum().backward()
    assert torch.isfinite(y).all()
    with pytest.raises(TypeError, match=r"no activation is bound.*get_norm_act_layer\('an'"):
        timm.create_model("efficientnet_b0", norm_layer=an.get_norm_layer("an"))


def test_norm_layer_keywords_checked_and_norm_act_conventions():
    with pytest.raises(TypeError, match="unexpected keyword"):
        an.get_norm_layer("an", kk=3)
    layer = an.get_norm_act_layer("bn", act_layer="hard_swish")(8, inplace=False, drop_layer=nn.Dropout)
    assert isinstance(layer, an.NormAct2d) and type(layer.act) is nn.Hardswish and not layer.act.inplace
    assert type(layer.drop) is nn.Dropout and layer.num_features == 8
    gelu = an.get_norm_act_layer("gn", act_layer=nn.GELU, groups=2)(8)  # GELU takes no inplace: dropped
    assert type(gelu.act) is nn.GELU and gelu.num_features == 8
    assert type(an.get_norm_act_layer("sn", act_layer=None)(8).act) is nn.Identity
    with pytest.raises(ValueError, match="Unknown activation 'sily'"):
        an.get_norm_act_layer("bn", act_layer="sily")(8)
    x = torch.randn(2, 8, 4, 4)
    ref = nn.BatchNorm2d(8)
    plain = an.get_norm_layer("bn")(8)
    assert type(plain) is nn.BatchNorm2d
    torch.testing.assert_close(an.get_norm_act_layer("bn", act_layer=nn.ReLU)(8)(x), torch.relu(ref(x)))


@pytest.mark.parametrize("name", ["bn", "gn", "sn", "an", "an_gn", "iebn"])
def test_every_norm_builds_on_a_device_and_dtype(name):
    options = {"groups": 4} if name in ("gn", "an_gn") else {}
    layer = an.create_norm(name, 16, device="meta", dtype=torch.float64, **options)
    tensors = [*layer.parameters(), *layer.buffers()]
    assert all(t.is_meta for t in tensors)
    assert {t.dtype for t in tensors if t.is_floating_point()} <= {torch.float64}


def test_layer_classes_take_device_and_dtype():
    for cls in (an.AttentiveBatchNorm2d, an.AttentiveGroupNorm2d, an.IEBatchNorm2d, an.SwitchableNorm2d):
        layer = cls(32, device="meta", dtype=torch.bfloat16)
        assert all(p.is_meta and p.dtype == torch.bfloat16 for p in layer.parameters()), cls.__name__


# ----------------------------------------------------------------------------------- script / trace / fx / export
LAYERS = [
    ("bn", {}),
    ("gn", {"groups": 4}),
    ("sn", {}),
    ("iebn", {}),
    ("an", {"k": 3}),
    ("an", {"k": 3, "attention": "softmax"}),
    ("an_gn", {"k": 3, "groups": 4}),
    ("an", {"k": 3, "impl": "fused"}),
    ("an", {"k": 3, "impl": "compile"}),
    ("an_gn", {"k": 3, "groups": 4, "impl": "fused"}),
    ("an_gn", {"k": 3, "groups": 4, "impl": "compile"}),
]


def _layer(name: str, options: dict) -> nn.Module:
    torch.manual_seed(0)
    layer = an.create_norm(name, 8, **options)
    with torch.no_grad():  # away from the init values, so every parameter matters
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return layer


def _script(layer):
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(layer), buf)
    buf.seek(0)
    return torch.jit.load(buf)


def _trace(layer, x):
    buf = io.BytesIO()
    torch.jit.save(torch.jit.trace(layer, x, check_trace=False), buf)
    buf.seek(0)
    return torch.jit.load(buf)


@pytest.mark.parametrize(("name", "options"), LAYERS, ids=[f"{n}-{'-'.join(map(str, o.values()))}" for n, o in LAYERS])
@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")
def test_every_norm_layer_scripts_traces_and_exports(name, options):
    """TorchScript (saved and loaded), torch.jit.trace (saved and loaded), torch.fx and torch.export compute the
    eager layer's output, input gradient and running statistics, in training and in eval mode."""
    x = torch.randn(4, 8, 5, 5) * 2 + 1
    g = torch.randn(4, 8, 5, 5)
    for training in (True, False):
        ref = _layer(name, options).train(training)
        xr = x.clone().requires_grad_()
        yr = ref(xr)
        (yr * g).sum().backward()
        variants = {
            "script": lambda layer: _script(layer),
            "trace": lambda layer: _trace(layer, x),
            "fx": lambda layer: torch.fx.symbolic_trace(layer) if name != "bn" else layer,  # torch's BN: not fx-able
            "export": lambda layer: torch.export.export(layer, (x,)).module(),
        }
        for kind, make in variants.items():
            fresh = _layer(name, options).train(training)
            other = make(fresh)  # an exported program keeps the mode it was exported in
            xo = x.clone().requires_grad_()
            yo = other(xo)
            torch.testing.assert_close(yo, yr, rtol=1e-5, atol=1e-5, msg=f"{kind} output")
            (yo * g).sum().backward()
            torch.testing.assert_close(xo.grad, xr.grad, rtol=1e-4, atol=1e-5, msg=f"{kind} input gradient")
            got = dict(other.named_buffers()) if kind != "trace" else {}  # tracing itself runs (and updates) once
            for key, value in ref.named_buffers():
                if key in got and not key.endswith("num_batches_tracked"):
                    torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=f"{kind} {key}")


def test_traced_an_follows_the_input_size():
    """H*W enters the traced graph as a tensor: a trace made at one size computes the layer at another."""
    layer = _layer("an", {"k": 3}).eval()
    traced = _trace(layer, torch.randn(2, 8, 5, 5))
    x = torch.randn(3, 8, 9, 7)
    torch.testing.assert_close(traced(x), layer(x), rtol=1e-5, atol=1e-5)
    one = torch.randn(3, 8, 1, 1)  # H*W == 1: unbiased variance 0, as the eager layer
    torch.testing.assert_close(traced(one), layer(one), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------- SyncBN converters
def test_sync_converters_keep_an_whole_torch_and_timm():
    model = nn.Sequential(an.create_norm("an", 8, k=3), an.create_norm("iebn", 8))
    torch_synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    # torch's own converter now converts the standardizer (an affine-free _BatchNorm) and nothing else of AN.
    assert type(torch_synced[0]) is an.AttentiveBatchNorm2d and type(torch_synced[0].norm) is nn.SyncBatchNorm
    assert not torch_synced[0].norm.affine and type(torch_synced[1].norm) is nn.SyncBatchNorm
    x = torch.randn(4, 8, 3, 3)
    torch.testing.assert_close(torch_synced(x), copy.deepcopy(model)(x))
    tm = timm.create_model("efficientnet_b0", num_classes=2)
    synced = an.convert_sync_norm(tm)
    assert type(synced.bn1).__name__ == "SyncBatchNormAct" and type(synced.bn1.act) is nn.SiLU
