"""Switchable Normalization (SN) and its synchronised variant.

Reference: P. Luo, J. Ren, Z. Peng, R. Zhang and J. Li, "Differentiable Learning-to-Normalize via Switchable
Normalization", ICLR 2019 (arXiv 1806.10779); the SN paper's definition, see ``docs/AN.md`` section 8:

    y = gamma * (x - sum_k w_k mu_k) / sqrt(sum_k w'_k sigma2_k + eps) + beta,   k in {IN, LN, BN}
    w = softmax(mean_weight), w' = softmax(var_weight)   (two separate triplets, initialised equal)

What is ours:

- All variances are biased (population) variances, so a one-hot SN is exactly InstanceNorm, LayerNorm
  (GroupNorm with one group) or BatchNorm; LN and BN statistics are derived from the IN ones with the law of
  total variance.
- Eval-time choice: the BN part uses running averages updated like ``nn.BatchNorm2d`` (momentum 0.1,
  unbiased running variance), the IN/LN parts always come from the sample. The SN paper's alternative
  "batch average" (statistics re-estimated after training) is not implemented.
- :class:`SyncSwitchableNorm2d` computes the BN-part statistics over all ranks (two small differentiable
  all-reduces); the mixture weights and IN/LN parts are per-sample and need no communication.
- Statistics and mixture math run in float32 under autocast; the output has the input dtype.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from an.functional import ChannelStatsForward, channel_affine

__all__ = ["SwitchableNorm2d", "SyncSwitchableNorm2d"]


class SwitchableNorm2d(ChannelStatsForward, nn.Module):
    """Switchable Normalization over IN, LN and BN statistics (factory name ``'sn'``).

    Parameters: ``weight``/``bias`` (C; gamma/beta), ``mean_weight``/``var_weight`` (3; softmax logits in
    the order IN, LN, BN). Buffers: ``running_mean``, ``running_var``, ``num_batches_tracked`` (BN part).

    Args:
        num_features: Channels C.
        eps: Added to the mixed variance.
        momentum: Momentum of the BN-part running statistics (None = cumulative average).
        device: Device of the parameters and buffers.
        dtype: Dtype of the floating-point parameters and buffers.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        dd = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(num_features, **dd))
        self.bias = nn.Parameter(torch.empty(num_features, **dd))
        self.mean_weight = nn.Parameter(torch.empty(3, **dd))
        self.var_weight = nn.Parameter(torch.empty(3, **dd))
        self.register_buffer("running_mean", torch.zeros(num_features, **dd))
        self.register_buffer("running_var", torch.ones(num_features, **dd))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """gamma = 1, beta = 0, equal mixture weights (1/3 each); running statistics reset."""
        self.reset_running_stats()
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)
        nn.init.zeros_(self.mean_weight)
        nn.init.zeros_(self.var_weight)

    @torch.no_grad()
    def zero_init_(self) -> None:
        """gamma = 0 (zero-init of a residual branch's last norm)."""
        self.weight.zero_()

    def mixture_weights(self, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """The softmax-normalized (mean, variance) weights, each of shape (3,) in the order IN, LN, BN."""
        return torch.softmax(self.mean_weight.to(dtype), 0), torch.softmax(self.var_weight.to(dtype), 0)

    def _batch_stats(self, mean: Tensor, var: Tensor, hw: int) -> tuple[Tensor, Tensor, Tensor | int]:
        """BN-part (mean, biased var) per channel from the IN statistics, and the element count per channel."""
        count = mean.shape[0] * hw
        if count <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got {count}")
        mu = mean.mean(0)
        return mu, var.mean(0) + (mean - mu).square().mean(0), count

    def _forward_stats(self, xf: Tensor, mean_in: Tensor, var_in: Tensor) -> Tensor:
        """The eager forward (see :class:`~an.functional.ChannelStatsForward`)."""
        mean_ln = mean_in.mean(1, keepdim=True)
        var_ln = var_in.mean(1, keepdim=True) + (mean_in - mean_ln).square().mean(1, keepdim=True)
        if self.training:
            mean_bn, var_bn, count = self._batch_stats(mean_in, var_in, xf.shape[2] * xf.shape[3])
            self._update_running(mean_bn, var_bn, count)
        else:
            mean_bn, var_bn = self.running_mean.to(xf.dtype), self.running_var.to(xf.dtype)
        wm, wv = self.mixture_weights(xf.dtype)
        mean = wm[0] * mean_in + wm[1] * mean_ln + wm[2] * mean_bn
        var = wv[0] * var_in + wv[1] * var_ln + wv[2] * var_bn
        scale = self.weight.to(xf.dtype) * torch.rsqrt(var + self.eps)
        return channel_affine(xf, scale, self.bias.to(xf.dtype) - mean * scale)

    def forward_plain(self, x: Tensor) -> Tensor:
        """The forward in plain differentiable torch ops (TorchScript, ``torch.jit.trace``, ``torch.fx``,
        ``torch.export``); float32 statistics for float16/bfloat16 inputs. The BN part uses this process's batch
        (also in :class:`SyncSwitchableNorm2d`: synchronisation is an eager-mode feature)."""
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # float32 or float64
        var_in, mean_in = torch.var_mean(xf, dim=[2, 3], correction=0)
        mean_ln = mean_in.mean(1, keepdim=True)
        var_ln = var_in.mean(1, keepdim=True) + (mean_in - mean_ln).square().mean(1, keepdim=True)
        if self.training:
            mean_bn = mean_in.mean(0)
            var_bn = var_in.mean(0) + (mean_in - mean_bn).square().mean(0)
            count = xf.shape[0] * xf.shape[2] * xf.shape[3]
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = self.momentum
                if factor is None:
                    factor = 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean_bn.to(self.running_mean.dtype), factor)
                unbiased = var_bn * (count / (count - 1))  # count > 1 in training, as BatchNorm requires
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        else:
            mean_bn, var_bn = self.running_mean.to(xf.dtype), self.running_var.to(xf.dtype)
        wm = torch.softmax(self.mean_weight.to(xf.dtype), 0)
        wv = torch.softmax(self.var_weight.to(xf.dtype), 0)
        mean = wm[0] * mean_in + wm[1] * mean_ln + wm[2] * mean_bn
        var = wv[0] * var_in + wv[1] * var_ln + wv[2] * var_bn
        scale = self.weight.to(xf.dtype) * torch.rsqrt(var + self.eps)
        shift = self.bias.to(xf.dtype) - mean * scale
        return (xf * scale[:, :, None, None] + shift[:, :, None, None]).to(x.dtype)

    @torch.no_grad()
    def _update_running(self, mean: Tensor, var: Tensor, count: Tensor | int) -> None:
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_((var * (count / (count - 1))).to(self.running_var.dtype), factor)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


