"""The interface every backbone shares (ours): timm's model API over an ordered trunk of feature stages.

A backbone is a trunk (the submodules that ``forward_features`` calls one after another) followed by a head
(a global pool, dropout and a classifier). The trunk is cut into **feature stages** at its **taps**: tap 0 is
the stem at stride 2, taps 1-4 end the four resolution stages at strides 4, 8, 16, 32. From that one
description this class gives what timm's tools expect of a model:

- ``feature_info``: one ``dict(num_chs, reduction, module, stage)`` per tap, read by timm's ``features_only``
  wrappers (``FeatureListNet`` runs the model's children in registration order up to the tapped modules, so
  every family registers its children in the order they run), by detection necks and by
  :meth:`forward_intermediates`;
- ``forward_features``, ``forward_head(x, pre_logits=...)``, ``forward_intermediates``,
  ``prune_intermediate_layers`` (used by timm's ``feature_cls='getter'``);
- ``num_classes``, ``num_features`` (trunk output channels), ``head_hidden_size`` (pooled width, doubled by
  ``'catavgmax'``), ``get_classifier``, ``reset_classifier(num_classes, global_pool)``;
- ``set_grad_checkpointing``: the blocks of the trunk's stage containers (those with parameters and not
  in-place) run under :func:`torch.utils.checkpoint` through timm's ``checkpoint``. BatchNorm-like layers then
  update their running statistics twice per training step (forward and recomputation), as in timm's models,
  and forward hooks on the containers themselves do not fire.

``forward_features`` calls the trunk's modules and containers whole (hooks on ``model.layer4`` or
``model.features`` fire); ``forward_intermediates`` runs a container child by child where a tap lies inside it.

Subclasses build their modules, then call :meth:`_init_head` (where the head belongs in the registration
order) and :meth:`_init_features`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from timm.models import checkpoint
from torch import Tensor, nn

from ._layers import classifier, global_pool_layer

__all__ = ["Backbone", "take_indices"]


def take_indices(num_taps: int, indices: int | Sequence[int] | None) -> tuple[list[int], int]:
    """timm's index convention: None = every tap, an int n = the last n taps, a list = those (negative from the end).

    Returns:
        The absolute indices and the largest of them.
    """
    if indices is None:
        indices = num_taps
    if isinstance(indices, int):
        if not 0 < indices <= num_taps:
            raise ValueError(f"indices: the last-n count must be in 1..{num_taps}, got {indices}")
        taken = list(range(num_taps - indices, num_taps))
    else:
        taken = []
        for i in indices:
            j = num_taps + i if i < 0 else i
            if not 0 <= j < num_taps:
                raise ValueError(f"indices: feature index {i} is out of range for {num_taps} taps")
            taken.append(j)
        if not taken:
            raise ValueError("indices: an empty list selects no feature")
    return taken, max(taken)


class Backbone(nn.Module):
    """Base class of the backbones: timm's model interface over a trunk of feature stages (see the module doc).

    Class attributes a family sets:
        first_conv: Path of the first convolution (timm's ``pretrained_cfg['first_conv']``).
        classifier_name: Path of the classifier (``pretrained_cfg['classifier']``).
        pool_name: Attribute of the global pool.
        flatten_sequential: The taps sit inside top-level ``nn.Sequential`` containers, so timm's
            ``FeatureListNet`` must flatten them (its ``flatten_sequential`` option).
    """

    first_conv: ClassVar[str] = "conv1"
    classifier_name: ClassVar[str] = "fc"
    pool_name: ClassVar[str] = "global_pool"
    flatten_sequential: ClassVar[bool] = False

    @classmethod
    def first_conv_for(cls, **options: Any) -> str:
        """The first convolution's path for a model built with ``options`` (a family may depend on them)."""
        return cls.first_conv

    # --------------------------------------------------------------------------------------------- building
    def _init_head(
        self, owner: str, num_features: int, num_classes: int, global_pool: str, drop_rate: float = 0.0
    ) -> None:
        """Sets ``num_features``/``num_classes``/``head_hidden_size`` and registers the global pool.

        The subclass registers the classifier right after, from :meth:`_new_classifier`.
        """
        pool = global_pool_layer(owner, global_pool, num_classes)
        self.num_features = num_features
        self.num_classes = num_classes
        self.head_hidden_size = num_features * pool.feat_mult()
        self.head_drop_rate = drop_rate
        self.grad_checkpointing = False
        setattr(self, self.pool_name, pool)

    def _new_classifier(self, num_classes: int) -> nn.Module:
        """A classifier for ``head_hidden_size`` inputs with the family's init (override to change the init)."""
        return classifier(self.head_hidden_size, num_classes)

    def _init_features(
        self, trunk: Sequence[str], taps: Sequence[dict[str, Any]], checkpointed: Sequence[str] = ()
    ) -> None:
        """Records the trunk and cuts it into feature stages.

        Args:
            trunk: Paths of the modules ``forward_features`` calls, in order (containers are called whole, so
                hooks on them fire).
            taps: ``dict(num_chs, reduction, module)`` per feature, in order; ``module`` is a trunk path or a
                path inside one (``forward_intermediates`` then runs that container child by child).
            checkpointed: Trunk containers whose children run under activation checkpointing when it is on
                (those with parameters and not in-place).
        """
        tap_names = [t["module"] for t in taps]

        def expand(paths: list[str]) -> list[str]:
            out: list[str] = []
            for p in paths:
                if any(t.startswith(p + ".") for t in tap_names):
                    out += expand([f"{p}.{n}" for n, _ in self.get_submodule(p).named_children()])
                else:
                    out.append(p)
            return out

        fine = expand(list(trunk))
        stages, start = [], 0
        for name in tap_names:
            if name not in fine[start:]:
                raise ValueError(f"{type(self).__name__}: feature tap '{name}' does not follow the previous one")
            end = fine.index(name, start) + 1
            stages.append(tuple(fine[start:end]))
            start = end
        if start < len(fine):  # modules after the last tap belong to the last stage
            stages[-1] = stages[-1] + tuple(fine[start:])
        self._trunk = tuple(trunk)
        self._stages = tuple(stages)
        self._checkpointed = frozenset(checkpointed)
        self.feature_info = [dict(tap, stage=i) for i, tap in enumerate(taps)]

    # ------------------------------------------------------------------------------------------------- head
    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> nn.Module | str:
        """The classifier module (or its path)."""
        return self.classifier_name if name_only else self.get_submodule(self.classifier_name)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replaces the classifier (``num_classes=0``: none, the head returns pooled features) and, when given,
        the global pool (``''``: none, only with ``num_classes=0``); on the model's device and dtype."""
        owner = type(self).__name__
        old_pool = getattr(self, self.pool_name)
        pool_type = old_pool.pool_type if global_pool is None else global_pool
        pool = global_pool_layer(owner, pool_type, num_classes)
        self.num_classes = num_classes
        self.head_hidden_size = self.num_features * pool.feat_mult()
        fc = self._new_classifier(num_classes)
        ref = next(self.parameters(), None)
        for new in (pool, fc):
            if ref is not None:
                new.to(device=ref.device, dtype=ref.dtype)
            new.train(self.training)
        setattr(self, self.pool_name, pool)
        self.set_submodule(self.classifier_name, fc)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Global pool, dropout, then the classifier (skipped with ``pre_logits=True``)."""
        x = getattr(self, self.pool_name)(x)
        if self.head_drop_rate > 0:
            x = F.dropout(x, p=self.head_drop_rate, training=self.training)
        return x if pre_logits else self.get_submodule(self.classifier_name)(x)

    # ------------------------------------------------------------------------------------------------ trunk
    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Runs the trunk after the stem under activation checkpointing (see the module doc)."""
        self.grad_checkpointing = enable

    def _run(self, path: str, x: Tensor) -> Tensor:
        module = self.get_submodule(path)
        top = path.split(".", 1)[0]
        if not (self.grad_checkpointing and top in self._checkpointed and torch.is_grad_enabled()):
            return module(x)
        parts = list(module.children()) if path == top and isinstance(module, nn.Sequential) else [module]
        for part in parts:  # a module alone with an in-place op would corrupt the input kept for recomputation
            worth = any(True for _ in part.parameters()) and getattr(part, "inplace", False) is not True
            x = checkpoint(part, x) if worth else part(x)
        return x

    def forward_features(self, x: Tensor) -> Tensor:
        """The trunk's output (unpooled, ``num_features`` channels at stride 32)."""
        for path in self._trunk:
            x = self._run(path, x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """The features at the taps (``feature_info``), as timm's ``forward_intermediates``.

        Args:
            x: Input images.
            indices: Taps to return: None = all, n = the last n, a list = those (negative from the end).
            norm: Accepted for timm's interface; these trunks have no separate final norm.
            stop_early: Stop after the last requested tap (the returned final features are then that tap's).
            output_fmt: ``'NCHW'`` only.
            intermediates_only: Return only the list of features.

        Returns:
            The features, or ``(final features, features)``.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"{type(self).__name__}.forward_intermediates: output_fmt must be 'NCHW'")
        taken, last = take_indices(len(self._stages), indices)
        out = []
        for i, stage in enumerate(self._stages):
            if i > last and (stop_early or intermediates_only):
                break
            for path in stage:
                x = self._run(path, x)
            if i in taken:
                out.append(x)
        return out if intermediates_only else (x, out)

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drops the trunk after the last requested tap (and the head), as timm's feature getter expects.

        Returns:
            The absolute tap indices.
        """
        taken, last = take_indices(len(self._stages), indices)
        for stage in self._stages[last + 1 :]:
            for path in stage:
                self.set_submodule(path, nn.Identity())
        cut = last < len(self._stages) - 1
        self._stages = self._stages[: last + 1]
        if cut:
            self.num_features = self.feature_info[last]["num_chs"]
        if prune_head or cut:
            self.reset_classifier(0, "")
        return taken
