"""Weights-only initialisation of a new run from a checkpoint (``train.init_from``).

A run started this way takes the model weights (parameters and buffers, e.g. BN/AN running statistics) of a
checkpoint of this framework -- one written by train.py, or an official release converted with
``tools/convert_checkpoint.py`` -- and nothing else: the optimizer, the LR schedule, the epoch counter, the
EMA and the RNG state start fresh, as for a new run. Use ``--resume`` / auto-resume to continue a run instead.

The file is read with ``torch.load(weights_only=True)`` and the keys must match the model exactly (no
partial loading), so a checkpoint of another model, norm or number of classes stops the run with an error
naming the file and both models.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from engine import checkpoint as ck

__all__ = ["load_init_weights"]


def _source_model(ckpt: dict[str, Any]) -> str:
    model = (ckpt.get("config") or {}).get("model") or {}
    if not model.get("name"):
        return "an unknown model (the checkpoint stores no config)"
    return f"{model['name']} (norm {model.get('norm')}, {model.get('num_classes')} classes)"


def load_init_weights(model: nn.Module, path: str | os.PathLike) -> dict[str, Any]:
    """Loads the ``model`` weights of the checkpoint at ``path`` into ``model`` (strict), and nothing else.

    Call it on the bare model (not wrapped in DDP or torch.compile) before the optimizer and the EMA are made.

    Args:
        model: The freshly built model of the new run.
        path: A checkpoint of this framework (``{"model": state_dict, "config": ...}``).

    Returns:
        A report for the log: ``path``, ``tensors`` loaded, ``source_model`` (from the checkpoint's config),
        ``epoch`` and ``official`` (the provenance of a converted release, or None), and ``ignored``: the
        checkpoint entries that were not used (optimizer, schedule position, EMA, ...).

    Raises:
        engine.checkpoint.CheckpointError: A missing, truncated or unsafe file, or weights that do not fit.
    """
    path = Path(path)
    ckpt = ck.load_checkpoint(path, map_location="cpu")
    state = ckpt["model"]
    mismatch = ck.state_mismatch(model, state)
    if mismatch:
        raise ck.CheckpointError(
            f"train.init_from={path} holds weights of {_source_model(ckpt)} that do not fit the model of this run: "
            f"{mismatch}. Set model.name / model.norm / model options to the checkpoint's model (its "
            f"stored config says which), or pick a checkpoint of this model."
        )
    model.load_state_dict(state, strict=True)
    return {
        "path": str(path),
        "tensors": len(state),
        "source_model": _source_model(ckpt),
        "epoch": ckpt.get("epoch"),
        "official": ckpt.get("official"),
        "ignored": sorted(k for k in ckpt if k != "model" and ckpt[k] is not None),
    }
