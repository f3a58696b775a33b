"""Instance Enhancement Batch Normalization (IEBN).

Reference: S. Liang, Z. Huang, M. Liang and H. Yang, "Instance Enhancement Batch Normalization: an Adaptive
Regulator of Batch Noise", AAAI 2020 (the authors' code: gbup-group/IEBN); see ``docs/AN.md`` section 8:

    y = x_hat * gamma_c * sigmoid(a_c * mean_hw(x)[n, c] + b_c) + beta_c

with ``x_hat`` the BN-standardized input and the gate computed from the raw input's channel mean; a = 0,
b = -1, gamma = 1, beta = 0 at init. What is ours: composition (an affine-free ``norm`` standardizer,
:class:`~an.standardize.BatchStandardize2d`, plus the gate parameters) so BN tools keep the gate, float32 math
under autocast, one pass for statistics (see :mod:`an.functional`), and a plain-op formulation for TorchScript,
tracing and export (:meth:`IEBatchNorm2d.forward_plain`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from an.functional import ChannelStatsForward, standardize_affine
from an.standardize import BatchStandardize2d, StandardizedAffine

__all__ = ["IEBatchNorm2d"]


class IEBatchNorm2d(ChannelStatsForward, StandardizedAffine, nn.Module):
    """IEBN (factory name ``'iebn'``).

    Parameters: ``weight``/``bias`` (C; gamma/beta), ``gate_weight``/``gate_bias`` (C; a and b).
    Submodule ``norm``: the affine-free BN standardizer that owns the running statistics.

    Args:
        num_features: Channels C.
        eps: Epsilon of the standardizer BN.
        momentum: Momentum of the standardizer BN.
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
        self.num_features = num_features
        self.norm = BatchStandardize2d(num_features, eps, momentum, device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(num_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(num_features, device=device, dtype=dtype))
        self.gate_weight = nn.Parameter(torch.empty(num_features, device=device, dtype=dtype))
        self.gate_bias = nn.Parameter(torch.empty(num_features, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """gamma = 1, beta = 0, a = 0, b = -1 (gate starts at sigmoid(-1) ~ 0.27); running stats reset."""
        self.norm.reset_running_stats()
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)
        nn.init.zeros_(self.gate_weight)
        nn.init.constant_(self.gate_bias, -1.0)

    @torch.no_grad()
    def zero_init_(self) -> None:
        """gamma = beta = 0, so the layer outputs exactly zero."""
        self.weight.zero_()
        self.bias.zero_()

    def _forward_stats(self, xf: Tensor, mean: Tensor, var: Tensor) -> Tensor:
        """The eager forward (see :class:`~an.functional.ChannelStatsForward`)."""
        gate = torch.sigmoid(self.gate_weight.to(xf.dtype) * mean + self.gate_bias.to(xf.dtype))
        scale = self.weight.to(xf.dtype) * gate
        return standardize_affine(self.norm, xf, mean, var, scale, self.bias.to(xf.dtype).expand_as(scale))

    def forward_plain(self, x: Tensor) -> Tensor:
        """The forward in plain differentiable torch ops (TorchScript, ``torch.jit.trace``, ``torch.fx``,
        ``torch.export``); float32 statistics for float16/bfloat16 inputs."""
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # float32 or float64
        mean = xf.mean(dim=[2, 3])
        gate = torch.sigmoid(self.gate_weight.to(xf.dtype) * mean + self.gate_bias.to(xf.dtype))
        scale = self.weight.to(xf.dtype) * gate
        shift = self.bias.to(xf.dtype).expand_as(scale)
        return self._standardize_affine(xf, scale, shift).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}"
