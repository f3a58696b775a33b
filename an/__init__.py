"""Normalization layers for the framework: Attentive Normalization and its baselines (depends on torch only).

Public interface (other packages rely on these names):

- The norm registry (``an/registry.py``): :func:`create_norm`, :func:`get_norm_layer`, :func:`list_norms`,
  :func:`norm_entry` (how a backbone places a norm), :func:`register_norm` / :func:`unregister_norm` /
  :func:`registered_norm` (add your own); the attention-layer registry: :func:`create_attn`,
  :func:`get_attn_layer`, :func:`list_attns`, :func:`register_attn`. The built-in entries are registered in
  ``an/factory.py``.
- :func:`convert_norms`: put any registered norm into any model (torchvision, timm, yours) in place of its
  BatchNorm layers, at the paper's positions or where you say (``an/convert.py``); :func:`get_norm_layer` /
  :func:`get_norm_act_layer` also serve as ``norm_layer=`` of torchvision's and timm's builders.
- :func:`fx_leaf_modules`: this package's norm classes, to keep them as single nodes in a ``torch.fx`` trace
  (``an/deploy.py``; they also trace through).
- :func:`convert_sync_norm`: SyncBN conversion that keeps AN, SN and IEBN whole (``an/sync.py``).
- :func:`param_groups`, :func:`zero_init_`: weight-decay groups and zero-init policy (``an/policy.py``).
- Layer classes: :class:`AttentiveBatchNorm2d`, :class:`AttentiveGroupNorm2d` (``an/attentive.py``),
  :class:`SwitchableNorm2d`, :class:`SyncSwitchableNorm2d` (``an/switchable.py``), :class:`IEBatchNorm2d`,
  :class:`SqueezeExcite`; the same AN layers with fused kernels or for torch.compile:
  :class:`FusedAttentiveBatchNorm2d`, :class:`FusedAttentiveGroupNorm2d`, :class:`CompileAttentiveBatchNorm2d`,
  :class:`CompileAttentiveGroupNorm2d` (``an/fused.py``; chosen by ``create_norm(..., impl=...)``); the
  standardizers inside AN and IEBN, :class:`BatchStandardize2d`, :class:`GroupStandardize2d`
  (``an/standardize.py``); :class:`NormAct2d`, a norm with timm's norm+act interface (``an/norm_act.py``).
"""

from an import factory, registry  # factory registers the built-in norms and attention layers
from an.attentive import ATTENTION_MODES, AttentiveBatchNorm2d, AttentiveGroupNorm2d, AttentiveNorm2d, MixtureAttention
from an.convert import NormConversion, convert_norms
from an.deploy import fx_leaf_modules
from an.fused import (
    CompileAttentiveBatchNorm2d,
    CompileAttentiveGroupNorm2d,
    FusedAttentiveBatchNorm2d,
    FusedAttentiveGroupNorm2d,
)
from an.iebn import IEBatchNorm2d
from an.norm_act import NormAct2d
from an.policy import param_groups, zero_init_
from an.registry import *  # noqa: F403 (the registry's public names, listed in its __all__)
from an.se import SqueezeExcite
from an.standardize import BatchStandardize2d, GroupStandardize2d
from an.switchable import SwitchableNorm2d, SyncSwitchableNorm2d
from an.sync import convert_sync_norm

# The registry's public names, and the rest of the package's.
__all__ = [
    *registry.__all__,
    "ATTENTION_MODES",
    "AttentiveBatchNorm2d",
    "AttentiveGroupNorm2d",
    "AttentiveNorm2d",
    "BatchStandardize2d",
    "CompileAttentiveBatchNorm2d",
    "CompileAttentiveGroupNorm2d",
    "FusedAttentiveBatchNorm2d",
    "FusedAttentiveGroupNorm2d",
    "GroupStandardize2d",
    "IEBatchNorm2d",
    "MixtureAttention",
    "NormAct2d",
    "NormConversion",
    "SqueezeExcite",
    "SwitchableNorm2d",
    "SyncSwitchableNorm2d",
    "convert_norms",
    "convert_sync_norm",
    "factory",
    "fx_leaf_modules",
    "param_groups",
    "zero_init_",
]
