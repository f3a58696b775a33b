"""The Triton kernels of an/fused.py run by Triton's interpreter on the CPU (ours).

Not collected by default (no ``test_`` prefix): ``tests/test_an_fused.py::test_triton_kernels_under_interpreter``
runs this module in a fresh process with ``TRITON_INTERPRET=1``, which must be set before an.fused (and so
triton.jit) is imported. By hand: ``TRITON_INTERPRET=1 python -m pytest -q tests/an_fused_interpret.py``.
Sizes are tiny: the interpreter executes every program of the grid in Python.
"""

import os

import pytest
import torch

import an
import an.fused as fused
from tests.test_an_fused import assert_same_buffers, compare, make_pair, rel, run, sgd_steps
from tools.bench_norm import KernelCounter

pytestmark = pytest.mark.skipif(
    not (fused.INTERPRET and fused.triton_available()),
    reason="needs triton and TRITON_INTERPRET=1 set before import (run via tests/test_an_fused.py)",
)
KERNEL_SHAPES = [(4, 8, 5, 5), (3, 16, 4, 6), (2, 8, 1, 1), (2, 3, 7, 9)]
TOL = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}  # output rounding only


@pytest.fixture(autouse=True)
def _single_thread():
    torch.set_num_threads(1)


@pytest.fixture
def poisoned(monkeypatch):
    """Every tensor an.fused allocates with torch.empty / empty_like starts as NaN: unwritten elements show."""
    empty, empty_like = torch.empty, torch.empty_like
    monkeypatch.setattr(torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan")))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: empty_like(*a, **k).fill_(float("nan")))


def _as(x, cl):
    return x.contiguous(memory_format=torch.channels_last) if cl else x


@pytest.mark.parametrize("shape", KERNEL_SHAPES)
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
# Layouts and H*W splitting: each alone and together (the interpreter runs every program in Python).
@pytest.mark.parametrize(
    ("cl", "programs"), [(False, 1), (False, 64), (True, 64)], ids=["nchw-one_split", "nchw-split_hw", "cl-split_hw"]
)
def test_kernels_match_float64(shape, dtype, cl, programs, poisoned, monkeypatch):
    monkeypatch.setattr(fused, "CPU_PROGRAMS", programs)
    gen = torch.Generator().manual_seed(0)
    x = _as((torch.randn(shape, generator=gen) * 2 + 3).to(dtype), cl)
    g = _as(torch.randn(shape, generator=gen).to(dtype), cl)
    xd, gd = x.double(), g.double()
    xs, is_cl = fused._dense(x)
    assert xs is x
    tk = fused._TritonKernels
    mean, var = tk.stats(x, is_cl)
    assert mean.dtype == var.dtype == torch.float32
    assert rel(mean, xd.mean((2, 3))) < 1e-6 and rel(var, xd.var((2, 3), unbiased=False)) < 1e-5
    m = mean.double()[:, :, None, None]
    sum_g, sum_gu = tk.grad_sums(g, x, is_cl, mean)
    assert rel(sum_g, gd.sum((2, 3))) < 1e-5 and rel(sum_gu, (gd * (xd - m)).sum((2, 3))) < 1e-5
    s1, s0, a = (torch.randn(shape[:2], generator=gen) for _ in range(3))
    for out, expect in [
        (tk.affine(x, is_cl, mean, s1, s0), (xd - m) * s1[..., None, None] + s0[..., None, None]),
        (
            tk.affine(x, is_cl, mean, s1, s0, g=g, a=a),
            (xd - m) * s1[..., None, None] + s0[..., None, None] + gd * a[..., None, None],
        ),
    ]:
        assert out.dtype == dtype and out.stride() == x.stride()
        assert torch.isfinite(out).all() and rel(out, expect) < TOL[dtype]


@pytest.mark.parametrize("programs", [1, 64], ids=["one_split", "split_hw"])
def test_stats_kernel_large_mean_small_std(programs, monkeypatch):
    monkeypatch.setattr(fused, "CPU_PROGRAMS", programs)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1)) * 0.1 + 100
    for cl in (False, True):
        mean, var = fused._TritonKernels.stats(_as(x, cl), cl)
        assert rel(mean, x.double().mean((2, 3))) < 1e-7
        assert rel(var, x.double().var((2, 3), unbiased=False)) < 1e-5


def test_auto_selects_triton_here():
    assert fused._kernels_for(torch.randn(2, 3, 4, 4), "auto") is fused._TritonKernels
    assert fused._kernels_for(torch.randn(2, 3, 4, 4).double(), "auto") is fused._TorchKernels


def launches(layer, x, g=None):
    """(aten kernels, Triton launches) of one ``layer(x)`` (and backward with ``g``), counted by the tool's counter
    (gradients start as None, as after ``zero_grad(set_to_none=True)``: no accumulation kernels)."""
    layer.zero_grad(set_to_none=True)
    with KernelCounter() as counter:
        y = layer(x)
        if g is not None:
            y.backward(g)
    return sum(counter.aten.values()), sum(counter.triton.values())


