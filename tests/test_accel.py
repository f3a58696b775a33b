"""engine/accel.py: train.compile and train.cuda_graph (validated on the CPU; the graphs themselves need CUDA)."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

import models
from engine import accel
from engine.config import Config, ConfigError, apply_overrides
from tests.test_an_fused import assert_same_step

pytestmark = pytest.mark.usefixtures("single_thread")


def cfg_with(*overrides: str) -> Config:
    return apply_overrides(Config(), list(overrides))


def test_cuda_graph_is_refused_off_cuda_with_a_clear_message():
    cfg = cfg_with("train.cuda_graph=true")
    with pytest.raises(ConfigError) as info:
        accel.compile_models(nn.Linear(2, 2), nn.Linear(2, 2), cfg, "cpu")
    message = str(info.value)
    assert "train.cuda_graph=true" in message and "CUDA device" in message and "on cpu" in message
    assert "train.cuda_graph=false" in message
    accel.check_accel(cfg, "cuda")  # accepted on a GPU
    accel.check_accel(cfg_with("train.compile=true"), "cpu")


def test_modes_and_eager_passthrough():
    assert accel.compile_mode(Config()) is None
    assert accel.compile_mode(cfg_with("train.compile=true")) == "default"
    assert accel.compile_mode(cfg_with("train.cuda_graph=true")) == "reduce-overhead"
    assert accel.compile_mode(cfg_with("train.cuda_graph=true", "train.compile=true")) == "reduce-overhead"
    model, ddp = nn.Linear(2, 2), nn.Linear(2, 2)
    assert accel.compile_models(model, ddp, Config(), "cpu") == (ddp, model)


def test_cuda_graph_wiring(monkeypatch):
    """On a CUDA device: both models compiled with mode='reduce-overhead' and a step boundary before every call."""
    calls, marks = [], []
    monkeypatch.setattr(torch, "compile", lambda module, **kw: calls.append(kw) or nn.Identity())
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    fwd, ev = accel.compile_models(nn.Linear(2, 2), nn.Linear(2, 2), cfg_with("train.cuda_graph=true"), "cuda")
    assert calls == [{"mode": "reduce-overhead"}] * 2
    fwd(torch.ones(1))
    ev(torch.ones(1))
    assert len(marks) == 2


@pytest.mark.parametrize("impl", ["reference", "fused", "compile"])
def test_compiled_models_train_like_eager(impl):
    """train.compile through compile_models (dynamo with the eager backend: no C++ build) for each AN
    implementation: the same loss, gradients and running statistics as the uncompiled model."""
    torch.manual_seed(0)
    kw = {"base_width": 8}
    eager = models.create_model("resnet18", norm="an", num_classes=10, norm_kwargs={"impl": impl}, **kw)
    other = models.create_model("resnet18", norm="an", num_classes=10, norm_kwargs={"impl": impl}, **kw)
    other.load_state_dict(eager.state_dict())
    torch._dynamo.reset()
    fwd, ev = accel.compile_models(other, other, cfg_with("train.compile=true"), "cpu", backend="eager")
    assert fwd is not other and ev is not other
    x, target = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    losses = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for run in (eager, fwd):
            loss = nn.functional.cross_entropy(run(x), target)
            loss.backward()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) < 1e-5
        assert_same_step(eager, other, x, grad_tol=1e-4, out_tol=1e-5, other_eval=ev)
    ours = [str(w.message) for w in caught if re.search(r"(^|[/\\'])(an|models)[/\\]|fused\.py", str(w.message))]
    assert not ours, ours  # dynamo has nothing to say about our layers (e.g. a cached helper it cannot honour)