class SyncSwitchableNorm2d(SwitchableNorm2d):
    """SN whose BN-part statistics are computed over every rank of ``process_group`` in training.

    Falls back to :class:`SwitchableNorm2d` behaviour when torch.distributed is not initialised or the group
    has one rank. Gradients flow through the all-reduces (``torch.distributed.nn.functional.all_reduce``), so
    the backward matches SN on the concatenated batch, as ``nn.SyncBatchNorm`` does for BN. Works with any
    backend that supports all_reduce (gloo on CPU included).

    Args:
        num_features: Channels C.
        eps: Added to the mixed variance.
        momentum: Momentum of the BN-part running statistics.
        process_group: Group to synchronise over (None = the default group).
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        process_group: dist.ProcessGroup | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, device=device, dtype=dtype)
        self.process_group = process_group

    @classmethod
    def from_switchable(
        cls, module: SwitchableNorm2d, process_group: dist.ProcessGroup | None = None
    ) -> SyncSwitchableNorm2d:
        """A synced copy that shares ``module``'s parameters and buffers (same names, same tensors)."""
        with torch.device("meta"):
            out = cls(module.num_features, module.eps, module.momentum, process_group)
        for name, p in module.named_parameters(recurse=False):
            out.register_parameter(name, p)
        for name, b in module.named_buffers(recurse=False):
            out.register_buffer(name, b)
        out.train(module.training)
        return out

    def _world(self) -> int:
        if self.training and dist.is_available() and dist.is_initialized():
            return dist.get_world_size(self.process_group)
        return 1

    def _all_reduce(self, t: Tensor) -> Tensor:
        from torch.distributed.nn.functional import all_reduce

        return all_reduce(t, group=dist.group.WORLD if self.process_group is None else self.process_group)

    def _batch_stats(self, mean: Tensor, var: Tensor, hw: int) -> tuple[Tensor, Tensor, Tensor | int]:
        if self._world() == 1:
            return super()._batch_stats(mean, var, hw)
        # Two rounds keep the variance stable: global mean first, then squared deviations around it.
        n_local = torch.full((1,), float(mean.shape[0]), dtype=mean.dtype, device=mean.device)
        sums = self._all_reduce(torch.cat([mean.sum(0), n_local]))
        n = sums[-1]
        mu = sums[:-1] / n
        sq = self._all_reduce((var + (mean - mu).square()).sum(0))
        return mu, sq / n, n.detach() * hw  # count stays a tensor: no host sync
