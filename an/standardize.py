"""The affine-free standardizers inside AN and IEBN (ours).

AN and IEBN standardize their input with an affine-free BatchNorm (or, for AN w/ GN, GroupNorm) and apply their
own affine. These two classes are that standardizer. They compute exactly what ``nn.BatchNorm2d(C, affine=False)``
and ``nn.GroupNorm(G, C, affine=False)`` compute and keep the same buffer names (``running_mean``,
``running_var``, ``num_batches_tracked``), so checkpoints are unchanged, but they are deliberately *not* instances
of ``nn.BatchNorm2d`` / ``nn.GroupNorm``: model builders' init loops (torchvision's ResNet, MobileNet,
EfficientNet; timm's EfficientNet) set ``m.weight``/``m.bias`` of every such instance, which an affine-free
standardizer does not have.

:class:`BatchStandardize2d` is a ``torch.nn.modules.batchnorm._BatchNorm``, so generic BatchNorm rules still reach
it: ``nn.SyncBatchNorm.convert_sync_batchnorm`` and :func:`an.convert_sync_norm` turn it into an affine-free
``nn.SyncBatchNorm`` (AN then synchronises its statistics across ranks), and "freeze BN statistics" rules that
put every ``_BatchNorm`` in eval mode freeze it too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["BatchStandardize2d", "GroupStandardize2d", "StandardizedAffine"]


class BatchStandardize2d(_BatchNorm):
    """``nn.BatchNorm2d(num_features, eps, momentum, affine=False)`` that is not an ``nn.BatchNorm2d`` instance.

    Args:
        num_features: Channels C.
        eps: Added to the variance.
        momentum: Running-statistics momentum (None = cumulative average).
        track_running_stats: Keep running statistics (used in eval mode).
        device: Device of the buffers.
        dtype: Dtype of the running mean and variance.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, False, track_running_stats, device=device, dtype=dtype)

    def _check_input_dim(self, input: Tensor) -> None:
        # Two ifs: TorchScript drops the body of `if not torch.jit.is_scripting()` unseen, not of a combined test.
        if not torch.jit.is_scripting():  # noqa: SIM102
            if isinstance(input, torch.fx.Proxy):  # torch.fx symbolic tracing: no shapes to check
                return
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")


class GroupStandardize2d(nn.Module):
    """``nn.GroupNorm(num_groups, num_channels, eps, affine=False)`` that is not an ``nn.GroupNorm`` instance.

    Args:
        num_groups: Groups G (must divide ``num_channels``).
        num_channels: Channels C.
        eps: Added to the variance.
    """

    __constants__ = ("num_groups", "num_channels", "eps", "affine")
    affine: bool = False

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f"num_channels ({num_channels}) must be divisible by num_groups ({num_groups})")
        self.num_groups, self.num_channels, self.eps = num_groups, num_channels, eps

    def forward(self, x: Tensor) -> Tensor:
        return F.group_norm(x, self.num_groups, None, None, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine=False"


class StandardizedAffine:
    """Mixin of the layers that own a standardizer ``self.norm``: its ``norm(x) * scale + shift`` in plain ops.

    Used by the layers' ``forward_plain`` (TorchScript, tracing, export). In eval mode a standardizer with running
    statistics (ours, ``nn.BatchNorm2d``, ``nn.SyncBatchNorm``) is a constant per-channel affine, folded into
    ``scale``/``shift``: one multiply-add per element, as in the eager path, instead of a BatchNorm pass followed by
    the affine (which a traced or exported graph, e.g. in ONNX Runtime, would otherwise run). A method rather than a
    function because TorchScript cannot pass a module to a function; it resolves ``hasattr`` when compiling.
    """

    def _standardize_affine(self, x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
        """``self.norm(x) * scale + shift`` with per-(n, c) ``scale``/``shift`` of shape (N, C)."""
        if not self.training:  # noqa: SIM102  (TorchScript needs hasattr in its own if)
            if hasattr(self.norm, "running_var"):
                rm, rv = self.norm.running_mean, self.norm.running_var
                if rm is not None and rv is not None:
                    a = scale * torch.rsqrt(rv.to(scale.dtype) + self.norm.eps)
                    b = shift - rm.to(scale.dtype) * a
                    return x * a[:, :, None, None] + b[:, :, None, None]
        return self.norm(x) * scale[:, :, None, None] + shift[:, :, None, None]
