"""Shared test helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from torch.func import functional_call

from engine.config import Config
from tests.image_folders import make_image_folder

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under pytest-xdist (the README's test command runs one worker per core) every worker, and every process a test
    # starts, computes on one thread: two workers with two threads each would only fight over two cores.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def jpeg_dataset(tmp_path_factory) -> Path:
    """3 classes of 64x48 JPEGs (every other one 48x64): 5 + 4 + 4 training and 3 + 2 + 2 validation images."""
    return make_image_folder(
        tmp_path_factory.mktemp("ds"), train_per_class=[5, 4, 4], val_per_class=[3, 2, 2], size=(64, 48)
    )


def collect(iterable) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The batches of a loader, cloned (a loader may reuse its buffers)."""
    return [(x.clone(), y.clone()) for x, y in iterable]


@pytest.fixture
def single_thread():
    """One intra-op thread for tiny tensors: as fast, and immune to OpenMP stalls on a busy shared CPU.

    Test modules opt in with ``pytestmark = pytest.mark.usefixtures("single_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def data_config(root=None, backend: str = "torch", *, seed: int = 3, num_classes: int = 3, **data: object) -> Config:
    """A Config for loader tests: 16-pixel images, batches of 2, no workers; ``data`` overrides cfg.data fields."""
    cfg = Config()
    cfg.data.root = "" if root is None else str(root)
    cfg.data.backend = backend
    for key, value in {"batch_size": 2, "img_size": 16, "workers": 0, **data}.items():
        setattr(cfg.data, key, value)
    cfg.train.seed = seed
    cfg.model.num_classes = num_classes
    return cfg


def tiny_config(tmp_path: Path, name: str = "tiny.yaml", **sections) -> Path:
    """A ResNet-50-shaped AN model at 1/8 width on 64x64 synthetic images: a few seconds per epoch."""
    cfg = {
        "model": {"name": "resnet50", "norm": "an", "num_classes": 10, "base_width": 8},
        "data": {
            "backend": "synthetic",
            "batch_size": 8,
            "img_size": 64,
            "synthetic_train_size": 48,
            "synthetic_val_size": 21,  # odd, and not a multiple of the batch: exact counting is checked
            "workers": 0,
        },
        "optim": {"lr": 0.05},
        "sched": {"epochs": 2, "warmup_epochs": 0.5},
        "train": {
            "output_dir": str(tmp_path / "run"),
            "amp": "none",
            "channels_last": False,
            "deterministic": True,
            "save_minutes": 0,
        },
        "dist": {"signal_check_every": 1},
        "log": {"interval": 2},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    """A 3x3 convolution (padding 1, no bias), BatchNorm2d and ReLU: the stem of the tests' small models."""
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


def gradcheck_layer(layer: nn.Module, x: torch.Tensor) -> None:
    """float64 gradcheck of a layer with respect to its input and every parameter."""
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_() for _, p in layer.named_parameters()]

    def f(inp, *ps):
        return functional_call(layer, dict(zip(names, ps)), (inp,))

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-5, rtol=1e-4)


def sgd_steps(layer: nn.Module, shape, steps: int = 4, seed: int = 0) -> None:
    """A few SGD steps on random data so parameters move away from init and running stats accumulate."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(layer.parameters(), lr=0.05)
    layer.train()
    for _ in range(steps):
        x = torch.randn(shape, generator=gen) * 1.5 + 0.5
        target = torch.randn(shape, generator=gen)
        opt.zero_grad()
        ((layer(x) - target) ** 2).mean().backward()
        opt.step()
