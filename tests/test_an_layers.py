"""Tests of Switchable Normalization, IEBN and Squeeze-and-Excitation (an/switchable.py, an/iebn.py, an/se.py)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import an
from tests.conftest import gradcheck_layer, sgd_steps

pytestmark = pytest.mark.usefixtures("single_thread")


# ---------------------------------------------------------------------------------------------- SN
def naive_sn(layer: an.SwitchableNorm2d, x: torch.Tensor, training: bool) -> torch.Tensor:
    """SN from its definition (float64): IN, LN, BN moments, two softmax triplets, per-channel affine."""
    x = x.double()
    c = x.shape[1]
    mu_in = x.mean(dim=(2, 3), keepdim=True)
    var_in = ((x - mu_in) ** 2).mean(dim=(2, 3), keepdim=True)
    mu_ln = x.mean(dim=(1, 2, 3), keepdim=True)
    var_ln = ((x - mu_ln) ** 2).mean(dim=(1, 2, 3), keepdim=True)
    if training:
        mu_bn = x.mean(dim=(0, 2, 3), keepdim=True)
        var_bn = ((x - mu_bn) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    else:
        mu_bn = layer.running_mean.double().view(1, c, 1, 1)
        var_bn = layer.running_var.double().view(1, c, 1, 1)
    lm = layer.mean_weight.double()
    lv = layer.var_weight.double()
    wm = torch.exp(lm) / torch.exp(lm).sum()
    wv = torch.exp(lv) / torch.exp(lv).sum()
    mean = wm[0] * mu_in + wm[1] * mu_ln + wm[2] * mu_bn
    var = wv[0] * var_in + wv[1] * var_ln + wv[2] * var_bn
    x_hat = (x - mean) / torch.sqrt(var + layer.eps)
    return x_hat * layer.weight.double().view(1, c, 1, 1) + layer.bias.double().view(1, c, 1, 1)


def test_sn_init_and_weights_sum_to_one():
    layer = an.create_norm("sn", 16)
    for w in layer.mixture_weights():
        torch.testing.assert_close(w, torch.full((3,), 1 / 3))
    with torch.no_grad():
        layer.mean_weight.copy_(torch.tensor([0.3, -2.0, 1.5]))
        layer.var_weight.copy_(torch.tensor([4.0, 0.0, -1.0]))
    for w in layer.mixture_weights():
        assert abs(w.sum().item() - 1) < 1e-6 and (w > 0).all()
    assert sum(p.numel() for p in layer.parameters()) == 2 * 16 + 6


@pytest.mark.parametrize("shape", [(4, 8, 5, 5), (3, 16, 1, 1)])
def test_sn_matches_naive_reference(shape):
    torch.manual_seed(0)
    layer = an.create_norm("sn", shape[1])
    sgd_steps(layer, shape)
    assert not torch.allclose(layer.mean_weight, torch.zeros(3))  # the mixture learned something
    x = torch.randn(shape) * 2 + 1
    layer.train()
    torch.testing.assert_close(layer(x).double(), naive_sn(layer, x, True), atol=1e-4, rtol=1e-4)
    layer.eval()
    torch.testing.assert_close(layer(x).double(), naive_sn(layer, x, False), atol=1e-4, rtol=1e-4)


def _one_hot(layer: an.SwitchableNorm2d, idx: int) -> None:
    logits = torch.full((3,), float("-inf"))
    logits[idx] = 0.0
    with torch.no_grad():
        layer.mean_weight.copy_(logits)
        layer.var_weight.copy_(logits)


def test_sn_one_hot_reduces_to_in_ln_bn():
    torch.manual_seed(1)
    c = 8
    x = torch.randn(4, c, 5, 5) * 3 + 1
    layer = an.create_norm("sn", c)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    w, b = layer.weight.detach(), layer.bias.detach()
    _one_hot(layer, 0)
    torch.testing.assert_close(layer(x), F.instance_norm(x, weight=w, bias=b, eps=1e-5), atol=1e-5, rtol=1e-5)
    _one_hot(layer, 1)
    torch.testing.assert_close(layer(x), F.group_norm(x, 1, w, b, eps=1e-5), atol=1e-5, rtol=1e-5)
    _one_hot(layer, 2)
    layer.reset_running_stats()
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.weight.copy_(w)
        bn.bias.copy_(b)
    for step in range(3):
        xs = torch.randn(4, c, 5, 5) * (step + 1) - step
        torch.testing.assert_close(layer(xs), bn(xs), atol=1e-5, rtol=1e-5)
    # The BN part's running statistics are BatchNorm's, and eval uses them.
    torch.testing.assert_close(layer.running_mean, bn.running_mean)
    torch.testing.assert_close(layer.running_var, bn.running_var)
    assert layer.num_batches_tracked.item() == 3
    layer.eval()
    bn.eval()
    torch.testing.assert_close(layer(x), bn(x), atol=1e-5, rtol=1e-5)


def test_sn_eval_uses_running_stats_and_is_per_sample():
    torch.manual_seed(2)
    layer = an.create_norm("sn", 8)
    sgd_steps(layer, (6, 8, 4, 4))
    layer.eval()
    x = torch.randn(6, 8, 4, 4)
    before = layer(x)
    torch.testing.assert_close(layer(x[1:2]), before[1:2])
    with torch.no_grad():
        layer.running_mean.add_(1.0)
    assert not torch.allclose(layer(x), before, atol=1e-3)  # eval output follows the running statistics


@pytest.mark.parametrize("training", [True, False])
def test_sn_gradcheck(training):
    torch.manual_seed(3)
    layer = an.create_norm("sn", 4).double()
    with torch.no_grad():
        layer.mean_weight.copy_(torch.tensor([0.2, -0.4, 0.1]))
        layer.var_weight.copy_(torch.tensor([-0.3, 0.5, 0.0]))
        layer.running_var.uniform_(0.5, 2.0)
    layer.train(training)
    gradcheck_layer(layer, (torch.randn(4, 4, 3, 3, dtype=torch.float64) * 2).requires_grad_())


# ---------------------------------------------------------------------------------------------- IEBN
def naive_iebn(layer: an.IEBatchNorm2d, x: torch.Tensor, training: bool) -> torch.Tensor:
    x = x.double()
    c = x.shape[1]
    if training:
        mu = x.mean(dim=(0, 2, 3), keepdim=True)
        var = ((x - mu) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    else:
        mu = layer.norm.running_mean.double().view(1, c, 1, 1)
        var = layer.norm.running_var.double().view(1, c, 1, 1)
    x_hat = (x - mu) / torch.sqrt(var + layer.norm.eps)
    m = x.mean(dim=(2, 3), keepdim=True)
    a, b = layer.gate_weight.double().view(1, c, 1, 1), layer.gate_bias.double().view(1, c, 1, 1)
    gate = 1 / (1 + torch.exp(-(a * m + b)))
    return x_hat * layer.weight.double().view(1, c, 1, 1) * gate + layer.bias.double().view(1, c, 1, 1)


def test_iebn_init():
    layer = an.create_norm("iebn", 8)
    assert torch.all(layer.weight == 1) and torch.all(layer.bias == 0)
    assert torch.all(layer.gate_weight == 0) and torch.all(layer.gate_bias == -1)
    assert sum(p.numel() for p in layer.parameters()) == 4 * 8
    x = torch.randn(4, 8, 5, 5)
    bn = nn.BatchNorm2d(8, affine=False)
    torch.testing.assert_close(layer(x), bn(x) * torch.sigmoid(torch.tensor(-1.0)))  # gate sigma(-1) at init


@pytest.mark.parametrize("shape", [(4, 8, 5, 5), (3, 16, 1, 1)])
def test_iebn_matches_naive_reference(shape):
    torch.manual_seed(4)
    layer = an.create_norm("iebn", shape[1])
    sgd_steps(layer, shape)
    assert not torch.allclose(layer.gate_weight, torch.zeros(shape[1]))
    x = torch.randn(shape) * 2 + 1
    layer.train()
    torch.testing.assert_close(layer(x).double(), naive_iebn(layer, x, True), atol=1e-4, rtol=1e-4)
    layer.eval()
    torch.testing.assert_close(layer(x).double(), naive_iebn(layer, x, False), atol=1e-4, rtol=1e-4)


def test_iebn_running_stats_match_batchnorm():
    torch.manual_seed(5)
    layer = an.create_norm("iebn", 8)
    bn = nn.BatchNorm2d(8, affine=False)
    for step in range(3):
        x = torch.randn(4, 8, 5, 5) * (step + 1) + step
        layer(x)
        bn(x)
    torch.testing.assert_close(layer.norm.running_mean, bn.running_mean)
    torch.testing.assert_close(layer.norm.running_var, bn.running_var)


@pytest.mark.parametrize("training", [True, False])
def test_iebn_gradcheck(training):
    torch.manual_seed(6)
    layer = an.create_norm("iebn", 4).double()
    with torch.no_grad():
        layer.gate_weight.uniform_(-1, 1)
        layer.norm.running_var.uniform_(0.5, 2.0)
    layer.train(training)
    gradcheck_layer(layer, (torch.randn(4, 4, 3, 3, dtype=torch.float64) * 2).requires_grad_())


# ---------------------------------------------------------------------------------------------- SE
def test_se_shape_forward_and_param_count():
    torch.manual_seed(7)
    se = an.SqueezeExcite(64, reduction=16)
    x = torch.randn(2, 64, 7, 7)
    y = se(x)
    assert y.shape == x.shape
    s = torch.sigmoid(se.fc2(torch.relu(se.fc1(x.mean((2, 3), keepdim=True)))))
    torch.testing.assert_close(y, x * s)
    assert sum(p.numel() for p in se.parameters()) == 2 * 64 * 4 + 4 + 64
    assert sum(p.numel() for p in an.SqueezeExcite(64, bias=False).parameters()) == 2 * 64 * 4
    assert an.SqueezeExcite(8, reduction=16).fc1.out_channels == 1
    with pytest.raises(ValueError, match="reduction"):
        an.SqueezeExcite(64, reduction=0)


def test_se_resnet50_parameter_totals():
    """SE after bn3 of every ResNet-50 bottleneck: 28.09M with biased FCs, 28.07M without (docs/AN.md 8)."""
    resnet50 = 25_557_032
    blocks = {256: 3, 512: 4, 1024: 6, 2048: 3}

    def total(bias: bool) -> int:
        return resnet50 + sum(
            n * sum(p.numel() for p in an.SqueezeExcite(c, bias=bias).parameters()) for c, n in blocks.items()
        )

    assert total(True) == 28_088_024
    assert total(False) == 28_071_976
