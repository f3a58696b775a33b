"""The DALI backends on the CPU (``dali_cpu``): batches, sharding, exact validation, agreement with torch, errors."""

from __future__ import annotations

import sys

import pytest
import torch

import data
from engine.config import Config
from tests.conftest import collect, data_config
from tests.image_folders import corrupt_file, make_image_folder

pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed")


def make_cfg(root, backend="dali_cpu", batch_size=2, **data_kw) -> Config:
    return data_config(root, backend, batch_size=batch_size, workers=1, **data_kw)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_batches_shapes_dtypes_ranges(jpeg_dataset, fmt):
    cfg = make_cfg(jpeg_dataset, eval_batch_size=3)
    lo = (0 - max(cfg.data.mean)) / min(cfg.data.std)
    hi = (1 - min(cfg.data.mean)) / min(cfg.data.std)
    with data.build_loaders(cfg, memory_format=fmt) as ld:
        batches = collect(ld.train.epoch(0))
        assert len(batches) == ld.steps_per_epoch == 6
        for x, y in batches:
            assert x.shape == (2, 3, 16, 16) and x.dtype == torch.float32 and x.is_contiguous(memory_format=fmt)
            assert y.dtype == torch.int64 and y.shape == (2,)
            assert lo - 1e-5 <= x.min() and x.max() <= hi + 1e-5
        val = collect(ld.val)
        assert [len(y) for _, y in val] == [3, 3, 1]  # partial last batch, the padding cut off
        assert all(x.is_contiguous(memory_format=fmt) for x, _ in val)
        assert sorted(torch.cat([y for _, y in val]).tolist()) == [0, 0, 0, 1, 1, 2, 2]


def test_same_shards_as_the_torch_backend(jpeg_dataset):
    """Both backends read the same samples at every step (labels here; pixels differ by augmentation)."""
    for rank in range(2):
        with (
            data.build_loaders(make_cfg(jpeg_dataset, "torch"), rank=rank, world_size=2) as t,
            data.build_loaders(make_cfg(jpeg_dataset), rank=rank, world_size=2) as d,
        ):
            assert t.steps_per_epoch == d.steps_per_epoch
            for epoch in (0, 1):
                assert torch.equal(
                    torch.cat([y for _, y in t.train.epoch(epoch)]), torch.cat([y for _, y in d.train.epoch(epoch)])
                )
                assert (d.train.batch_indices(epoch) == t.train.batch_indices(epoch)).all()
            resumed = torch.cat([y for _, y in d.train.epoch(1, start_step=2)])
            assert torch.equal(resumed, torch.cat([y for _, y in t.train.epoch(1)])[2 * 2 :])


