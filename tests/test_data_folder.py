"""Dataset scanning and the errors for bad input layouts (data.folder, via data.build_loaders)."""

from __future__ import annotations

import shutil

import pytest

import data
from data.folder import FileTable, scan_dataset, scan_split
from engine.config import Config
from tests.conftest import data_config
from tests.image_folders import make_image_folder


def make_cfg(root, backend="torch", **data_kw) -> Config:
    return data_config(root, backend, **data_kw)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("ds"), train_per_class=3, val_per_class=2)


def expect_error(cfg, *fragments):
    with pytest.raises(data.DatasetError) as info:
        data.build_loaders(cfg)
    message = str(info.value)
    assert "Expected layout" in message and "train/" in message
    for fragment in fragments:
        assert str(fragment) in message
    return message


def test_scan_sorted_classes_labels_and_extensions(tmp_path):
    root = make_image_folder(tmp_path, classes=("b", "a", "c"), train_per_class=2, val_per_class=1, ext=".jpg")
    (root / "train" / "a" / "extra.PNG").write_bytes((root / "train" / "a" / "a_0.jpg").read_bytes())
    (root / "train" / "a" / "notes.txt").write_text("not an image")
    (root / "train" / "a" / ".hidden.jpg").write_text("hidden")
    (root / "train" / ".cache").mkdir()
    index = scan_split(root, "train")
    assert index.classes == ["a", "b", "c"]
    names = [index.files.rel_path(i) for i in range(len(index.files))]
    assert names == ["a/a_0.jpg", "a/a_1.jpg", "a/extra.PNG", "b/b_0.jpg", "b/b_1.jpg", "c/c_0.jpg", "c/c_1.jpg"]
    assert index.files.labels.tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert index.files.path(2) == str(root / "train" / "a" / "extra.PNG")


def test_file_table_round_trip_unicode():
    table = FileTable("/r", ["ä/ß.jpg", "b/x y.JPEG"], [3, 4])
    assert len(table) == 2 and table.rel_path(0) == "ä/ß.jpg" and table.paths([1]) == ["/r/b/x y.JPEG"]
    assert table.labels.tolist() == [3, 4]


def test_loaders_report_classes(dataset):
    with data.build_loaders(make_cfg(dataset)) as loaders:
        assert loaders.num_classes == 3 and loaders.class_names == ["cat", "dog", "owl"]
        assert loaders.steps_per_epoch == 9 // 2 and loaders.val.total_samples == 6
    assert data.count_train_images(make_cfg(dataset)) == 9
    assert data.count_train_images(make_cfg(dataset, "synthetic", synthetic_train_size=77)) == 77


def test_missing_root(tmp_path):
    expect_error(make_cfg(tmp_path / "nowhere"), tmp_path / "nowhere", "does not exist")


def test_root_not_set():
    with pytest.raises(data.DatasetError, match=r"data\.root is not set"):
        data.build_loaders(make_cfg(""))


def test_missing_split(tmp_path, dataset):
    root = tmp_path / "ds"
    shutil.copytree(dataset, root)
    shutil.rmtree(root / "val")
    expect_error(make_cfg(root), root / "val", "'val' folder is missing")
    # Training only does not need val/ ...
    with data.build_loaders(make_cfg(root), build_val=False) as loaders:
        assert loaders.val is None and loaders.train is not None
    # ... and evaluation only does not need train/.
    shutil.rmtree(root / "train")
    expect_error(make_cfg(root), root / "train")


def test_empty_root_and_flat_split(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    expect_error(make_cfg(tmp_path), tmp_path / "train", "No class folders")
    (tmp_path / "train" / "x.JPEG").write_bytes(b"")
    message = expect_error(make_cfg(tmp_path), "holds 1 images directly")
    assert "prepare_imagenet.py" in message


def test_empty_class(tmp_path, dataset):
    root = tmp_path / "ds"
    shutil.copytree(dataset, root)
    (root / "train" / "zebra").mkdir()
    (root / "val" / "zebra").mkdir()
    (root / "train" / "zebra" / "readme.txt").write_text("no images here")
    expect_error(make_cfg(root), root / "train" / "zebra", "has no images")


def test_class_mismatch(tmp_path, dataset):
    root = tmp_path / "ds"
    shutil.copytree(dataset, root)
    shutil.move(str(root / "val" / "owl"), str(root / "val" / "eagle"))
    message = expect_error(make_cfg(root), root, "differ", "Only in val/: eagle", "Only in train/: owl")
    assert "owl" in message
    # Evaluation alone still compares the class folder names with train/.
    with pytest.raises(data.DatasetError, match="differ"):
        scan_dataset(root, need_train=False, need_val=True)


def test_training_set_smaller_than_a_global_batch(dataset):
    with pytest.raises(data.DatasetError, match="smaller than one global batch"):
        data.build_loaders(make_cfg(dataset, batch_size=5), world_size=2, rank=1)


def test_bad_backend_and_rank(dataset):
    cfg = make_cfg(dataset)
    cfg.data.backend = "ffcv"  # bypasses the config checks on purpose
    with pytest.raises(ValueError, match=r"Unknown data\.backend"):
        data.build_loaders(cfg)
    with pytest.raises(ValueError, match="rank"):
        data.build_loaders(make_cfg(dataset), rank=2, world_size=2)
