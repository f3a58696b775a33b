"""Tests of the fused and torch.compile AN implementations (an/fused.py) against the reference AN (an/attentive.py).

On the CPU the fused layers run their autograd Function with the torch versions of the four passes; the Triton
kernels themselves are run by tests/an_fused_interpret.py in a subprocess with TRITON_INTERPRET=1
(:func:`test_triton_kernels_under_interpreter`), because triton.jit reads that variable when an.fused is imported.
"""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.func import functional_call

import an
import an.fused as fused
from tests.test_an import naive_an

ROOT = Path(__file__).resolve().parent.parent
SHAPES = [(4, 8, 5, 5), (3, 16, 4, 6), (2, 8, 1, 1)]


pytestmark = pytest.mark.usefixtures("single_thread")


def make_pair(name: str, c: int, impl: str = "fused", seed: int = 0, **kwargs) -> tuple[nn.Module, nn.Module]:
    """(reference layer, ``impl`` layer) with the same state."""
    torch.manual_seed(seed)
    if name == "an_gn":
        kwargs.setdefault("groups", 4)
    ref = an.create_norm(name, c, impl="reference", **kwargs)
    other = an.create_norm(name, c, impl=impl, **kwargs)
    other.load_state_dict(ref.state_dict())
    return ref, other


def run(layer: nn.Module, x: torch.Tensor, g: torch.Tensor, autocast: torch.dtype | None = None, fn=None):
    """Output, input gradient and parameter gradients of ``sum(layer(x) * g)`` (``fn`` calls the layer)."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    with torch.autocast(x.device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        y = (layer if fn is None else fn)(x)
    (y.float() * g.float()).sum().backward()
    return y.detach(), x.grad, {n: p.grad for n, p in layer.named_parameters()}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_same_run(ref_run, other_run, tol: float = 1e-5, what: str = "", truth=None) -> None:
    """Outputs, input and parameter gradients (``run`` results) agree to ``tol`` (10 x for parameters).

    Where they do not and a float64 run ``truth`` is given, ``other`` must be as close to it as the reference is
    (at most 2x its error, plus 1e-6 rms): tiny batches (N * H * W = 2) make some gradients rounding noise.
    """
    assert other_run[0].dtype == ref_run[0].dtype and other_run[0].shape == ref_run[0].shape
    assert other_run[1].dtype == ref_run[1].dtype and ref_run[2].keys() == other_run[2].keys()
    items = [("output", lambda r: r[0], tol), ("input grad", lambda r: r[1], tol)]
    items += [(f"grad of {n}", lambda r, n=n: r[2][n], 10 * tol) for n in ref_run[2]]
    for label, get, t in items:
        a, b = get(ref_run), get(other_run)
        if rel(b, a) < t:
            continue
        assert truth is not None, f"{what} {label}: {rel(b, a):.2e} relative difference"
        c = get(truth).double()
        err, ref_err = (b.double() - c).norm().item(), (a.double() - c).norm().item()
        assert err <= 2 * ref_err + 1e-6 * c.numel() ** 0.5, (
            f"{what} {label}: error {err:.2e} vs reference {ref_err:.2e}"
        )


def compare(ref: nn.Module, other: nn.Module, x, g, tol: float = 1e-5, what: str = "", autocast=None):
    """Runs both layers (and a float64 copy of ``ref`` as the judge of disagreements) and checks them."""
    oracle = copy.deepcopy(ref).double()
    runs = run(ref, x, g, autocast), run(other, x, g, autocast)
    assert_same_run(*runs, tol, what, truth=run(oracle, x.double(), g.double()))
    return runs


def assert_same_buffers(ref: nn.Module, other: nn.Module, tol: float = 1e-5) -> None:
    """Equal counters; running statistics equal to ``tol`` relative to the buffer's norm (float32 summation order:
    at 1x1 the attention logits come from an ill-conditioned sum, so elementwise relative errors can be larger)."""
    for (name, b1), (_, b2) in zip(ref.named_buffers(), other.named_buffers()):
        if b1.is_floating_point():
            assert b2.dtype == b1.dtype and rel(b2, b1) < tol, f"{name}: {rel(b2, b1):.2e}"
        else:
            assert torch.equal(b2, b1), name


def assert_same_step(
    ref: nn.Module, other: nn.Module, x: torch.Tensor, *, grad_tol: float, out_tol: float, other_eval=None
) -> None:
    """After one training step of two models: the same parameter gradients (relative error below ``grad_tol``),
    the same buffers, and the same evaluation-mode outputs on ``x`` (``other_eval``: how ``other`` is evaluated,
    e.g. a compiled copy; default ``other`` itself). Leaves both models in evaluation mode."""
    for (name, p1), (_, p2) in zip(ref.named_parameters(), other.named_parameters()):
        assert rel(p2.grad, p1.grad) < grad_tol, name
    assert_same_buffers(ref, other)
    ref.eval(), other.eval()
    with torch.no_grad():
        assert rel((other if other_eval is None else other_eval)(x), ref(x)) < out_tol


def sgd_steps(ref: nn.Module, other: nn.Module, shape, steps: int = 3, cl: bool = False, tol: float = 1e-5) -> None:
    """Train both layers side by side on the same batches, comparing every step."""
    gen = torch.Generator().manual_seed(1)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (ref, other)]
    for step in range(steps):
        x = torch.randn(shape, generator=gen) * 1.5 + 0.5
        g = torch.randn(shape, generator=gen)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        _, r2 = compare(ref.train(), other.train(), x, g, tol, f"train step {step}")
        if cl and shape[2] * shape[3] > 1:
            assert r2[0].is_contiguous(memory_format=torch.channels_last) and not r2[0].is_contiguous()
        for opt in opts:
            opt.step()
    assert_same_buffers(ref, other)


# ---------------------------------------------------------------------------------------------- factory
def test_factory_impls_and_state_dict_names():
    assert an.factory.IMPLS == ("auto", "reference", "fused", "compile")
    assert an.factory.AUTO_IMPL == "reference"
    assert type(an.create_norm("an", 8)) is an.AttentiveBatchNorm2d  # auto
    for name, fused_cls, compile_cls in [
        ("an", an.FusedAttentiveBatchNorm2d, an.CompileAttentiveBatchNorm2d),
        ("an_gn", an.FusedAttentiveGroupNorm2d, an.CompileAttentiveGroupNorm2d),
    ]:
        ref, fl = make_pair(name, 16, k=4)
        cl = an.create_norm(name, 16, impl="compile", k=4, groups=4) if name == "an_gn" else None
        cl = cl or an.create_norm(name, 16, impl="compile", k=4)
        assert type(fl) is fused_cls and type(cl) is compile_cls and isinstance(fl, type(ref))
        for layer in (fl, cl):
            assert list(layer.state_dict()) == list(ref.state_dict())
            assert [(n, p.shape) for n, p in layer.named_parameters()] == [
                (n, p.shape) for n, p in ref.named_parameters()
            ]
        assert "impl='fused'" in repr(fl) and "impl='compile'" in repr(cl)
    ctor = an.get_norm_layer("an", k=5, impl="fused")
    assert type(ctor(8)) is an.FusedAttentiveBatchNorm2d


def test_kernel_selection_and_errors():
    layer = an.create_norm("an", 8, k=3, impl="fused")
    x = torch.randn(4, 8, 3, 3)
    assert fused._kernels_for(x, "torch") is fused._TorchKernels
    assert fused._kernels_for(x.double(), "auto") is fused._TorchKernels
    with pytest.raises(ValueError, match="kernels must be one of"):
        fused._kernels_for(x, "cuda")
    if fused.INTERPRET and fused.triton_available():
        assert fused._kernels_for(x, "auto") is fused._TritonKernels
    else:
        assert fused._kernels_for(x, "auto") is fused._TorchKernels
        layer.kernels = "triton"
        with pytest.raises(RuntimeError, match="kernels='triton' was requested but cannot run"):
            layer(x)
    with pytest.raises(RuntimeError, match="float64"):
        fused._kernels_for(x.double(), "triton")
    with pytest.raises(ValueError, match="4-D"):
        an.create_norm("an", 8, impl="fused")(torch.randn(4, 8))


# ---------------------------------------------------------------------------------------------- fused vs reference
@pytest.mark.parametrize("name", ["an", "an_gn"])
@pytest.mark.parametrize("attention", ["hsigmoid", "sigmoid", "softmax"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "channels_last"])
def test_fused_matches_reference_train_and_eval(name, attention, shape, cl):
    ref, fl = make_pair(name, shape[1], k=5, attention=attention)
    sgd_steps(ref, fl, shape, steps=3, cl=cl)
    assert fl.attention.bn.num_batches_tracked.item() == 3
    x = torch.randn(shape) * 2 - 0.3
    x = x.contiguous(memory_format=torch.channels_last) if cl else x
    g = torch.randn(shape)
    compare(ref.eval(), fl.eval(), x, g, what="eval")
    assert_same_buffers(ref, fl)  # eval does not update


@pytest.mark.parametrize("momentum", [None, 0.3])
def test_running_statistics_and_momentum(momentum):
    ref, fl = make_pair("an", 8, k=4, momentum=momentum)
    sgd_steps(ref, fl, (5, 8, 6, 6), steps=4)
    for layer in (fl.norm, fl.attention.bn):
        assert layer.num_batches_tracked.item() == 4 and layer.momentum == momentum


def test_no_grad_path_matches_and_updates_once():
    ref, fl = make_pair("an", 8, k=4)
    x = torch.randn(4, 8, 5, 5)
    with torch.no_grad():
        y2 = fl(x)
    y1 = ref(x)
    torch.testing.assert_close(y2, y1, atol=1e-5, rtol=1e-5)
    assert_same_buffers(ref, fl)
    with torch.inference_mode():
        torch.testing.assert_close(fl.eval()(x), ref.eval()(x), atol=1e-5, rtol=1e-5)


def test_only_parameter_or_only_input_gradients():
    ref, fl = make_pair("an", 8, k=3)
    x, g = torch.randn(4, 8, 3, 3) + 1, torch.randn(4, 8, 3, 3)
    (fl(x) * g).sum().backward()  # x does not require grad: the parameters' gradients still flow
    (ref(x) * g).sum().backward()
    for (n, p1), (_, p2) in zip(ref.named_parameters(), fl.named_parameters()):
        assert rel(p2.grad, p1.grad) < 1e-4, n
    for layer in (ref, fl):
        layer.requires_grad_(False)
    assert rel(run(fl, x, g)[1], run(ref, x, g)[1]) < 1e-5


@pytest.mark.parametrize("through", ["lambda", "both"])
def test_hooks_and_gradients_through_the_attention_weights(through):
    """Attention hooks see lambda; a loss on lambda alone (or on both lambda and y) differentiates like the
    reference; tensor hooks on parameters fire once per backward, as in the reference."""
    grads = []
    for layer in make_pair("an", 16, k=4):
        seen, fired = [], []
        layer.attention.register_forward_hook(lambda m, i, out, seen=seen: seen.append(out))
        for p in layer.parameters():
            p.register_hook(lambda g, fired=fired: fired.append(1))
        x = (torch.randn(4, 16, 3, 3, generator=torch.Generator().manual_seed(0)) + 1).requires_grad_()
        y = layer(x)
        assert len(seen) == 1 and seen[0].shape == (4, 4) and seen[0].dtype == torch.float32
        loss = seen[0].square().sum() + (y.sum() if through == "both" else 0)
        loss.backward()
        assert len(fired) == sum(p.grad is not None for p in layer.parameters()) >= 3
        grads.append([x.grad, *(p.grad for p in layer.parameters())])
    for g1, g2 in zip(*grads):
        assert (g1 is None and g2 is None) or rel(g2, g1) < 1e-4


@pytest.mark.parametrize("name", ["an", "an_gn"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "channels_last"])
def test_low_precision_under_autocast(name, dtype, cl):
    ref, fl = make_pair(name, 16, k=4)
    x = (torch.randn(4, 16, 5, 5) * 2 + 1).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last) if cl else x
    g = torch.randn(4, 16, 5, 5).to(dtype)
    r1, r2 = run(ref, x, g, autocast=dtype), run(fl, x, g, autocast=dtype)
    assert r2[0].dtype == dtype and r2[1].dtype == dtype
    assert all(p.dtype == torch.float32 for p in r2[2].values())
    assert rel(r2[0], r1[0]) < 1e-2 and rel(r2[1], r1[1]) < 1e-2  # the same float32 math, rounded at the end
    for n in r1[2]:
        assert rel(r2[2][n], r1[2][n]) < 1e-3, n
    assert_same_buffers(ref, fl)


def test_large_mean_small_std_statistics():
    """mean 100, std 0.1: naive E[x^2] - E[x]^2 in float32 loses every digit of the variance."""
    torch.manual_seed(3)
    x = torch.randn(4, 8, 6, 6) * 0.1 + 100
    naive = (x.square().mean((2, 3)) - x.mean((2, 3)).square()).double()
    exact = x.double().var((2, 3), unbiased=False)
    assert rel(naive, exact) > 1e-2  # the trap is real
    mean, var = fused._TorchKernels.stats(x, False)
    assert rel(mean, x.double().mean((2, 3))) < 1e-7 and rel(var, exact) < 1e-5
    ref, fl = make_pair("an", 8, k=4)
    for layer in (ref, fl):
        out = naive_an(layer, x, training=True)  # float64, with the pre-step state
        y = layer(x)
        assert rel(y, out) < 1e-4
    assert_same_buffers(ref, fl)
    torch.testing.assert_close(fl.norm.running_var.double(), 0.9 + 0.1 * x.double().var((0, 2, 3)), rtol=1e-4, atol=0)


@pytest.mark.parametrize("name", ["an", "an_gn"])
@pytest.mark.parametrize("attention", ["hsigmoid", "softmax"])
@pytest.mark.parametrize("training", [True, False])
def test_fused_function_gradcheck_float64(name, attention, training):
    _, layer = make_pair(name, 4, seed=8, k=3, attention=attention, **({"groups": 2} if name == "an_gn" else {}))
    if not training:
        sgd_steps(*make_pair(name, 4, seed=8, k=3, attention=attention), (4, 4, 3, 3))  # moves running stats
        layer.eval()
    layer = layer.double().train(training)
    layer.kernels = "torch"
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]
    x = (torch.randn(4, 4, 3, 3, dtype=torch.float64) * 2).requires_grad_()

    def f(inp, *ps):
        return functional_call(layer, dict(zip(names, ps)), (inp,))

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-5, rtol=1e-4)
    assert torch.autograd.gradcheck(f, (x.contiguous(memory_format=torch.channels_last), *params), atol=1e-5)


# ---------------------------------------------------------------------------------------------- integration
def test_state_dict_interchangeable_between_impls():
    ref, fl = make_pair("an", 8, k=4)
    sgd_steps(copy.deepcopy(ref), fl, (4, 8, 5, 5))  # trains fl
    back = an.create_norm("an", 8, k=4, impl="reference")
    back.load_state_dict(fl.state_dict())
    x = torch.randn(4, 8, 5, 5)
    torch.testing.assert_close(back.eval()(x), fl.eval()(x), atol=1e-5, rtol=1e-5)
    fresh = an.create_norm("an", 8, k=4, impl="compile")
    fresh.load_state_dict(back.state_dict())
    torch.testing.assert_close(fresh.eval()(x), back(x), atol=1e-5, rtol=1e-5)


def test_sync_conversion_uses_the_reference_path(monkeypatch):
    ref, fl = make_pair("an", 16, k=4)
    synced = an.convert_sync_norm(copy.deepcopy(fl))
    assert type(synced) is an.FusedAttentiveBatchNorm2d and type(synced.norm) is nn.SyncBatchNorm
    assert type(synced.attention.bn) is nn.SyncBatchNorm

    def boom(*args):
        raise AssertionError("fused path taken after SyncBN conversion")

    monkeypatch.setattr(fused, "_fused_forward", boom)
    x, g = torch.randn(4, 16, 3, 3), torch.randn(4, 16, 3, 3)
    assert_same_run(run(ref, x, g), run(synced, x, g))  # SyncBatchNorm = BatchNorm without torch.distributed


@pytest.mark.parametrize("name", ["an", "an_gn"])
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "channels_last"])
def test_compile_impl_matches_reference_eagerly(name, cl):
    ref, cp = make_pair(name, 8, impl="compile", k=3, attention="sigmoid")
    sgd_steps(ref, cp, (4, 8, 5, 5), cl=cl)
    x, g = torch.randn(4, 8, 5, 5), torch.randn(4, 8, 5, 5)
    compare(ref.eval(), cp.eval(), x, g, what="eval")
    x = x.bfloat16()
    r1, r2 = run(ref.train(), x, g, autocast=torch.bfloat16), run(cp.train(), x, g, autocast=torch.bfloat16)
    assert r2[0].dtype == torch.bfloat16 and rel(r2[0], r1[0]) < 1e-2


def test_compile_impl_traces_whole():
    """impl='compile' is plain torch ops: torch.compile captures it in one graph (aot_eager: no C++ build)."""
    ref, cp = make_pair("an", 8, impl="compile", k=3)
    compiled = torch.compile(cp, backend="aot_eager", fullgraph=True)
    x, g = torch.randn(4, 8, 5, 5), torch.randn(4, 8, 5, 5)
    assert_same_run(run(ref, x, g), run(cp, x, g, fn=compiled))
    assert_same_buffers(ref, cp)


def test_resnet50_fused_trains_like_reference():
    import models

    torch.manual_seed(0)
    ref = models.create_model("resnet50", norm="an", num_classes=10, norm_kwargs={"impl": "reference"}, base_width=8)
    fl = models.create_model("resnet50", norm="an", num_classes=10, norm_kwargs={"impl": "fused"}, base_width=8)
    fl.load_state_dict(ref.state_dict())
    n_fused = sum(type(m) is an.FusedAttentiveBatchNorm2d for m in fl.modules())
    assert n_fused == 16 and not any(isinstance(m, an.FusedAttentiveBatchNorm2d) for m in ref.modules())
    x = torch.randn(4, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 10, (4,))
    losses = []
    for model in (ref, fl):
        model.to(memory_format=torch.channels_last).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        loss = nn.functional.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) < 1e-4
    assert_same_step(ref, fl, x, grad_tol=1e-3, out_tol=1e-4)


@pytest.mark.skipif(not fused.triton_available(), reason="triton is not installed")
def test_triton_kernels_under_interpreter():
    """Runs tests/an_fused_interpret.py in a fresh process with TRITON_INTERPRET=1 (set before triton loads)."""
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests/an_fused_interpret.py")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("shape", [(32, 64, 28, 28), (16, 512, 7, 7), (6, 24, 13, 11), (4, 32, 1, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "channels_last"])
def test_cuda_triton_kernels_match_reference(shape, dtype, cl, monkeypatch):
    """On the GPU: the compiled Triton kernels (H*W split across programs for the larger shapes) against the
    reference, train and eval, with every buffer the kernels allocate poisoned with NaN first."""
    empty, empty_like = torch.empty, torch.empty_like
    monkeypatch.setattr(torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan")))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: empty_like(*a, **k).fill_(float("nan")))
    ref, fl = (m.cuda() for m in make_pair("an", shape[1], k=10))
    fl.kernels = "triton"
    autocast = None if dtype == torch.float32 else dtype
    gen = torch.Generator().manual_seed(0)
    for training in (True, True, False):
        x = (torch.randn(shape, generator=gen) * 2 + 1).to("cuda", dtype)
        x = x.contiguous(memory_format=torch.channels_last) if cl else x
        g = torch.randn(shape, generator=gen).to("cuda", dtype)
        tol = 1e-5 if autocast is None else 1e-3  # bf16: where the rounded outputs differ, float64 judges
        _, r2 = compare(ref.train(training), fl.train(training), x, g, tol, f"train={training}", autocast)
        assert r2[0].dtype == dtype and r2[1].dtype == dtype and r2[0].stride() == x.stride()
        assert torch.isfinite(r2[0]).all() and torch.isfinite(r2[1]).all()
    assert_same_buffers(ref, fl)
    x = (torch.randn(shape, generator=gen) * 0.1 + 100).cuda()
    mean, var = fused._TritonKernels.stats(x, False)
    assert rel(mean, x.double().mean((2, 3))) < 1e-7 and rel(var, x.double().var((2, 3), unbiased=False)) < 1e-4


@pytest.mark.skipif(not fused.triton_available() or fused.INTERPRET, reason="needs triton's compiler front end")
@pytest.mark.parametrize("name,cl", [("an", False), ("an", True), ("an_gn", False)])
def test_triton_kernels_compile_once_for_every_batch_size(name, cl, monkeypatch):
    """Triton's own cache key (its argument specialization for an sm_90 target, computed by Triton's binder) of
    every launch is the same at batch sizes 2, 7, 16 and 33 (with 16 a batch-dependent argument that Triton
    specializes would divide by 16, with 33 the workspace offsets would lose their alignment): one compilation per
    kernel and mode, whatever the batch. The kernels are not run (no GPU here): only their keys are taken."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime import jit

    backend = make_backend(GPUTarget("cuda", 90, 32))
    keys: dict[int, set] = {}
    batch = [0]

    def fake_run(self, *args, grid, warmup, **kwargs):
        _, spec, options = jit.create_function_from_signature(self.signature, self.params, backend)(*args, **kwargs)
        keys.setdefault(batch[0], set()).add((self.fn.__name__, str(spec), str(options)))

    monkeypatch.setattr(jit.JITFunction, "run", fake_run)
    monkeypatch.setattr(fused, "_kernels_for", lambda x, kernels: fused._TritonKernels)
    for n in (2, 7, 16, 33):
        batch[0] = n
        _, layer = make_pair(name, 32, k=5)
        x = torch.randn(n, 32, 6, 5).contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
        layer(x.requires_grad_()).sum().backward()
        layer.eval()(x)
    assert len({frozenset(v) for v in keys.values()}) == 1, "a batch size changed a kernel's specialization"
    names = sorted(k[0] for k in keys[2])
    assert names == sorted(
        ["_sums_kernel"] * 2
        + ["_fwd_channels_kernel"] * (2 if name == "an" else 1)  # BN: train and eval; GN: group statistics
        + ["_fwd_attention_kernel"] * 2
        + ["_fwd_output_kernel", "_bwd_channels_kernel", "_bwd_attention_kernel", "_bwd_coefficients_kernel"]
        + ["_affine_kernel"]
    )


