"""Helpers for tracing and deploying models that contain this package's norm layers (ours).

Every norm layer here runs a plain-op formulation of itself under TorchScript, ``torch.jit.trace``, ``torch.fx``
symbolic tracing and ``torch.export`` (``forward_plain``), so those tools work on AN models as they are:
``torchvision.models.feature_extraction.create_feature_extractor`` traces through AN, and every node inside it
(statistics, attention, mixture) becomes part of the graph. To keep each norm layer as one node instead (a
smaller graph, or a quantization or graph-rewrite tool that should not look inside), declare them leaves::

    create_feature_extractor(model, return_nodes, tracer_kwargs={"leaf_modules": an.fx_leaf_modules()})
"""

from __future__ import annotations

from torch import nn

from an.attentive import AttentiveNorm2d
from an.iebn import IEBatchNorm2d
from an.standardize import BatchStandardize2d, GroupStandardize2d
from an.switchable import SwitchableNorm2d

__all__ = ["fx_leaf_modules"]


def fx_leaf_modules() -> list[type[nn.Module]]:
    """The norm layer classes of this package, for a ``torch.fx`` tracer's leaf list (subclasses included:
    the fused and compile variants of AN, ``SyncSwitchableNorm2d``)."""
    return [AttentiveNorm2d, IEBatchNorm2d, SwitchableNorm2d, BatchStandardize2d, GroupStandardize2d]
