"""Shared sharding and seeding rules: every backend draws the same images for the same (seed, epoch, rank).

Training: the order of an epoch is a permutation of all ``n`` samples drawn from ``(seed, epoch)``, the
same on every rank. Rank ``r`` of ``W`` takes positions ``r, r + W, r + 2W, ...`` of it, and step ``s``
of rank ``r`` is the ``s``-th block of ``B`` of those. So at step ``s`` the ``W`` ranks together read
positions ``[s*W*B, (s+1)*W*B)`` of the permutation: world size 2 with batch B sees the same global
batches as world size 1 with batch 2B. The ragged end is dropped; every rank has the same number of
steps, :func:`train_steps`.

Validation: rank ``r`` takes samples ``r, r + W, ...`` of the sorted file list: every image exactly
once over all ranks, no padding (ranks may differ by one image).

Randomness (augmentation) is a pure function of ``(seed, epoch, sample index)`` via :func:`mix_seed`,
so it does not depend on the number of workers, on the world size or on where an epoch was resumed.
"""

from __future__ import annotations

import numpy as np

_MASK64 = (1 << 64) - 1
_PERMUTATION_TAG = 0x5EED_0001
_AUGMENT_TAG = 0x5EED_0002
_DALI_TAG = 0x5EED_0003


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(*values: int) -> int:
    """Hashes integers into one 63-bit seed (splitmix64 chain); stable across Python/numpy/torch versions."""
    h = 0x243F6A8885A308D3
    for v in values:
        h = _splitmix64(h ^ (int(v) & _MASK64))
    return h >> 1


def augment_seed(seed: int, epoch: int, index: int) -> int:
    """Seed of the augmentation of sample ``index`` in ``epoch``."""
    return mix_seed(_AUGMENT_TAG, seed, epoch, index)


def dali_seed(seed: int, rank: int, epoch: int) -> int:
    """Seed of a DALI pipeline: from the global rank (never the local one) and the epoch; fits in 31 bits."""
    return mix_seed(_DALI_TAG, seed, rank, epoch) & 0x7FFFFFFF


def _splitmix64_array(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of all ``n`` training samples in ``epoch`` (identical on every rank).

    Sorting a hash of ``(seed, epoch, index)`` rather than calling a library shuffle keeps the order
    the same across numpy versions, so a run resumed after an upgrade still sees the same data order.
    """
    base = np.uint64(mix_seed(_PERMUTATION_TAG, seed, epoch))
    with np.errstate(over="ignore"):
        keys = _splitmix64_array(np.arange(n, dtype=np.uint64) ^ base)
    return np.argsort(keys, kind="stable")


def train_steps(n: int, world_size: int, batch_size: int, cap: int | None = None, accum_steps: int = 1) -> int:
    """Training steps (batches) per epoch per rank: the one place this number is computed.

    ``n // (world_size * batch_size)``, at most ``cap``, rounded down to a multiple of ``accum_steps`` so
    that an epoch ends on an optimizer step (no accumulated gradient leaks into the next epoch).
    """
    steps = n // (world_size * batch_size)
    if cap is not None:
        steps = min(steps, cap)
    return steps - steps % accum_steps


def train_shard(
    n: int, seed: int, epoch: int, rank: int, world_size: int, batch_size: int, steps: int | None = None
) -> np.ndarray:
    """Sample indices of rank ``rank`` for ``epoch``, shaped ``(steps, batch_size)``.

    Args:
        n: training set size.
        seed: run seed.
        epoch: epoch number (0-based).
        rank: global rank.
        world_size: number of ranks.
        batch_size: per-rank batch.
        steps: steps to return (default and maximum: ``n // (world_size * batch_size)``).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    full = n // (world_size * batch_size)
    steps = full if steps is None else min(steps, full)
    perm = epoch_permutation(n, seed, epoch)[: steps * world_size * batch_size]
    return perm[rank::world_size].reshape(steps, batch_size)


def val_shard(n: int, rank: int, world_size: int) -> np.ndarray:
    """Indices of the validation samples of ``rank``: ``rank, rank + W, ...`` (no padding)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    return np.arange(rank, n, world_size, dtype=np.int64)


def split_batches(indices: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Cuts a 1-D index array into batches of ``batch_size``; the last one may be smaller."""
    return [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
