"""Parameter and multiply-accumulate (MAC) counting with forward hooks (ours; no thop dependency).

Convention (the one behind torchvision's and the AN paper's "FLOPs" columns, e.g. ResNet-50 4.09G): MACs of
``nn.Conv2d`` (``out elements x in_channels / groups x kernel area``) and ``nn.Linear`` (``out elements x
in_features``) for one image; norms, activations, pooling, additions and concatenations are not counted.
``norm_cost=c`` adds ``c`` per output element of every outermost norm layer (BN, GN, SN, IEBN, AN). thop,
which the AN authors list as their counter, charges 4 per element for an affine BN (2 to standardize, 2 for
the affine) on top of the conv/linear MACs; ``norm_cost=4`` reproduces its totals (AOGNet-12M 2.17G,
AOGNet-40M 7.48G, ``docs/AN.md`` 3.1). AN's attention (a C x K product per image) is below the reported precision
and is not counted.

The forward runs in eval mode under ``no_grad`` on the model's own device; a model built on the meta
device (``with torch.device('meta'): ...``) is counted without allocating memory.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

import an

__all__ = ["count_macs", "count_params", "is_norm", "mac_breakdown"]

_NORM_TYPES = (_NormBase, nn.GroupNorm, nn.LayerNorm, an.AttentiveNorm2d, an.IEBatchNorm2d, an.SwitchableNorm2d)


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def is_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a normalization layer (torch's or one of :mod:`an`)."""
    return isinstance(module, _NORM_TYPES)


def _first_conv(model: nn.Module) -> nn.Conv2d | None:
    return next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)


@torch.no_grad()
def mac_breakdown(model: nn.Module, img_size: int | tuple[int, int] = 224, *, in_chans: int | None = None) -> dict:
    """Per-kind counts of one forward pass of a single ``img_size`` image.

    Args:
        model: The model (left in its original train/eval state).
        img_size: Input height and width (an int for a square input).
        in_chans: Input channels (default: the first convolution's).

    Returns:
        ``{'conv': MACs, 'linear': MACs, 'norm_elements': output elements of outermost norm layers}``.
    """
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    if in_chans is None:
        conv = _first_conv(model)
        in_chans = conv.in_channels if conv is not None else 3
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    counts = {"conv": 0, "linear": 0, "norm_elements": 0}

    def conv_hook(m: nn.Conv2d, inputs: tuple[Tensor, ...], out: Tensor) -> None:
        k = m.kernel_size[0] * m.kernel_size[1]
        counts["conv"] += out.numel() // out.shape[0] * (m.in_channels // m.groups) * k

    def linear_hook(m: nn.Linear, inputs: tuple[Tensor, ...], out: Tensor) -> None:
        counts["linear"] += out.numel() // out.shape[0] * m.in_features

    def norm_hook(m: nn.Module, inputs: tuple[Tensor, ...], out: Tensor) -> None:
        counts["norm_elements"] += out.numel() // out.shape[0]

    handles = []
    skip: list[str] = []  # prefixes of norm layers: their submodules (AN's standardizer, attention BN) are inside
    for name, m in model.named_modules():
        if any(name.startswith(p) for p in skip):
            continue
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
        elif is_norm(m):
            skip.append(f"{name}.")
            handles.append(m.register_forward_hook(norm_hook))
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        model(torch.zeros(1, in_chans, h, w, device=device, dtype=dtype))
    finally:
        for hd in handles:
            hd.remove()
        for m, mode in modes.items():
            m.training = mode
    return counts


def count_macs(
    model: nn.Module, img_size: int | tuple[int, int] = 224, *, in_chans: int | None = None, norm_cost: float = 0.0
) -> int:
    """MACs of one forward pass of a single ``img_size`` image (see the module docstring for the convention).

    Args:
        model: The model (left in its original train/eval state).
        img_size: Input height and width (an int for a square input).
        in_chans: Input channels (default: the first convolution's).
        norm_cost: Operations charged per output element of each norm layer (0: not counted; 4: thop's).

    Returns:
        The MAC count.
    """
    c = mac_breakdown(model, img_size, in_chans=in_chans)
    return round(c["conv"] + c["linear"] + norm_cost * c["norm_elements"])
