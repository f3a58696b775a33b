"""The ``torch`` backend: batches, sharding, reshuffling, bitwise resume, worker independence, corrupt files."""

from __future__ import annotations

import logging

import pytest
import torch

import data
from engine.config import Config
from tests.conftest import collect, data_config
from tests.image_folders import corrupt_file, make_image_folder


def make_cfg(root, backend="torch", batch_size=2, workers=0, **data_kw) -> Config:
    return data_config(root, backend, batch_size=batch_size, workers=workers, **data_kw)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    # 3 classes; 5 + 4 + 4 = 13 training images, 3 + 2 + 2 = 7 validation images (odd counts on purpose).
    return make_image_folder(tmp_path_factory.mktemp("ds"), train_per_class=[5, 4, 4], val_per_class=[3, 2, 2])


def image_keys(images: torch.Tensor) -> list[bytes]:
    """One key per image (its exact bytes), to compare batches as sets."""
    return [img.contiguous().numpy().tobytes() for img in images]


def loaders(cfg, **kw):
    return data.build_loaders(cfg, **kw)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_batches_shapes_dtypes_ranges(dataset, fmt):
    cfg = make_cfg(dataset, eval_batch_size=3, interpolation="bicubic")
    lo = (0 - max(cfg.data.mean)) / min(cfg.data.std)
    hi = (1 - min(cfg.data.mean)) / min(cfg.data.std)
    with loaders(cfg, memory_format=fmt) as ld:
        assert ld.steps_per_epoch == 13 // 2 and len(ld.train) == 6
        batches = collect(ld.train.epoch(0))
        assert len(batches) == 6
        for x, y in batches:
            assert x.shape == (2, 3, 16, 16) and x.dtype == torch.float32 and x.device.type == "cpu"
            assert x.is_contiguous(memory_format=fmt)
            assert y.dtype == torch.int64 and y.shape == (2,) and set(y.tolist()) <= {0, 1, 2}
            assert lo - 1e-5 <= x.min() and x.max() <= hi + 1e-5
        assert max(x.max() for x, _ in batches) > 1.0 and min(x.min() for x, _ in batches) < -1.0  # not all zeros
        val = collect(ld.val)
        assert [len(y) for _, y in val] == [3, 3, 1] and len(ld.val) == 3
        assert ld.val.num_samples == ld.val.total_samples == 7
        assert all(x.is_contiguous(memory_format=fmt) for x, _ in val)
        assert sorted(torch.cat([y for _, y in val]).tolist()) == [0, 0, 0, 1, 1, 2, 2]


def test_epoch_order_reshuffles_and_repeats(dataset):
    with loaders(make_cfg(dataset)) as a, loaders(make_cfg(dataset)) as b:
        e0 = collect(a.train.epoch(0))
        e0_again = collect(b.train.epoch(0))
        e1 = collect(a.train.epoch(1))
    assert all(torch.equal(x, x2) and torch.equal(y, y2) for (x, y), (x2, y2) in zip(e0, e0_again))
    assert not all(torch.equal(x, x1) for (x, _), (x1, _) in zip(e0, e1))
    with loaders(make_cfg(dataset)) as c:
        c.train.seed = 4  # another seed, another order
        assert not all(torch.equal(x, x1) for (x, _), (x1, _) in zip(e0, collect(c.train.epoch(0))))


def test_resume_mid_epoch_is_bitwise_identical(dataset):
    with loaders(make_cfg(dataset)) as ld:
        full = collect(ld.train.epoch(2))
        tail = collect(ld.train.epoch(2, start_step=4))
        assert collect(ld.train.epoch(2, start_step=ld.steps_per_epoch)) == []
        with pytest.raises(ValueError):
            next(ld.train.epoch(2, start_step=ld.steps_per_epoch + 1))
    assert len(tail) == len(full) - 4
    for (x, y), (xt, yt) in zip(full[4:], tail):
        assert torch.equal(x, xt) and torch.equal(y, yt)


def test_worker_count_does_not_change_batches(dataset):
    with loaders(make_cfg(dataset, workers=0)) as a:
        ref = collect(a.train.epoch(1)) + collect(a.val)
    with loaders(make_cfg(dataset, workers=2)) as b:
        got = collect(b.train.epoch(1)) + collect(b.val)
        # A second pass over persistent workers, after an interrupted one, is still right.
        it = b.train.epoch(1)
        next(it)
        it.close()
        again = collect(b.train.epoch(1, start_step=1))
    assert len(ref) == len(got)
    assert all(torch.equal(x, x2) and torch.equal(y, y2) for (x, y), (x2, y2) in zip(ref, got))
    assert all(torch.equal(x, x2) for (x, _), (x2, _) in zip(ref[1:], again))


