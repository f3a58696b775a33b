"""SyncBN conversion that keeps AN, SN and IEBN whole (ours).

``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` rebuilds every ``_BatchNorm`` instance as a plain
``SyncBatchNorm`` and copies only ``weight``/``bias`` and the running statistics, so a BN *subclass* loses its
extra parameters and its forward (this is how the legacy AN, a BatchNorm2d subclass, lost its mixture), and a
norm that is not a ``_BatchNorm`` (SN) keeps computing its BN statistics per rank. :func:`convert_sync_norm`:

- plain ``nn.BatchNorm{1,2,3}d`` and the affine-free :class:`~an.standardize.BatchStandardize2d` ->
  ``nn.SyncBatchNorm`` (same as torch), wherever they are, including the standardizer and attention BN inside
  AN and the standardizer inside IEBN (those modules stay intact and call their submodules, see
  :func:`an.functional.standardize_affine`);
- ``SwitchableNorm2d`` -> ``SyncSwitchableNorm2d`` sharing the same parameter and buffer tensors;
- timm's ``BatchNormAct2d`` -> timm's ``SyncBatchNormAct`` (timm's own converter: same tensors, activation
  and drop kept);
- any other ``_BatchNorm`` subclass -> TypeError, instead of a silent loss of whatever it adds.

Parameter names, shapes and count are unchanged. ``nn.SyncBatchNorm`` only runs on accelerators when
torch.distributed is initialised; without it (or in eval mode) it behaves as BatchNorm on any device.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from an.standardize import BatchStandardize2d
from an.switchable import SwitchableNorm2d, SyncSwitchableNorm2d

__all__ = ["convert_sync_norm"]

_PLAIN_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, BatchStandardize2d)


def _is_timm_norm_act(module: nn.Module) -> bool:
    kind = type(module)
    return kind.__name__ == "BatchNormAct2d" and kind.__module__.startswith("timm.")


def convert_sync_norm(module: nn.Module, process_group: dist.ProcessGroup | None = None) -> nn.Module:
    """Converts BN-like layers of ``module`` to their synchronised versions, in place where possible.

    Args:
        module: A model or a single layer.
        process_group: Group to synchronise over (None = the default group).

    Returns:
        ``module`` itself with converted children, or the converted layer when ``module`` is a norm layer.

    Raises:
        TypeError: For a ``_BatchNorm`` subclass this function does not know how to convert.
    """
    if isinstance(module, (nn.SyncBatchNorm, SyncSwitchableNorm2d)):
        return module
    if type(module) is SwitchableNorm2d:
        return SyncSwitchableNorm2d.from_switchable(module, process_group)
    if _is_timm_norm_act(module):
        from timm.layers.norm_act import convert_sync_batchnorm  # the layer's own package: timm is installed

        return convert_sync_batchnorm(module, process_group)
    if isinstance(module, _BatchNorm):
        if type(module) not in _PLAIN_BN:
            raise TypeError(
                f"convert_sync_norm: refusing to convert {type(module).__name__}, a BatchNorm subclass, to a plain "
                "SyncBatchNorm (its extra parameters and forward would be lost); build it by composition or add "
                "an explicit conversion in an/sync.py"
            )
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    for name, child in module.named_children():
        converted = convert_sync_norm(child, process_group)
        if converted is not child:
            module.add_module(name, converted)
    return module
