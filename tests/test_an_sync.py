"""Tests of convert_sync_norm and SyncSwitchableNorm2d (an/sync.py, an/switchable.py).

nn.SyncBatchNorm only synchronises CUDA tensors, so on CPU these tests check the structure of the converted
model and that, with torch.distributed not initialised, it computes exactly what the original did.
SyncSwitchableNorm2d uses plain all-reduces, so it is also checked across two gloo processes on CPU.
"""

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import an
from tests.conftest import conv_bn_relu

pytestmark = pytest.mark.usefixtures("single_thread")


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        *conv_bn_relu(3, 32),
        an.create_norm("an", 32, k=4),
        an.create_norm("sn", 32),
        an.create_norm("iebn", 32),
        an.create_norm("an_gn", 32, k=3, groups=8),
        an.create_norm("gn", 32, groups=8),
        nn.Sequential(nn.Conv2d(32, 16, 1), nn.BatchNorm2d(16)),
    )


def _param_shapes(model: nn.Module) -> dict:
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def test_convert_keeps_names_shapes_count_and_an_sn_iebn_whole():
    model = _model()
    before = _param_shapes(model)
    buffers_before = {n: tuple(b.shape) for n, b in model.named_buffers()}
    sn_params = list(model[4].parameters())
    synced = an.convert_sync_norm(model)
    assert synced is model  # converted in place, like torch's converter
    assert _param_shapes(synced) == before
    assert {n: tuple(b.shape) for n, b in synced.named_buffers()} == buffers_before
    assert sum(p.numel() for p in synced.parameters()) == sum(_numel(s) for s in before.values())
    assert type(synced[1]) is nn.SyncBatchNorm and type(synced[8][1]) is nn.SyncBatchNorm
    a = synced[3]
    assert type(a) is an.AttentiveBatchNorm2d
    assert type(a.norm) is nn.SyncBatchNorm and not a.norm.affine
    assert type(a.attention.bn) is nn.SyncBatchNorm and a.attention.bn.affine
    assert type(synced[4]) is an.SyncSwitchableNorm2d
    assert all(p is q for p, q in zip(synced[4].parameters(), sn_params))  # same tensors, optimizer-safe
    assert type(synced[5]) is an.IEBatchNorm2d and type(synced[5].norm) is nn.SyncBatchNorm
    assert type(synced[6]) is an.AttentiveGroupNorm2d and type(synced[6].norm) is an.GroupStandardize2d
    assert type(synced[6].attention.bn) is nn.SyncBatchNorm
    assert type(synced[7]) is nn.GroupNorm
    assert an.convert_sync_norm(synced) is synced  # idempotent


def _numel(shape) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def test_converted_model_computes_the_same_on_cpu_without_distributed():
    """SyncBatchNorm falls back to batch_norm when torch.distributed is not initialised: outputs must match."""
    ref = _model()
    synced = an.convert_sync_norm(copy.deepcopy(ref))
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(4, 3, 6, 6, generator=gen)
        torch.testing.assert_close(synced(x), ref(x), atol=1e-5, rtol=1e-5)
    for (name, b1), (_, b2) in zip(ref.named_buffers(), synced.named_buffers()):
        torch.testing.assert_close(b1, b2, atol=1e-6, rtol=1e-5, msg=name)
    ref.eval()
    synced.eval()
    torch.testing.assert_close(synced(x), ref(x), atol=1e-5, rtol=1e-5)


def test_convert_single_layers_and_train_flag():
    bn = nn.BatchNorm2d(8).eval()
    out = an.convert_sync_norm(bn)
    assert type(out) is nn.SyncBatchNorm and not out.training
    sn = an.create_norm("sn", 8).eval()
    out = an.convert_sync_norm(sn)
    assert type(out) is an.SyncSwitchableNorm2d and not out.training
    assert out.weight is sn.weight and out.running_mean is sn.running_mean
    assert set(out.state_dict()) == set(sn.state_dict())


class _LegacyAN(nn.BatchNorm2d):
    """The legacy design: AN as a BatchNorm2d subclass with extra mixture parameters (do not do this)."""

    def __init__(self, c: int, k: int) -> None:
        super().__init__(c, affine=False)
        self.weight_ = nn.Parameter(torch.ones(k, c))
        self.bias_ = nn.Parameter(torch.zeros(k, c))


def test_torch_converter_mangles_subclasses_ours_refuses():
    legacy = nn.Sequential(_LegacyAN(8, 3))
    naive = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(legacy))
    assert sum(p.numel() for p in naive.parameters()) == 0  # the mixture silently disappeared
    with pytest.raises(TypeError, match="refusing to convert _LegacyAN"):
        an.convert_sync_norm(legacy)


def test_torch_converter_leaves_sn_unsynchronised_ours_converts():
    model = nn.Sequential(an.create_norm("sn", 8))
    assert type(nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))[0]) is an.SwitchableNorm2d
    assert type(an.convert_sync_norm(model)[0]) is an.SyncSwitchableNorm2d


# ---------------------------------------------------------------------------------------------- 2 processes
def _sync_sn_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        layer = an.convert_sync_norm(an.create_norm("sn", 6))
        with torch.no_grad():
            layer.mean_weight.copy_(torch.tensor([0.1, -0.2, 0.3]))
            layer.var_weight.copy_(torch.tensor([-0.3, 0.2, 0.1]))
        gen = torch.Generator().manual_seed(123)
        x = torch.randn(6, 6, 4, 4, generator=gen) * 2 + 1
        g = torch.randn(6, 6, 4, 4, generator=gen)
        # Uneven shards (4 + 2 samples) also check the global count.
        lo, hi = (0, 4) if rank == 0 else (4, 6)
        xs = x[lo:hi].clone().requires_grad_()
        y = layer(xs)
        (y * g[lo:hi]).sum().backward()
        torch.save(
            {
                "y": y.detach(),
                "gx": xs.grad,
                "grads": {n: p.grad for n, p in layer.named_parameters()},
                "running_mean": layer.running_mean,
                "running_var": layer.running_var,
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def test_sync_switchable_norm_matches_full_batch_across_two_gloo_processes(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    mp.spawn(_sync_sn_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))

    torch.manual_seed(0)
    ref = an.create_norm("sn", 6)
    with torch.no_grad():
        ref.mean_weight.copy_(torch.tensor([0.1, -0.2, 0.3]))
        ref.var_weight.copy_(torch.tensor([-0.3, 0.2, 0.1]))
    gen = torch.Generator().manual_seed(123)
    x = (torch.randn(6, 6, 4, 4, generator=gen) * 2 + 1).requires_grad_()
    g = torch.randn(6, 6, 4, 4, generator=gen)
    y = ref(x)
    (y * g).sum().backward()

    torch.testing.assert_close(torch.cat([r0["y"], r1["y"]]), y.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([r0["gx"], r1["gx"]]), x.grad, atol=1e-5, rtol=1e-5)
    for name, p in ref.named_parameters():  # DDP would sum (then average) these across ranks
        torch.testing.assert_close(r0["grads"][name] + r1["grads"][name], p.grad, atol=1e-4, rtol=1e-4, msg=name)
    for r in (r0, r1):
        torch.testing.assert_close(r["running_mean"], ref.running_mean)
        torch.testing.assert_close(r["running_var"], ref.running_var)