def test_train_sharding_world2_matches_world1_double_batch(dataset):
    cfg1 = make_cfg(dataset, batch_size=4)
    with (
        loaders(cfg1) as single,
        loaders(make_cfg(dataset), rank=0, world_size=2) as r0,
        loaders(make_cfg(dataset), rank=1, world_size=2) as r1,
    ):
        assert single.steps_per_epoch == r0.steps_per_epoch == r1.steps_per_epoch == 13 // 4
        for epoch in (0, 1):
            s_batches, b0, b1 = (
                collect(single.train.epoch(epoch)),
                collect(r0.train.epoch(epoch)),
                collect(r1.train.epoch(epoch)),
            )
            seen: list[bytes] = []
            for (xs, _), (x0, _), (x1, _) in zip(s_batches, b0, b1):
                keys = image_keys(torch.cat([x0, x1]))
                assert sorted(keys) == sorted(image_keys(xs))  # same global batch, same augmented pixels
                seen += keys
            assert len(set(seen)) == len(seen)  # no image twice in an epoch


def test_validation_every_image_once_across_ranks(dataset):
    with loaders(make_cfg(dataset, eval_batch_size=2), build_train=False) as one:
        reference = sorted(image_keys(torch.cat([x for x, _ in one.val])))
    keys, counts = [], []
    for rank in range(3):
        with loaders(make_cfg(dataset, eval_batch_size=2), rank=rank, world_size=3, build_train=False) as ld:
            assert ld.train is None and ld.val.total_samples == 7
            batches = collect(ld.val)
            counts.append(ld.val.num_samples)
            assert sum(len(y) for _, y in batches) == ld.val.num_samples
            keys += image_keys(torch.cat([x for x, _ in batches]))
    assert counts == [3, 2, 2]
    assert sorted(keys) == reference and len(set(keys)) == 7


def test_steps_per_epoch_cap(dataset):
    cfg = make_cfg(dataset)
    cfg.train.steps_per_epoch = 2
    with loaders(cfg) as ld:
        assert ld.steps_per_epoch == 2 and len(collect(ld.train.epoch(0))) == 2


def test_corrupt_files_are_skipped_counted_and_logged_once(tmp_path, caplog):
    root = make_image_folder(tmp_path, train_per_class=[5, 4, 4], val_per_class=[3, 2, 2])
    bad_train = corrupt_file(root / "train" / "dog" / "dog_1.JPEG", "garbage")
    truncated = corrupt_file(root / "train" / "owl" / "owl_2.JPEG", "truncate")
    bad_val = corrupt_file(root / "val" / "cat" / "cat_1.JPEG", "garbage")
    (root / "train" / "cat" / "cat_3.JPEG").write_text("plain text named like a JPEG")
    cfg = make_cfg(root, batch_size=13, eval_batch_size=4)  # one step = the whole training set
    caplog.set_level(logging.WARNING, logger="data")
    with loaders(cfg) as ld:
        for epoch in range(2):
            ((x, _),) = collect(ld.train.epoch(epoch))
            assert x.shape == (13, 3, 16, 16) and torch.isfinite(x).all()
        assert ld.train.skipped_files == 3
        assert sorted(ld.train.skipped_file_names) == sorted(
            [str(bad_train), str(truncated), str(root / "train" / "cat" / "cat_3.JPEG")]
        )
        val = collect(ld.val)
        assert sum(len(y) for _, y in val) == 6 and ld.val.last_pass_skipped == 1 and ld.val.skipped_files == 1
        assert all(len(y) > 0 for _, y in val)
    messages = [r.getMessage() for r in caplog.records]
    for path in (bad_train, truncated, bad_val):
        assert sum(str(path) in m for m in messages) == 1, messages  # once per file, not once per epoch


def test_corrupt_files_with_workers_keep_batches_deterministic(tmp_path):
    root = make_image_folder(tmp_path, train_per_class=[5, 4, 4], val_per_class=1)
    corrupt_file(root / "train" / "dog" / "dog_0.JPEG")
    with loaders(make_cfg(root, workers=0)) as a, loaders(make_cfg(root, workers=2)) as b:
        ref, got = collect(a.train.epoch(0)), collect(b.train.epoch(0))
        assert b.train.skipped_files == 1
    assert all(torch.equal(x, x2) and torch.equal(y, y2) for (x, y), (x2, y2) in zip(ref, got))


def test_all_files_unreadable_fails_loudly(tmp_path):
    root = make_image_folder(tmp_path, classes=("a",), train_per_class=2, val_per_class=1)
    for path in (root / "train" / "a").iterdir():
        corrupt_file(path)
    with loaders(make_cfg(root, batch_size=1)) as ld, pytest.raises(data.DataLoadError, match="check_dataset"):
        collect(ld.train.epoch(0))