@pytest.mark.parametrize("name", ["an", "an_gn"])
@pytest.mark.parametrize("attention", ["hsigmoid", "sigmoid", "softmax"])
@pytest.mark.parametrize(
    ("shape", "cl"),
    [((4, 8, 5, 5), False), ((4, 8, 5, 5), True), ((3, 16, 4, 6), True), ((2, 8, 1, 1), False)],
    ids=["4x8x5x5-nchw", "4x8x5x5-cl", "3x16x4x6-cl", "2x8x1x1-nchw"],
)
def test_whole_layer_in_triton_matches_reference(name, attention, shape, cl):
    """The whole path (small math and its derivative in Triton) against the reference, train and eval, with the
    running statistics; 9 launches per training step and 4 per evaluation forward, and no aten kernel at all."""
    ref, fl = make_pair(name, shape[1], k=5, attention=attention)
    fl.kernels = "triton"
    sgd_steps(ref, fl, shape, steps=2, cl=cl, tol=2e-5)
    assert fl.attention.bn.num_batches_tracked.item() == 2
    x, g = _as(torch.randn(shape) * 2 - 0.3, cl), _as(torch.randn(shape), cl)  # g in x's layout: no copy
    compare(ref.eval(), fl.eval(), x, g, tol=2e-5, what="eval")
    assert_same_buffers(ref, fl)
    assert launches(fl.train(), x.requires_grad_(), g) == (0, 9)
    assert launches(fl.eval(), x) == (0, 4)


@pytest.mark.parametrize("momentum", [None, 0.3])
def test_whole_layer_running_statistics_and_mixed_modes(momentum):
    """Cumulative and exponential running averages; a standardizer in training with the attention BN in eval
    mode, and the other way round (each BN follows its own ``training`` flag, as in the reference)."""
    ref, fl = make_pair("an", 8, k=4, momentum=momentum)
    fl.kernels = "triton"
    sgd_steps(ref, fl, (5, 8, 6, 6), steps=3)
    for std_train in (True, False):
        for layer in (ref, fl):
            layer.train()
            layer.norm.train(std_train)
            layer.attention.bn.train(not std_train)
        x, g = torch.randn(5, 8, 6, 6) + 0.5, torch.randn(5, 8, 6, 6)
        compare(ref, fl, x, g, tol=2e-5, what=f"standardizer training={std_train}")
        assert_same_buffers(ref, fl)


@pytest.mark.parametrize("case", ["hooks", "group_size_3", "float64_buffers"])
def test_composed_path_where_the_whole_path_does_not_apply(case):
    """Hooks on the attention branch (they must see lam), a GroupNorm group size that is not a power of two, or
    buffers in another dtype: the composed path runs (Triton passes over x, torch small math) and matches."""
    name, c, kw = ("an_gn", 12, {"groups": 4}) if case == "group_size_3" else ("an", 8, {})
    ref, fl = make_pair(name, c, k=3, **kw)
    fl.kernels = "triton"
    seen = []
    if case == "hooks":
        fl.attention.register_forward_hook(lambda m, i, out: seen.append(out.shape))
    if case == "float64_buffers":
        fl.norm.running_var = fl.norm.running_var.double()
        ref.norm.running_var = ref.norm.running_var.double()
    x, g = torch.randn(4, c, 3, 3) + 1, torch.randn(4, c, 3, 3)
    compare(ref, fl, x, g, tol=2e-5, what=case)
    aten, trit = launches(fl, x.requires_grad_(), g)
    assert trit == 4 and aten > 10  # two passes each way in Triton, the small math in torch
    assert seen == ([(4, 3)] * 2 if case == "hooks" else [])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_layer_low_precision_with_triton_kernels(dtype):
    ref, fl = make_pair("an", 16, k=4)
    fl.kernels = "triton"
    x = _as((torch.randn(4, 16, 5, 5) * 2 + 1).to(dtype), True)
    g = torch.randn(4, 16, 5, 5).to(dtype)
    r1, r2 = run(ref, x, g, autocast=dtype), run(fl, x, g, autocast=dtype)
    assert r2[0].dtype == dtype and r2[1].dtype == dtype and r2[0].is_contiguous(memory_format=torch.channels_last)
    assert rel(r2[0], r1[0]) < 1e-2 and rel(r2[1], r1[1]) < 1e-2
    for n in r1[2]:
        assert rel(r2[2][n], r1[2][n]) < 1e-3, n


def test_layer_large_mean_with_triton_kernels():
    from tests.test_an import naive_an

    ref, fl = make_pair("an", 8, k=4)
    fl.kernels = "triton"
    x = torch.randn(4, 8, 6, 6) * 0.1 + 100
    expect = naive_an(fl, x, training=True)
    assert rel(fl(x), expect) < 1e-4  # both limited by the float32 rounding of the means (|mean| / std = 1e3)
    assert rel(ref(x), expect) < 1e-4
    assert_same_buffers(ref, fl)


def test_env_is_set():
    assert os.environ.get("TRITON_INTERPRET") == "1" and an.create_norm("an", 4, impl="fused").kernels == "auto"
