"""Loaders delivering to a CUDA device, and the GPU DALI pipeline (skipped without CUDA; run on the GPU machines)."""

from __future__ import annotations

import pytest
import torch

import data
from engine.config import Config
from tests.conftest import collect, data_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def make_cfg(root, backend, **data_kw) -> Config:
    sizes = {"batch_size": 4, "eval_batch_size": 3, "img_size": 32, "workers": 2}
    return data_config(root, backend, synthetic_train_size=40, synthetic_val_size=7, **{**sizes, **data_kw})


@pytest.mark.parametrize("backend", ["torch", "synthetic", "dali_cpu", "dali"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_batches_on_cuda(jpeg_dataset, backend, fmt):
    if backend.startswith("dali"):
        pytest.importorskip("nvidia.dali")
    with data.build_loaders(make_cfg(jpeg_dataset, backend), device="cuda", memory_format=fmt) as ld:
        for x, y in list(ld.train.epoch(0)) + list(ld.val):
            assert x.is_cuda and y.is_cuda and x.dtype == torch.float32 and y.dtype == torch.int64
            assert x.shape[1:] == (3, 32, 32) and x.is_contiguous(memory_format=fmt)
        assert sum(len(y) for _, y in ld.val) == ld.val.total_samples


def test_cuda_batches_equal_cpu_batches(jpeg_dataset):
    """The side-stream copy + on-device normalization gives the CPU loader's values."""
    with (
        data.build_loaders(make_cfg(jpeg_dataset, "torch"), device="cuda") as gpu,
        data.build_loaders(make_cfg(jpeg_dataset, "torch"), device="cpu") as cpu,
    ):
        for (xg, yg), (xc, yc) in zip(collect(gpu.train.epoch(1)), collect(cpu.train.epoch(1))):
            torch.testing.assert_close(xg.cpu(), xc, atol=1e-6, rtol=0)
            assert torch.equal(yg.cpu(), yc)


def test_dali_gpu_eval_matches_dali_cpu(jpeg_dataset):
    pytest.importorskip("nvidia.dali")
    out = {}
    for backend in ("dali", "dali_cpu"):
        with data.build_loaders(make_cfg(jpeg_dataset, backend), device="cuda", build_train=False) as ld:
            out[backend] = torch.cat([x for x, _ in ld.val]).cpu()
    grey_level = 1 / (255 * 0.225)
    # nvJPEG (fancy upsampling on) and the GPU resampler differ from libjpeg-turbo and the CPU resampler a little.
    assert (out["dali"] - out["dali_cpu"]).abs().mean() < 2 * grey_level
