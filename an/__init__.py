"""Normalization layers for the framework: Attentive Normalization and its baselines (depends on torch only).

Public interface (other packages rely on these names):

- :func:`create_norm`, :func:`get_norm_layer`, :func:`list_norms`: the factory (``an/factory.py``).
- :func:`convert_sync_norm`: SyncBN conversion that keeps AN, SN and IEBN whole (``an/sync.py``).
- :func:`param_groups`, :func:`zero_init_`: weight-decay groups and zero-init policy (``an/policy.py``).
- :class:`SqueezeExcite`: SE block for backbones' ``se`` variant (``an/se.py``).
- Layer classes: :class:`AttentiveBatchNorm2d`, :class:`AttentiveGroupNorm2d` (``an/attentive.py``),
  :class:`SwitchableNorm2d`, :class:`SyncSwitchableNorm2d` (``an/switchable.py``), :class:`IEBatchNorm2d`;
  the same AN layers with fused kernels or for torch.compile: :class:`FusedAttentiveBatchNorm2d`,
  :class:`FusedAttentiveGroupNorm2d`, :class:`CompileAttentiveBatchNorm2d`, :class:`CompileAttentiveGroupNorm2d`
  (``an/fused.py``; chosen by ``create_norm(..., impl=...)``).
"""

from an.attentive import ATTENTION_MODES, AttentiveBatchNorm2d, AttentiveGroupNorm2d, AttentiveNorm2d, MixtureAttention
from an.factory import create_norm, get_norm_layer, list_norms
from an.fused import (
    CompileAttentiveBatchNorm2d,
    CompileAttentiveGroupNorm2d,
    FusedAttentiveBatchNorm2d,
    FusedAttentiveGroupNorm2d,
)
from an.iebn import IEBatchNorm2d
from an.policy import param_groups, zero_init_
from an.se import SqueezeExcite
from an.switchable import SwitchableNorm2d, SyncSwitchableNorm2d
from an.sync import convert_sync_norm

__all__ = [
    "ATTENTION_MODES",
    "AttentiveBatchNorm2d",
    "AttentiveGroupNorm2d",
    "AttentiveNorm2d",
    "CompileAttentiveBatchNorm2d",
    "CompileAttentiveGroupNorm2d",
    "FusedAttentiveBatchNorm2d",
    "FusedAttentiveGroupNorm2d",
    "IEBatchNorm2d",
    "MixtureAttention",
    "SqueezeExcite",
    "SwitchableNorm2d",
    "SyncSwitchableNorm2d",
    "convert_sync_norm",
    "create_norm",
    "get_norm_layer",
    "list_norms",
    "param_groups",
    "zero_init_",
]
