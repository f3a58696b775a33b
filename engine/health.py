"""Is the training state fit to be checkpointed? Checked before every save, timed saves included.

A state is refused when

* any parameter, buffer, EMA weight or optimizer state tensor is NaN or infinite;
* a training loss since the previous save was not finite, or above :data:`LOSS_LIMIT` times the loss of
  a uniform guess (``ln(num_classes)``): the step diverged, even if the weights are still finite;
* the largest weight magnitude grew more than :data:`GROWTH_LIMIT` times since the previous save (or
  since the start of this process): the weights exploded.

A single diverged step can leave finite but huge weights (and a finite, huge loss) that a save would
otherwise keep as "the last good checkpoint". The checks are collective: every rank contributes, every
rank gets the same verdict.
"""

from __future__ import annotations

import math

import torch

from engine import distributed as du

LOSS_LIMIT = 100.0  # x ln(num_classes)
GROWTH_LIMIT = 10.0


def _tensors_of(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors_of(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors_of(v)


def first_non_finite(ctx) -> str | None:
    """The name of the first parameter, buffer, EMA or optimizer-state tensor holding NaN or inf, else None."""
    named = [(f"model {n}", t) for n, t in ctx.model.state_dict().items()]
    if ctx.ema is not None:
        named += [(f"EMA {n}", t) for n, t in ctx.ema.state_dict().items()]
    named += [("the optimizer state", t) for t in _tensors_of(ctx.optimizer.state)]
    named = [(name, t) for name, t in named if t.is_floating_point()]
    if not named:
        return None
    # One flag per tensor, gathered on the run's device and read back once (not one device sync per tensor).
    finite = torch.stack([torch.isfinite(t).all().to(ctx.device) for _, t in named])
    if bool(finite.all()):
        return None
    return named[int((~finite).nonzero()[0])][0]


@torch.no_grad()
def max_weight(model: torch.nn.Module) -> float:
    """The largest absolute value of any parameter (0 when there is none)."""
    peaks = [p.detach().abs().max() for p in model.parameters() if p.numel()]
    return float(torch.stack(peaks).max()) if peaks else 0.0


def check_state(ctx, num_classes: int, reference_max: float) -> tuple[str | None, float]:
    """Why the state must not be saved (one sentence), or None; and this rank's :func:`max_weight` (0.0 where a
    tensor is not finite), the ``reference_max`` of the next check once the state is saved; collective.

    ``reference_max`` is :func:`max_weight` at the previous save (or at the start of this process).
    """
    bad = first_non_finite(ctx)
    loss_peak = float(ctx.loss_peak) if ctx.loss_peak is not None else 0.0
    loss_bad = not math.isfinite(loss_peak)
    own_weight = max_weight(ctx.model) if bad is None else 0.0
    flags = torch.tensor(
        [float(bad is not None), float(loss_bad), 0.0 if loss_bad else loss_peak, own_weight], device=ctx.device
    )
    any_bad, any_loss_bad, loss_peak, weight = du.all_reduce_max(flags).tolist()
    limit = LOSS_LIMIT * math.log(max(num_classes, 2))
    problem = None
    if any_bad:
        problem = f"{bad or 'a tensor on another rank'} holds NaN or inf values"
    elif any_loss_bad:
        problem = "the training loss was NaN or infinite since the last checkpoint"
    elif loss_peak > limit:
        problem = (
            f"the training loss reached {loss_peak:.4g} since the last checkpoint (the limit is {LOSS_LIMIT:g} x "
            f"ln({num_classes}) = {limit:.4g}, the loss of a uniform guess): a step diverged"
        )
    elif reference_max > 0 and weight > GROWTH_LIMIT * reference_max:
        problem = (
            f"the largest weight grew from {reference_max:.4g} to {weight:.4g} ({weight / reference_max:.0f}x, the "
            f"limit is {GROWTH_LIMIT:g}x) since the last checkpoint: the weights exploded"
        )
    return problem, own_weight
