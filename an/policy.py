"""Weight-decay parameter groups and zero-init for every norm type of this package (ours).

Weight-decay policy (:func:`param_groups`). Every parameter is put in exactly one named group by the module
that owns it (not by its rank or name, since AN's K x C mixture is 2-D and AN is not a leaf module):

- ``"weight"``: weights of ordinary layers (conv, linear, SE FCs), **including AN's attention 1x1 conv**.
  Always decayed: it is a projection like any conv, not an affine of a normalizer.
- ``"norm"``: parameters owned by normalization layers: BN/GN/LN gamma and beta, SN gamma/beta and its mixture
  logits, IEBN gamma/beta and gate (a, b), and the affine of AN's BatchNorm over the K logits.
- ``"an_mixture"``: AN's Gamma and B (``mixture_weight``, ``mixture_bias``).
- ``"bias"``: parameters of non-norm layers with at most one dimension (biases, also 1-D scales).

With ``decay_norm=True`` (the official recipe: weight decay on everything) all groups get ``weight_decay``;
with ``decay_norm=False`` the ``norm``, ``an_mixture`` and ``bias`` groups get 0.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from an.attentive import AttentiveNorm2d
from an.iebn import IEBatchNorm2d
from an.switchable import SwitchableNorm2d

__all__ = ["GROUP_NAMES", "param_groups", "zero_init_"]

GROUP_NAMES = ("weight", "norm", "an_mixture", "bias")
_NORM_TYPES = (_NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm, SwitchableNorm2d, IEBatchNorm2d)


def _role(module: nn.Module, param: torch.Tensor) -> str:
    if isinstance(module, AttentiveNorm2d):
        return "an_mixture"  # its only direct parameters are Gamma and B
    if isinstance(module, _NORM_TYPES):
        return "norm"
    return "bias" if param.ndim <= 1 else "weight"


def param_groups(model: nn.Module, weight_decay: float, decay_norm: bool = True) -> list[dict]:
    """Named optimizer parameter groups implementing the module docstring's weight-decay policy.

    Args:
        model: The model (DDP/compile wrappers are fine; shared parameters are listed once).
        weight_decay: The decay for decayed groups.
        decay_norm: Decay norm parameters, AN mixtures and biases too (True: the official recipe).

    Returns:
        Non-empty groups in the order of ``GROUP_NAMES``, each a dict with ``name``, ``params``,
        ``param_names`` (as ``torch.optim`` names them) and ``weight_decay``; pass it to any optimizer.
    """
    buckets: dict[str, tuple[list, list]] = {g: ([], []) for g in GROUP_NAMES}
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            params, names = buckets[_role(module, p)]
            params.append(p)
            names.append(f"{mod_name}.{p_name}" if mod_name else p_name)
    out = []
    for name, (params, names) in buckets.items():
        if params:
            wd = weight_decay if (name == "weight" or decay_norm) else 0.0
            out.append({"name": name, "params": params, "param_names": names, "weight_decay": wd})
    return out


@torch.no_grad()
def zero_init_(module: nn.Module) -> nn.Module:
    """Zero-initialises the last norm of a residual branch so the branch starts as zero.

    AN (both variants): Gamma = B = 0 (exact zero output). IEBN: gamma = beta = 0. SN, BN, GN, LN: gamma = 0.
    Modules of this package implement ``zero_init_()``; affine torch norms use the fallback.

    Args:
        module: A norm layer.

    Returns:
        ``module``.

    Raises:
        TypeError: If the module has no known zero-gamma (e.g. a BN without affine, an SE block).
    """
    if callable(getattr(module, "zero_init_", None)):
        module.zero_init_()
    elif isinstance(module, (_NormBase, nn.GroupNorm, nn.LayerNorm)) and getattr(module, "weight", None) is not None:
        module.weight.zero_()
    else:
        raise TypeError(f"zero_init_: don't know how to zero-init {type(module).__name__} (no affine gamma)")
    return module
