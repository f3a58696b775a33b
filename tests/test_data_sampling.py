"""Shared sharding/seeding rules (data.sampling) and the PIL transforms (data.transforms)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from data import sampling as S
from data.transforms import (
    Normalizer,
    eval_resize_size,
    eval_transform,
    random_resized_crop_box,
    round_half_up,
    train_transform,
)


def test_seeds_are_pinned():
    # Seeds feed checkpointed runs: a change here silently changes every resumed run's data order.
    assert S.mix_seed(1, 2, 3) == 7405809139744024400
    assert S.augment_seed(0, 0, 0) == 2697430770670778904
    assert S.epoch_permutation(10, 0, 0).tolist() == [2, 5, 9, 1, 8, 6, 3, 7, 0, 4]
    assert 0 <= S.dali_seed(123, 7, 99) < 2**31


def test_epoch_permutation_reshuffles_and_repeats():
    a0, a0_again, a1 = (S.epoch_permutation(1000, 5, e) for e in (0, 0, 1))
    assert np.array_equal(a0, a0_again)
    assert not np.array_equal(a0, a1)
    assert sorted(a1.tolist()) == list(range(1000))
    assert not np.array_equal(a0, S.epoch_permutation(1000, 6, 0))  # the seed matters


@pytest.mark.parametrize("n,world,batch", [(103, 2, 4), (100, 4, 5), (37, 3, 2), (10, 1, 3)])
def test_train_shard_covers_each_sample_at_most_once(n, world, batch):
    shards = [S.train_shard(n, 0, 3, r, world, batch) for r in range(world)]
    steps = n // (world * batch)
    assert all(s.shape == (steps, batch) for s in shards)
    flat = np.concatenate([s.ravel() for s in shards])
    assert len(set(flat.tolist())) == len(flat) == steps * world * batch


def test_train_shard_world2_equals_world1_with_double_batch():
    n, b = 101, 4
    single = S.train_shard(n, 7, 2, 0, 1, 2 * b)
    r0, r1 = S.train_shard(n, 7, 2, 0, 2, b), S.train_shard(n, 7, 2, 1, 2, b)
    assert len(single) == len(r0) == len(r1) == n // (2 * b)
    for step in range(len(single)):
        assert sorted(np.concatenate([r0[step], r1[step]]).tolist()) == sorted(single[step].tolist())


def test_train_shard_steps_cap_and_bad_rank():
    assert S.train_shard(100, 0, 0, 0, 2, 5, steps=3).shape == (3, 5)
    assert S.train_steps(100, 2, 5) == 10 and S.train_steps(100, 2, 5, cap=3) == 3
    with pytest.raises(ValueError):
        S.train_shard(100, 0, 0, 2, 2, 5)


@pytest.mark.parametrize("n,world", [(11, 2), (7, 3), (2, 4), (50, 1)])
def test_val_shard_every_sample_once_without_padding(n, world):
    shards = [S.val_shard(n, r, world) for r in range(world)]
    flat = np.concatenate(shards)
    assert sorted(flat.tolist()) == list(range(n))
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    batches = S.split_batches(shards[0], 3)
    assert sum(len(b) for b in batches) == len(shards[0]) and all(len(b) <= 3 for b in batches)


def test_random_resized_crop_box_bounds_and_fallback():
    rng = random.Random(0)
    for _ in range(500):
        w, h = rng.randint(1, 80), rng.randint(1, 80)
        left, top, cw, ch = random_resized_crop_box(rng, w, h, (0.08, 1.0), (3 / 4, 4 / 3))
        assert left >= 0 and top >= 0 and cw > 0 and ch > 0 and left + cw <= w and top + ch <= h
    # An extremely wide image cannot host a 3/4..4/3 crop of >= 90% area: centered fallback, ratio clamped.
    left, top, cw, ch = random_resized_crop_box(random.Random(1), 400, 10, (0.9, 1.0), (3 / 4, 4 / 3))
    assert (ch, cw) == (10, 13) and left == (400 - 13) // 2 and top == 0


def test_eval_transform_geometry():
    assert eval_resize_size(224, 0.875) == 256 and round_half_up(2.5) == 3 and round_half_up(1.5) == 2
    # Column index in the red channel, row index in green: the output shows which pixels were kept.
    arr = np.zeros((40, 49, 3), np.uint8)
    arr[:, :, 0] = np.arange(49)[None, :]
    arr[:, :, 1] = np.arange(40)[:, None]
    out = eval_transform(Image.fromarray(arr), 32, 1.0, "bilinear")  # short side 40 -> 32: a real resize
    assert out.shape == (32, 32, 3)
    out = eval_transform(Image.fromarray(arr), 32, 32 / 40, "bilinear")  # short side stays 40: crop only
    assert out[0, 0, 0] == 9 and out[0, 0, 1] == 4  # offsets round((49-32)/2)=9 (half up), (40-32)/2=4


def test_train_transform_is_a_function_of_the_seed():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    a = train_transform(img, random.Random(5), 16, (0.08, 1), (0.75, 4 / 3), 0.5, "bicubic")
    b = train_transform(img, random.Random(5), 16, (0.08, 1), (0.75, 4 / 3), 0.5, "bicubic")
    c = train_transform(img, random.Random(6), 16, (0.08, 1), (0.75, 4 / 3), 0.5, "bicubic")
    assert a.shape == (16, 16, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    # hflip=1 with the full image as the crop is a pure mirror of the resized image.
    full = train_transform(img, random.Random(0), 16, (1.0, 1.0), (4 / 3, 4 / 3), 0.0, "bilinear")
    flipped = train_transform(img, random.Random(0), 16, (1.0, 1.0), (4 / 3, 4 / 3), 1.0, "bilinear")
    assert np.array_equal(full[:, ::-1], flipped)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_normalizer_values_and_memory_format(fmt):
    norm = Normalizer([0.5, 0.25, 0.0], [0.5, 0.25, 1.0], torch.device("cpu"), fmt)
    images = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 4, 5, 3).contiguous()
    x, y = norm(images, torch.tensor([1, 2], dtype=torch.int32))
    assert x.shape == (2, 3, 4, 5) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.is_contiguous(memory_format=fmt)
    expected_black = torch.tensor([-1.0, -1.0, 0.0])
    expected_white = torch.tensor([1.0, 3.0, 1.0])
    torch.testing.assert_close(x[0, :, 0, 0], expected_black)
    torch.testing.assert_close(x[1, :, 2, 3], expected_white)