def test_validation_every_image_once_across_ranks(jpeg_dataset):
    labels, counts = [], []
    for rank in range(2):
        with data.build_loaders(
            make_cfg(jpeg_dataset, eval_batch_size=2), rank=rank, world_size=2, build_train=False
        ) as ld:
            for _ in range(2):  # a second pass starts again at the first image
                batches = collect(ld.val)
                assert sum(len(y) for _, y in batches) == ld.val.num_samples
            counts.append(ld.val.num_samples)
            labels += torch.cat([y for _, y in batches]).tolist()
    assert counts == [4, 3] and sorted(labels) == [0, 0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("img_size,crop_pct", [(16, 0.875), (40, 1.0), (56, 0.875)])
def test_eval_images_match_the_torch_backend(jpeg_dataset, interpolation, img_size, crop_pct):
    out = {}
    for backend in ("torch", "dali_cpu"):
        cfg = make_cfg(jpeg_dataset, backend, img_size=img_size, crop_pct=crop_pct, interpolation=interpolation)
        with data.build_loaders(cfg, build_train=False) as ld:
            out[backend] = collect(ld.val)
    x_torch = torch.cat([x for x, _ in out["torch"]])
    x_dali = torch.cat([x for x, _ in out["dali_cpu"]])
    assert torch.equal(torch.cat([y for _, y in out["torch"]]), torch.cat([y for _, y in out["dali_cpu"]]))
    diff = (x_torch - x_dali).abs()
    grey_level = 1 / (255 * min(make_cfg(jpeg_dataset).data.std))  # one uint8 step in normalized units
    # Same decode (libjpeg-turbo), same crop window, same output sizes; resampling kernels differ slightly.
    assert diff.mean() < 0.25 * grey_level, diff.mean()
    assert diff.max() <= 2 * grey_level + 1e-6, diff.max()


def test_normalization_inside_the_pipeline_matches(jpeg_dataset):
    """The GPU path normalizes with crop_mirror_normalize; run that graph on the CPU against the uint8 path."""
    from data.base import make_normalizer
    from data.dali import DaliOutput, DaliTrainLoader, DaliValLoader
    from data.folder import scan_split

    cfg = make_cfg(jpeg_dataset)
    cpu = torch.device("cpu")
    for fmt in (torch.contiguous_format, torch.channels_last):
        norm = make_normalizer(cfg.data, cpu, fmt)
        inside, after = DaliOutput(False, None, norm, True), DaliOutput(False, None, norm, False)
        files = scan_split(jpeg_dataset, "val").files
        kw = {"rank": 0, "world_size": 1}
        a = collect(DaliValLoader(files, cfg.data, output=inside, **kw))
        b = collect(DaliValLoader(files, cfg.data, output=after, **kw))
        for (xa, ya), (xb, yb) in zip(a, b):
            assert xa.is_contiguous(memory_format=fmt) and torch.equal(ya, yb)
            torch.testing.assert_close(xa, xb, atol=1e-5, rtol=0)
        files = scan_split(jpeg_dataset, "train").files
        kw["seed"], kw["steps"] = 0, 2
        t1 = collect(DaliTrainLoader(files, cfg.data, output=inside, **kw).epoch(0))
        t2 = collect(DaliTrainLoader(files, cfg.data, output=after, **kw).epoch(0))
        for (xa, _), (xb, _) in zip(t1, t2):
            torch.testing.assert_close(xa, xb, atol=1e-5, rtol=0)


def test_epochs_differ_and_augmentation_is_seeded(jpeg_dataset):
    with data.build_loaders(make_cfg(jpeg_dataset)) as a, data.build_loaders(make_cfg(jpeg_dataset)) as b:
        e0, e0b, e1 = collect(a.train.epoch(0)), collect(b.train.epoch(0)), collect(a.train.epoch(1))
    assert all(torch.equal(x, x2) for (x, _), (x2, _) in zip(e0, e0b))  # same (seed, rank, epoch)
    assert not all(torch.equal(x, x1) for (x, _), (x1, _) in zip(e0, e1))


def test_corrupt_file_names_the_file(tmp_path):
    root = make_image_folder(tmp_path, train_per_class=2, val_per_class=[2, 1, 1])
    bad = corrupt_file(root / "val" / "cat" / "cat_1.JPEG")
    with (
        data.build_loaders(make_cfg(root, eval_batch_size=2), build_train=False) as ld,
        pytest.raises(data.DataLoadError) as info,
    ):
        collect(ld.val)
    message = str(info.value)
    assert str(bad) in message and "tools/check_dataset.py" in message and str(root) in message


def test_dali_gpu_backend_needs_cuda(jpeg_dataset):
    with pytest.raises(ValueError, match="dali_cpu"):
        data.build_loaders(make_cfg(jpeg_dataset, "dali"), device="cpu")


def test_missing_dali_gives_install_hint(jpeg_dataset, monkeypatch):
    for name in [m for m in sys.modules if m == "nvidia.dali" or m.startswith("nvidia.dali.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # makes `import nvidia.dali...` fail
    with pytest.raises(ImportError) as info:
        data.build_loaders(make_cfg(jpeg_dataset))
    assert "pip install nvidia-dali-cuda130" in str(info.value) and "data.backend=torch" in str(info.value)


# ---------------------------------------------------------------------------------------------- one pipeline per run
def solid_color_folder(root, n: int = 24, classes: int = 2):
    """``n`` 32x32 JPEGs of one flat color each, encoding the file number (i -> red 8 * i): with a full-image crop
    and no flip, every training image's mean red identifies its file."""
    from PIL import Image

    for split in ("train", "val"):
        for i in range(n):
            folder = root / split / f"c{i % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (32, 32), (8 * i + 4, 128, 64)).save(folder / f"img_{i:03d}.JPEG", quality=95)
    return root


def file_ids(batches, cfg) -> list[list[int]]:
    """Which file each image of each batch came from (its red channel's mean), from normalized batches."""
    mean, std = cfg.data.mean[0], cfg.data.std[0]
    return [[round(((x[i, 0].mean().item() * std + mean) * 255 - 4) / 8) for i in range(len(x))] for x, _ in batches]


@pytest.fixture(scope="module")
def colors(tmp_path_factory):
    return solid_color_folder(tmp_path_factory.mktemp("colors"))


def color_cfg(root, batch_size=3, **kw):
    return make_cfg(root, batch_size=batch_size, scale=[1.0, 1.0], ratio=[1.0, 1.0], hflip=0.0, **kw)


def test_one_pipeline_per_split_for_the_whole_run(colors, monkeypatch):
    """Epochs, an epoch left unfinished, a mid-epoch resume and validation passes: one pipeline build per split;
    every epoch decodes exactly its planned files in order, also after an unfinished one (no leaked batch)."""
    import data.dali as dali_mod

    builds = []
    real = dali_mod.build_pipeline
    monkeypatch.setattr(dali_mod, "build_pipeline", lambda *a, **k: builds.append(k["train"]) or real(*a, **k))
    files = [p.name for p in sorted((colors / "train").glob("*/*.JPEG"))]  # the file table's order
    cfg = color_cfg(colors, eval_batch_size=5)
    with data.build_loaders(cfg) as ld:
        assert sorted(builds) == [False, True]
        train = ld.train
        for epoch in range(3):
            expect = [[int(files[i][4:7]) for i in row] for row in train.batch_indices(epoch)]
            got = file_ids(collect(train.epoch(epoch)), cfg)
            assert got == expect, f"epoch {epoch}"
            it = train.epoch(epoch + 10)  # left after one batch (a step cap, preemption) ...
            next(it)
            it.close()
        resumed = file_ids(collect(train.epoch(1, start_step=2)), cfg)
        assert resumed == file_ids(collect(train.epoch(1)), cfg)[2:]
        val = [collect(ld.val) for _ in range(3)]
        assert [len(y) for _, y in val[0]] == [5] * 4 + [4] and all(
            torch.equal(a[0], b[0]) for a, b in zip(val[0], val[2])
        )
        assert train.pipeline_builds == ld.val.pipeline_builds == 1
    assert sorted(builds) == [False, True]


def test_two_ranks_read_disjoint_shards_every_epoch(colors):
    """Two ranks (two loaders with rank 0 and 1 of 2): each epoch they decode disjoint sets of files, together the
    epoch's first steps * 2 * batch files of the shared permutation, and the order changes between epochs."""
    cfg = color_cfg(colors, batch_size=2)
    seen = {}
    for rank in range(2):
        with data.build_loaders(cfg, rank=rank, world_size=2) as ld:
            for epoch in range(2):
                seen[rank, epoch] = file_ids(collect(ld.train.epoch(epoch)), cfg)
                names = [p.name for p in sorted((colors / "train").glob("*/*.JPEG"))]
                expect = [[int(names[i][4:7]) for i in row] for row in ld.train.batch_indices(epoch)]
                assert seen[rank, epoch] == expect
            steps = ld.steps_per_epoch
    for epoch in range(2):
        a, b = ([i for row in seen[r, epoch] for i in row] for r in range(2))
        assert not set(a) & set(b) and len(set(a) | set(b)) == steps * 2 * 2
    assert seen[0, 0] != seen[0, 1]


def test_truncated_jpeg_in_the_train_set_is_a_python_exception(tmp_path):
    root = make_image_folder(tmp_path, train_per_class=[3, 3, 2], val_per_class=[2, 1, 1], size=(64, 48))
    bad = corrupt_file(sorted((root / "train").glob("*/*.JPEG"))[4], "truncate")
    with data.build_loaders(make_cfg(root)) as ld:
        with pytest.raises(data.DataLoadError) as info:
            for epoch in range(2):
                collect(ld.train.epoch(epoch))
        assert str(bad) in str(info.value) and "truncated" in str(info.value)
        bad.unlink()  # the broken pipeline is rebuilt on the next use; the list still names the file, so it fails
        with pytest.raises(data.DataLoadError):
            collect(ld.train.epoch(0))
        assert ld.train.pipeline_builds == 2


def test_preallocation_fits_the_budget_and_the_batch():
    from data.dali import preallocation

    d = Config().data
    full = preallocation(d, 256)
    assert full["images"] == 231  # ceil(0.9 * 256): the hardware decoder's share of the batch
    assert full["bytes"] <= d.dali_preallocate_mib * 2**20 < 6000 * 6000 * 3 * 231
    assert abs(full["width"] / full["height"] - 1.0) < 0.01  # the hints' aspect is kept
    small = preallocation(d, 8)  # a small batch fits at the hinted size
    assert (small["width"], small["height"], small["images"]) == (6000, 6000, 8)
    d.dali_preallocate = False
    assert preallocation(d, 256)["bytes"] == 0
