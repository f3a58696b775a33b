"""Tests of param_groups, zero_init_ and mixed precision (an/policy.py and every layer's autocast handling)."""

import pytest
import torch
from torch import nn

import an

pytestmark = pytest.mark.usefixtures("single_thread")


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3, bias=False)
        self.bn = nn.BatchNorm2d(32)
        self.an = an.create_norm("an", 32, k=4)
        self.an_gn = an.create_norm("an_gn", 32, k=3, groups=8)
        self.sn = an.create_norm("sn", 32)
        self.iebn = an.create_norm("iebn", 32)
        self.gn = an.create_norm("gn", 32, groups=8)
        self.se = an.SqueezeExcite(32, reduction=8)
        self.fc = nn.Linear(32, 10)
        self.fc2 = self.fc  # a shared module: its parameters must still be listed once


EXPECTED_GROUP = {
    "conv.weight": "weight",
    "bn.weight": "norm",
    "bn.bias": "norm",
    "an.mixture_weight": "an_mixture",
    "an.mixture_bias": "an_mixture",
    "an.attention.conv.weight": "weight",
    "an.attention.bn.weight": "norm",
    "an.attention.bn.bias": "norm",
    "an_gn.mixture_weight": "an_mixture",
    "an_gn.mixture_bias": "an_mixture",
    "an_gn.attention.conv.weight": "weight",
    "an_gn.attention.bn.weight": "norm",
    "an_gn.attention.bn.bias": "norm",
    "sn.weight": "norm",
    "sn.bias": "norm",
    "sn.mean_weight": "norm",
    "sn.var_weight": "norm",
    "iebn.weight": "norm",
    "iebn.bias": "norm",
    "iebn.gate_weight": "norm",
    "iebn.gate_bias": "norm",
    "gn.weight": "norm",
    "gn.bias": "norm",
    "se.fc1.weight": "weight",
    "se.fc1.bias": "bias",
    "se.fc2.weight": "weight",
    "se.fc2.bias": "bias",
    "fc.weight": "weight",
    "fc.bias": "bias",
}


@pytest.mark.parametrize("decay_norm", [True, False])
def test_param_groups_assign_every_parameter_once(decay_norm):
    model = _Net()
    groups = an.param_groups(model, 1e-4, decay_norm=decay_norm)
    assert [g["name"] for g in groups] == ["weight", "norm", "an_mixture", "bias"]
    where = {n: g["name"] for g in groups for n in g["param_names"]}
    assert where == EXPECTED_GROUP
    listed = [p for g in groups for p in g["params"]]
    assert len(listed) == len({id(p) for p in listed}) == len(list(model.parameters()))
    assert {id(p) for p in listed} == {id(p) for p in model.parameters()}
    named = dict(model.named_parameters())
    for g in groups:
        assert all(p is named[n] for n, p in zip(g["param_names"], g["params"]))
        expected_wd = 1e-4 if (decay_norm or g["name"] == "weight") else 0.0
        assert g["weight_decay"] == expected_wd, g["name"]
    opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9)  # usable as-is
    assert len(opt.param_groups) == 4


def test_param_groups_skip_empty_groups():
    groups = an.param_groups(nn.Conv2d(3, 8, 3, bias=False), 0.1, decay_norm=False)
    assert [(g["name"], g["weight_decay"]) for g in groups] == [("weight", 0.1)]


# ---------------------------------------------------------------------------------------------- zero-init
@pytest.mark.parametrize("name", an.list_norms())
def test_zero_init_makes_output_exactly_zero(name):
    torch.manual_seed(0)
    layer = an.create_norm(name, 32)
    assert an.zero_init_(layer) is layer
    x = torch.randn(4, 32, 5, 5) * 3 + 1
    for training in (True, False):
        layer.train(training)
        y = layer(x)
        assert torch.count_nonzero(y) == 0, (name, training)
    if name in ("an", "an_gn"):
        assert torch.all(layer.mixture_weight == 0) and torch.all(layer.mixture_bias == 0)
        # Gamma/B still receive gradient, so the branch can start learning.
        layer.train()
        layer(x).mul(torch.randn_like(x)).sum().backward()
        assert layer.mixture_weight.grad.abs().sum() > 0
    elif name == "iebn":
        assert torch.all(layer.weight == 0) and torch.all(layer.bias == 0)
    else:
        assert torch.all(layer.weight == 0)


def test_zero_init_rejects_layers_without_gamma():
    with pytest.raises(TypeError, match="zero_init_"):
        an.zero_init_(nn.BatchNorm2d(8, affine=False))
    with pytest.raises(TypeError, match="SqueezeExcite"):
        an.zero_init_(an.SqueezeExcite(32))


# ---------------------------------------------------------------------------------------------- mixed precision
MP_NORMS = [n for n in an.list_norms() if n not in ("bn", "gn")]  # ours: torch's own BN/GN need no check


@pytest.mark.parametrize("name", MP_NORMS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_runs_in_float32_and_returns_input_dtype(name, dtype):
    torch.manual_seed(1)
    layer = an.create_norm(name, 32)
    lam_dtypes = []
    if name.startswith("an"):
        layer.attention.register_forward_hook(lambda m, i, out: lam_dtypes.append(out.dtype))
    x = (torch.randn(4, 32, 5, 5) * 2 + 1).to(dtype)
    ref = layer(x.float())  # float32 everywhere, same (rounded) input
    xg = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=dtype):
        y = layer(xg)
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), ref, atol=2e-2, rtol=1e-2)  # only the output is rounded
    if lam_dtypes:
        assert lam_dtypes == [torch.float32, torch.float32]
    y.float().sum().backward()
    assert xg.grad.dtype == dtype and torch.isfinite(xg.grad.float()).all()
    for p in layer.parameters():
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32
    with torch.autocast("cpu", dtype=dtype):  # float32 input stays float32
        assert layer(x.float()).dtype == torch.float32


@pytest.mark.parametrize("name", MP_NORMS)
def test_fp16_large_activations_do_not_overflow(name):
    """Variances of ~1e6 overflow float16 (max 65504): correct results prove the statistics are float32."""
    torch.manual_seed(2)
    layer = an.create_norm(name, 32)
    x = (torch.randn(4, 32, 5, 5) * 1000 + 300).half()
    ref = layer(x.float())
    with torch.autocast("cpu", dtype=torch.float16):
        y = layer(x)
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), ref, atol=2e-2, rtol=1e-2)
    layer.eval()
    with torch.autocast("cpu", dtype=torch.float16):
        assert torch.isfinite(layer(x)).all()


def test_autocast_matches_fp32_in_eval_mode_after_training():
    torch.manual_seed(3)
    layer = an.create_norm("an", 16, k=5)
    for _ in range(3):
        layer(torch.randn(4, 16, 5, 5))
    layer.eval()
    x = torch.randn(4, 16, 5, 5).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    torch.testing.assert_close(y.float(), layer(x.float()), atol=2e-2, rtol=1e-2)
