"""Tests of the norm factory and of Attentive Normalization (an/factory.py, an/attentive.py, an/functional.py).

The AN references below are written from ``docs/AN.md`` section 1.1 with explicit formulas and a Python loop over K,
independently of the vectorised implementation.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import an
from an.functional import channel_affine, channel_stats
from tests.conftest import gradcheck_layer, sgd_steps

pytestmark = pytest.mark.usefixtures("single_thread")


SHAPES = [(4, 32, 5, 5), (2, 64, 7, 7), (3, 32, 1, 1)]


# ---------------------------------------------------------------------------------------------- naive reference
def naive_an(layer: an.AttentiveNorm2d, x: torch.Tensor, training: bool) -> torch.Tensor:
    """AN forward in float64 from the spec: squeeze -> excitation -> standardize -> mixture (loop over K)."""
    x = x.double()
    n, c, h, w = x.shape
    k = layer.k
    att = layer.attention
    # Squeeze from the raw input: mean / sqrt(unbiased var + 1e-3); the variance is taken as 0 at 1x1.
    m = x.sum(dim=(2, 3)) / (h * w)
    if h * w > 1:
        v = ((x - m[:, :, None, None]) ** 2).sum(dim=(2, 3)) / (h * w - 1)
    else:
        v = torch.zeros_like(m)
    s = m / torch.sqrt(v + 1e-3)
    # Excitation: bias-free conv C->K, BN over the K logits, activation.
    wk = att.conv.weight.double().reshape(k, c)
    z = torch.stack([(s * wk[j]).sum(dim=1) for j in range(k)], dim=1)
    if training:
        mu_z = z.mean(dim=0)
        var_z = ((z - mu_z) ** 2).mean(dim=0)
    else:
        mu_z, var_z = att.bn.running_mean.double(), att.bn.running_var.double()
    t = (z - mu_z) / torch.sqrt(var_z + att.bn.eps) * att.bn.weight.double() + att.bn.bias.double()
    if att.mode == "hsigmoid":
        lam = torch.clamp(t + 3.0, 0.0, 6.0) / 6.0
    elif att.mode == "sigmoid":
        lam = 1.0 / (1.0 + torch.exp(-t))
    else:
        lam = torch.exp(t) / torch.exp(t).sum(dim=1, keepdim=True)
    # Standardization.
    norm = layer.norm
    if hasattr(norm, "num_groups"):  # GN standardizer
        g = norm.num_groups
        xg = x.reshape(n, g, -1)
        mu_g = xg.mean(dim=2, keepdim=True)
        var_g = ((xg - mu_g) ** 2).mean(dim=2, keepdim=True)
        x_hat = ((xg - mu_g) / torch.sqrt(var_g + norm.eps)).reshape(n, c, h, w)
    else:
        if training:
            mu = x.mean(dim=(0, 2, 3))
            var = ((x - mu[None, :, None, None]) ** 2).mean(dim=(0, 2, 3))
        else:
            mu, var = norm.running_mean.double(), norm.running_var.double()
        x_hat = (x - mu[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + norm.eps)
    # Mixture of K affine transforms.
    gamma = torch.zeros(n, c, dtype=torch.float64)
    beta = torch.zeros(n, c, dtype=torch.float64)
    for j in range(k):
        gamma = gamma + lam[:, j : j + 1] * layer.mixture_weight[j].double()
        beta = beta + lam[:, j : j + 1] * layer.mixture_bias[j].double()
    return gamma[:, :, None, None] * x_hat + beta[:, :, None, None]


def _make(name: str, c: int, groups: int = 8, **kwargs) -> nn.Module:
    """create_norm, passing ``groups`` only to the GN-based norm."""
    return an.create_norm(name, c, **kwargs, **({"groups": groups} if name == "an_gn" else {}))


# ---------------------------------------------------------------------------------------------- factory
def test_list_norms():
    assert an.list_norms() == ["bn", "gn", "sn", "an", "an_gn", "iebn"]  # the built-in ones, in this order


@pytest.mark.parametrize("name", an.list_norms())
@pytest.mark.parametrize("shape", SHAPES)
def test_every_norm_forward_backward(name, shape):
    torch.manual_seed(0)
    layer = an.create_norm(name, shape[1])
    x = (torch.randn(shape) * 2 + 1).requires_grad_()
    y = layer(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.isfinite(y).all()
    (y * torch.randn_like(y)).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for p_name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), p_name
    layer.eval()
    with torch.no_grad():
        assert torch.isfinite(layer(x)).all()


def test_factory_types_and_defaults():
    assert type(an.create_norm("bn", 8)) is nn.BatchNorm2d
    gn = an.create_norm("gn", 64)
    assert type(gn) is nn.GroupNorm and gn.num_groups == 32
    assert an.create_norm("gn", 48, groups=16).num_groups == 16
    layer = an.create_norm("an", 64)
    assert type(layer) is an.AttentiveBatchNorm2d and layer.k == 10 and layer.attention.mode == "hsigmoid"
    # The standardizer is affine-free BN, but not an nn.BatchNorm2d (builders' init loops set .weight of those).
    assert type(layer.norm) is an.BatchStandardize2d and not layer.norm.affine
    angn_norm = an.create_norm("an_gn", 64).norm
    assert not isinstance(layer.norm, nn.BatchNorm2d) and not isinstance(angn_norm, nn.GroupNorm)
    assert type(angn_norm) is an.GroupStandardize2d and not angn_norm.affine
    assert layer.norm.eps == 1e-5 and layer.norm.momentum == 0.1 and layer.attention.bn.momentum == 0.1
    assert an.create_norm("AN", 8, k=3, attention="softmax").attention.mode == "softmax"
    angn = an.create_norm("an-gn", 64, k=4, groups=16)
    assert type(angn) is an.AttentiveGroupNorm2d and angn.norm.num_groups == 16 and not angn.norm.affine
    assert type(an.create_norm("sn", 8)) is an.SwitchableNorm2d
    assert type(an.create_norm("iebn", 8)) is an.IEBatchNorm2d
    assert type(an.create_norm("an", 8, impl="reference")) is an.AttentiveBatchNorm2d


def test_get_norm_layer():
    ctor = an.get_norm_layer("an", k=20, attention="sigmoid")
    layer = ctor(256)
    assert isinstance(layer, an.AttentiveBatchNorm2d) and layer.k == 20 and layer.num_features == 256
    assert layer.attention.mode == "sigmoid"
    assert isinstance(an.get_norm_layer("bn")(16), nn.BatchNorm2d)
    with pytest.raises(TypeError, match="'k'"):
        an.get_norm_layer("gn", k=3)  # keyword names are checked eagerly
    with pytest.raises(ValueError, match="Did you mean 'an_gn'"):
        an.get_norm_layer("an_gm")
    assert an.get_norm_layer(nn.BatchNorm2d, eps=1e-3)(8).eps == 1e-3  # callables pass through


def test_factory_errors():
    with pytest.raises(ValueError, match=r"Unknown norm 'batchnorm'.*Valid norms: bn, gn, sn, an, an_gn, iebn"):
        an.create_norm("batchnorm", 8)
    with pytest.raises(ValueError, match="Did you mean 'iebn'"):
        an.create_norm("iebm", 8)
    with pytest.raises(TypeError, match=r"unexpected keyword.*'k'.*Valid keywords for 'bn': eps, momentum"):
        an.create_norm("bn", 64, k=3)
    with pytest.raises(TypeError, match="Did you mean 'k'"):
        an.create_norm("an", 64, K=3)
    for k in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match=r"k .*must be an integer >= 1"):
            an.create_norm("an", 64, k=k)
    with pytest.raises(ValueError, match=r"k .*>= 1"):
        an.create_norm("an_gn", 64, k=0)
    with pytest.raises(ValueError, match=r"'attention' must be one of 'hsigmoid', 'sigmoid', 'softmax', got 'relu'"):
        an.create_norm("an", 64, attention="relu")
    with pytest.raises(ValueError, match="GroupNorm: 48 channels cannot be split into 32 groups"):
        an.create_norm("gn", 48)
    with pytest.raises(ValueError, match="48 channels cannot be split into 32 groups"):
        an.create_norm("an_gn", 48)
    with pytest.raises(ValueError, match=r"'impl' must be one of 'auto', 'reference', 'fused', 'compile', got 'fast'"):
        an.create_norm("an", 64, impl="fast")
    assert type(an.create_norm("an", 64, impl="fused")) is an.FusedAttentiveBatchNorm2d
    with pytest.raises(ValueError, match="num_features"):
        an.create_norm("bn", 0)


def test_layers_reject_non_4d_input():
    for name in ("an", "an_gn", "sn", "iebn"):
        with pytest.raises(ValueError, match="4-D"):
            an.create_norm(name, 32)(torch.randn(4, 32))


# ---------------------------------------------------------------------------------------------- AN
def test_an_init_and_parameter_count():
    torch.manual_seed(0)
    for name, c, k in [("an", 64, 10), ("an", 256, 20), ("an_gn", 64, 10), ("an", 8, 1)]:
        layer = an.create_norm(name, c, k=k)
        assert sum(p.numel() for p in layer.parameters()) == 2 * k * c + k * c + 2 * k
        assert layer.mixture_weight.shape == (k, c) and layer.mixture_bias.shape == (k, c)
        assert layer.attention.conv.weight.shape == (k, c, 1, 1) and layer.attention.conv.bias is None
        assert torch.all(layer.attention.bn.weight == 1) and torch.all(layer.attention.bn.bias == 0)
    big = an.create_norm("an", 512, k=20)
    assert abs(big.mixture_weight.mean().item() - 1.0) < 0.01 and abs(big.mixture_weight.std().item() - 0.1) < 0.01
    assert abs(big.mixture_bias.mean().item()) < 0.01 and abs(big.mixture_bias.std().item() - 0.1) < 0.01
    # Kaiming normal, fan_out, ReLU gain: std sqrt(2 / K).
    assert abs(big.attention.conv.weight.std().item() - (2 / 20) ** 0.5) < 0.02
    # Generic `.weight` tools must not half-apply to the K x C mixture: AN has no per-channel weight/bias (None, so
    # builders' init code that tests `norm.weight is not None`, e.g. torchvision's zero_init_residual, skips it).
    assert big.weight is None and big.bias is None and "weight" not in dict(big.named_parameters())


@pytest.mark.parametrize("name", ["an", "an_gn"])
@pytest.mark.parametrize("attention", ["hsigmoid", "sigmoid", "softmax"])
@pytest.mark.parametrize("shape", SHAPES)
def test_an_matches_naive_reference(name, attention, shape):
    torch.manual_seed(1)
    layer = _make(name, shape[1], k=5, attention=attention)
    sgd_steps(layer, shape)
    x = torch.randn(shape) * 2 + 0.3
    layer.train()
    torch.testing.assert_close(layer(x).double(), naive_an(layer, x, training=True), atol=2e-4, rtol=2e-4)
    layer.eval()
    torch.testing.assert_close(layer(x).double(), naive_an(layer, x, training=False), atol=2e-4, rtol=2e-4)


def test_an_eval_uses_running_stats_and_is_per_sample():
    torch.manual_seed(2)
    layer = an.create_norm("an", 16, k=4)
    sgd_steps(layer, (6, 16, 4, 4))
    layer.eval()
    x = torch.randn(6, 16, 4, 4)
    full = layer(x)
    torch.testing.assert_close(layer(x[2:3]), full[2:3])  # no batch statistics in eval
    layer.train()
    assert not torch.allclose(layer(x)[2:3], full[2:3], atol=1e-3)


def test_an_k1_softmax_reduces_to_bn():
    """With K = 1 and softmax attention, lambda == 1, so AN is BN with affine (Gamma[0], B[0])."""
    torch.manual_seed(3)
    layer = an.create_norm("an", 8, k=1, attention="softmax")
    bn = nn.BatchNorm2d(8)
    with torch.no_grad():
        bn.weight.copy_(layer.mixture_weight[0])
        bn.bias.copy_(layer.mixture_bias[0])
    for _ in range(3):
        x = torch.randn(4, 8, 5, 5) * 3 - 1
        torch.testing.assert_close(layer(x), bn(x))
    layer.eval()
    bn.eval()
    torch.testing.assert_close(layer(x), bn(x))


@pytest.mark.parametrize("momentum", [0.1, None])
def test_an_running_stats_match_batchnorm(momentum):
    torch.manual_seed(4)
    layer = an.create_norm("an", 8, k=4, momentum=momentum)
    ref_std = nn.BatchNorm2d(8, affine=False, momentum=momentum)
    ref_att = nn.BatchNorm2d(4, momentum=momentum)
    logits = []
    layer.attention.bn.register_forward_pre_hook(lambda m, inp: logits.append(inp[0].detach().clone()))
    for step in range(4):
        x = torch.randn(5, 8, 6, 6) * (1 + step) + step
        layer(x)
        ref_std(x)
        ref_att(logits[-1])
    for mine, ref in ((layer.norm, ref_std), (layer.attention.bn, ref_att)):
        torch.testing.assert_close(mine.running_mean, ref.running_mean)
        torch.testing.assert_close(mine.running_var, ref.running_var)
        assert mine.num_batches_tracked.item() == ref.num_batches_tracked.item() == 4
    layer.eval()
    layer(x)  # eval does not update
    assert layer.norm.num_batches_tracked.item() == 4


def test_an_spatial_1x1_has_no_nan_and_uses_zero_variance():
    torch.manual_seed(5)
    layer = an.create_norm("an", 16, k=4)
    x = torch.randn(6, 16, 1, 1, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    torch.testing.assert_close(y.double(), naive_an(layer, x.detach(), training=True), atol=1e-4, rtol=1e-4)


def test_an_train_batch_of_one_raises_like_batchnorm():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        an.create_norm("an", 8)(torch.randn(1, 8, 4, 4))
    layer = an.create_norm("an", 8).eval()
    assert torch.isfinite(layer(torch.randn(1, 8, 4, 4))).all()


def test_attention_hook_captures_lambda():
    torch.manual_seed(6)
    layer = an.create_norm("an", 32, k=10)
    captured = {}
    layer.attention.register_forward_hook(lambda m, inp, out: captured.update(lam=out.detach()))
    layer(torch.randn(8, 32, 5, 5))
    lam = captured["lam"]
    assert lam.shape == (8, 10) and lam.dtype == torch.float32
    assert lam.min() >= 0 and lam.max() <= 1
    assert 0.35 < lam.mean().item() < 0.65  # hsigmoid of a BN-normalized logit: mean ~0.5 at init


@pytest.mark.parametrize("name", ["an", "an_gn"])
def test_an_generic_composition_path_matches_fast_path(name):
    """Subclassed standardizers (as after SyncBN conversion) take the generic path; results must agree."""

    class PlainBN(nn.BatchNorm2d):
        pass

    class PlainGN(nn.GroupNorm):
        pass

    torch.manual_seed(7)
    fast = _make(name, 16, groups=4, k=3)
    slow = copy.deepcopy(fast)
    old = slow.norm
    if name == "an":
        slow.norm = PlainBN(16, old.eps, old.momentum, affine=False)
    else:
        slow.norm = PlainGN(4, 16, old.eps, affine=False)
    slow.norm.load_state_dict(old.state_dict())
    for training in (True, False):
        fast.train(training)
        slow.train(training)
        x1 = (torch.randn(4, 16, 5, 5) * 2).requires_grad_()
        x2 = x1.detach().clone().requires_grad_()
        g = torch.randn(4, 16, 5, 5)
        y1, y2 = fast(x1), slow(x2)
        torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-5)
        (y1 * g).sum().backward()
        (y2 * g).sum().backward()
        torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-5)
        for (n1, p1), (_, p2) in zip(fast.named_parameters(), slow.named_parameters()):
            torch.testing.assert_close(p1.grad, p2.grad, atol=1e-4, rtol=1e-4, msg=n1)
    if name == "an":
        torch.testing.assert_close(fast.norm.running_mean, slow.norm.running_mean)
        torch.testing.assert_close(fast.norm.running_var, slow.norm.running_var)


@pytest.mark.parametrize("name", ["an", "an_gn"])
@pytest.mark.parametrize("attention", ["hsigmoid", "softmax"])
@pytest.mark.parametrize("training", [True, False])
def test_an_gradcheck(name, attention, training):
    torch.manual_seed(8)
    layer = _make(name, 4, groups=2, k=3, attention=attention).double()
    if not training:
        sgd_steps(layer.float(), (4, 4, 3, 3))
        layer.double()
    layer.train(training)  # train mode updates running stats, but its output never reads them
    x = (torch.randn(4, 4, 3, 3, dtype=torch.float64) * 2).requires_grad_()
    gradcheck_layer(layer, x)


def test_hsigmoid_float64_backward_is_exactly_one_sixth():
    """d lam / d z = 1/6 on (-3, 3) and 0 outside, to float64 precision.

    torch's own hardsigmoid multiplies the float64 gradient by a float32 constant (relative error 3e-8), which a
    float64 comparison of gradients would see; the official formula relu6(z + 3) / 6 has no such constant.
    """
    torch.manual_seed(10)
    att = an.MixtureAttention(8, k=6).double().train()
    with torch.no_grad():
        att.bn.weight.fill_(3.0)  # spread the normalized logits past +-3
    logits = {}

    def keep_logits(module, args, out):
        out.retain_grad()
        logits["z"] = out

    att.bn.register_forward_hook(keep_logits)
    mean = torch.randn(16, 8, dtype=torch.float64) * 3
    var = torch.rand(16, 8, dtype=torch.float64) + 0.1
    lam = att(mean, var)
    lam.sum().backward()
    z = logits["z"].detach().flatten(1)
    inside = (z > -3) & (z < 3)
    assert inside.any() and (~inside).any()  # both regions are exercised
    expected = torch.where(inside, torch.full_like(z, 1.0) / 6.0, torch.zeros_like(z))
    torch.testing.assert_close(logits["z"].grad.flatten(1), expected, rtol=1e-15, atol=0.0)
    torch.testing.assert_close(lam, torch.clamp((z + 3.0) / 6.0, 0.0, 1.0), rtol=1e-15, atol=1e-16)


def test_functional_ops_grad_and_gradgrad():
    torch.manual_seed(9)
    x = torch.randn(2, 3, 3, 4, dtype=torch.float64, requires_grad=True)
    scale = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    shift = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    mean, var = channel_stats(x)
    torch.testing.assert_close(mean, x.mean((2, 3)))
    torch.testing.assert_close(var, x.var((2, 3), unbiased=False))
    torch.testing.assert_close(channel_affine(x, scale, shift), x * scale[..., None, None] + shift[..., None, None])
    assert torch.autograd.gradcheck(channel_stats, (x,))
    assert torch.autograd.gradgradcheck(channel_stats, (x,))
    assert torch.autograd.gradcheck(channel_affine, (x, scale, shift))
    assert torch.autograd.gradgradcheck(channel_affine, (x, scale, shift))


def test_single_kernel_branch_used_off_cpu(monkeypatch):
    """The var_mean/addcmul branch taken on CUDA, exercised on CPU: same values and gradients."""
    torch.manual_seed(13)
    layer = _make("an", 8, k=3, attention="sigmoid")
    x = torch.randn(4, 8, 5, 5) * 2 + 1
    g = torch.randn(4, 8, 5, 5)
    grads = []
    for split in (("cpu",), ()):
        monkeypatch.setattr(an.functional, "SPLIT_KERNEL_DEVICES", split)
        xi = x.clone().requires_grad_()
        y = layer(xi)
        (y * g).sum().backward()
        grads.append((y.detach(), xi.grad))
        xd = torch.randn(2, 3, 3, 4, dtype=torch.float64, requires_grad=True)
        s = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(channel_stats, (xd,))
        assert torch.autograd.gradcheck(channel_affine, (xd, s, s.detach().clone().requires_grad_()))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-5, rtol=1e-5)


def test_an_channels_last_input():
    torch.manual_seed(10)
    layer = an.create_norm("an", 16, k=4)
    x = torch.randn(4, 16, 6, 6)
    ref = layer(x)
    out = copy.deepcopy(layer)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref)


def test_an_gn_matches_groupnorm_when_mixture_is_identity():
    """Softmax attention with all K components equal to (1, 0) makes an_gn exactly an affine-free GroupNorm."""
    torch.manual_seed(11)
    layer = an.create_norm("an_gn", 32, k=4, attention="softmax", groups=8)
    with torch.no_grad():
        layer.mixture_weight.fill_(1.0)
        layer.mixture_bias.zero_()
    x = torch.randn(3, 32, 5, 5) * 4 + 2
    torch.testing.assert_close(layer(x), F.group_norm(x, 8), atol=1e-5, rtol=1e-5)


def test_an_traces_without_graph_breaks():
    """torch.compile(fullgraph=True) must capture AN whole (custom autograd Functions, buffer updates)."""
    torch.manual_seed(12)
    layer = an.create_norm("an", 16, k=4)
    ref = copy.deepcopy(layer)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(4, 16, 5, 5)
    torch.testing.assert_close(compiled(x), ref(x))
    torch.testing.assert_close(layer.norm.running_var, ref.norm.running_var)