def test_kernel_counter_counts_batchnorm_as_three_kernels():
    """The counter behind ``tools/bench_norm.py --count-kernels`` on nn.BatchNorm2d: forward, the batch counter
    increment and backward (what PyTorch launches for it on the GPU too); allocations and views are not kernels."""
    from tools.bench_norm import KernelCounter, count_kernels

    bn = nn.BatchNorm2d(8)
    counter = count_kernels(bn, torch.randn(4, 8, 3, 3))
    assert dict(counter.aten) == {"native_batch_norm": 1, "add_": 1, "native_batch_norm_backward": 1}
    assert counter.total == 3 and not counter.triton
    with KernelCounter() as counter:
        torch.empty(3).view(3, 1).t()
    assert counter.total == 0 and sum(counter.no_kernel.values()) == 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_whole_layer_launches_and_compilations():
    """On the GPU: 9 launches per training step and no aten kernel; a second batch size compiles nothing new."""
    from tools.bench_norm import KernelCounter

    _, layer = make_pair("an", 64, k=10)
    layer = layer.cuda()
    layer.kernels = "triton"

    def step(n):
        x = torch.randn(n, 64, 14, 14, device="cuda").requires_grad_()
        g = torch.randn_like(x)
        layer.zero_grad(set_to_none=True)
        with KernelCounter() as counter:
            layer(x).backward(g)
        torch.cuda.synchronize()
        return counter

    counter = step(32)
    assert sum(counter.triton.values()) == 9 and not counter.aten, (counter.aten, counter.triton)

    def cached():
        kernels = [v for v in vars(fused).values() if hasattr(v, "device_caches")]
        return sum(len(cache[0]) for k in kernels for cache in k.device_caches.values())

    before = cached()
    step(13)
    assert cached() == before


@pytest.mark.slow
@pytest.mark.skipif(not fused.triton_available() or fused.INTERPRET, reason="needs triton's compiler")
def test_triton_kernels_compile_for_hopper(monkeypatch):
    """Every kernel variant the fused layers launch (BN and GN, float32 and bf16, NCHW and channels_last, train and
    eval) compiles to a cubin for sm_90 (H100/H200) with the installed Triton and its bundled ptxas; no GPU needed."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime import jit

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    seen = {}

    def compile_instead(self, *args, grid, warmup, **kwargs):
        bound, spec, options = jit.create_function_from_signature(self.signature, self.params, backend)(*args, **kwargs)
        key = (self.fn.__name__, str(spec), str(options))
        if key not in seen:
            options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound, spec, options)
            src = ASTSource(self, signature, constexprs, attrs)
            seen[key] = triton.compile(src, target=target, options=options.__dict__).asm.get("cubin")

    monkeypatch.setattr(jit.JITFunction, "run", compile_instead)
    monkeypatch.setattr(fused, "_kernels_for", lambda x, kernels: fused._TritonKernels)
    for name in ("an", "an_gn"):
        for dtype in (torch.float32, torch.bfloat16):
            for cl in (False, True):
                _, layer = make_pair(name, 64, k=10)
                x = torch.randn(8, 64, 14, 14).to(dtype)
                x = x.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype != torch.float32):
                    layer(x.requires_grad_()).float().sum().backward()
                    layer.eval()(x)
    assert len(seen) >= 30 and all(seen.values())
