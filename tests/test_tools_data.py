"""Dataset tools: prepare_imagenet, check_dataset, make_digits, bench_loader."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.image_folders import corrupt_file, make_image_folder, smooth_image
from tools import bench_loader, check_dataset, make_digits, prepare_imagenet

REPO = Path(__file__).resolve().parent.parent

SYNSETS = ["n01440764", "n01443537", "n01484850"]


def flat_val(tmp_path: Path, n: int = 7) -> tuple[Path, dict[str, str]]:
    import numpy as np

    val = tmp_path / "val"
    val.mkdir()
    rng = np.random.default_rng(0)
    truth = {}
    for i in range(1, n + 1):
        name = f"ILSVRC2012_val_{i:08d}"
        smooth_image(rng, 20, 16).save(val / f"{name}.JPEG")
        truth[name] = SYNSETS[i % 3]
    return val, truth


def write_csv(path: Path, truth: dict[str, str]) -> Path:
    rows = [f"{k},{v} 10 20 110 220 {v} 5 5 50 50" for k, v in truth.items()]
    path.write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    return path


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("fmt", ["csv", "list"])
def test_prepare_imagenet_sorts_idempotently_and_never_deletes(tmp_path, fmt, capsys):
    val, truth = flat_val(tmp_path)
    if fmt == "csv":
        gt = write_csv(tmp_path / "LOC_val_solution.csv", truth)
    else:
        gt = tmp_path / "val_labels.txt"
        gt.write_text("".join(f"{k}.JPEG {v}\n" for k, v in truth.items()))
    before = tree(val)

    assert prepare_imagenet.main([str(val), str(gt), "--dry-run"]) == 0
    assert tree(val) == before  # a dry run changes nothing
    assert "would move 7 images into 3 class folders" in capsys.readouterr().out

    assert prepare_imagenet.main([str(val), str(gt)]) == 0
    after = tree(val)
    assert sorted(after.values()) == sorted(before.values())  # every image still there, byte for byte
    for name, synset in truth.items():
        assert f"{synset}/{name}.JPEG" in after
    assert not list(val.glob("*.JPEG"))

    capsys.readouterr()
    assert prepare_imagenet.main([str(val), str(gt)]) == 0  # second run: nothing to do, success
    out = capsys.readouterr().out
    assert "moved 0 images" in out and "nothing to do" in out and "7 images were already in class folders" in out
    assert tree(val) == after


def test_prepare_imagenet_reports_unmatched_and_refuses_to_overwrite(tmp_path, capsys):
    val, truth = flat_val(tmp_path)
    gt = write_csv(tmp_path / "gt.csv", {k: v for k, v in truth.items() if not k.endswith("7")})
    name = "ILSVRC2012_val_00000001"
    (val / truth[name]).mkdir()
    (val / truth[name] / f"{name}.JPEG").write_bytes(b"an older copy")
    assert prepare_imagenet.main([str(val), str(gt)]) == 1
    captured = capsys.readouterr()
    assert "not in the ground truth" in captured.out and "ILSVRC2012_val_00000007.JPEG" in captured.out
    assert "destination exists" in captured.err
    assert (val / f"{name}.JPEG").exists()  # left in place, nothing overwritten
    assert (val / truth[name] / f"{name}.JPEG").read_bytes() == b"an older copy"
    assert (val / "ILSVRC2012_val_00000007.JPEG").exists()


def test_prepare_imagenet_rejects_devkit_format_and_bad_labels(tmp_path, capsys):
    val, _ = flat_val(tmp_path, 2)
    devkit = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    devkit.write_text("490\n361\n")
    assert prepare_imagenet.main([str(val), str(devkit)]) == 2
    assert "devkit" in capsys.readouterr().err
    evil = tmp_path / "evil.txt"
    evil.write_text("ILSVRC2012_val_00000001 ../../etc\n")
    assert prepare_imagenet.main([str(val), str(evil)]) == 2
    assert len(list(val.glob("*.JPEG"))) == 2


def test_check_dataset_clean_and_with_problems(tmp_path, capsys):
    root = make_image_folder(tmp_path / "ok", train_per_class=3, val_per_class=2)
    assert check_dataset.main([str(root)]) == 0
    assert "OK" in capsys.readouterr().out

    bad = make_image_folder(tmp_path / "bad", train_per_class=3, val_per_class=2)
    corrupt_file(bad / "train" / "cat" / "cat_0.JPEG", "garbage")
    corrupt_file(bad / "val" / "dog" / "dog_1.JPEG", "truncate")
    (bad / "train" / "cat" / "notes.txt").write_text("not an image")
    (bad / "train" / "zebra").mkdir()
    smooth_image(__import__("numpy").random.default_rng(0), 10, 10).save(
        bad / "train" / "owl" / "png_inside.JPEG", format="PNG"
    )
    assert check_dataset.main([str(bad), "--workers", "2"]) == 1
    out = capsys.readouterr().out
    assert "[train] 4 classes, 10 images, 1 unreadable, 1 non-image files, 1 empty classes" in out
    assert "[val] 3 classes, 6 images, 1 unreadable" in out
    for fragment in ("cat_0.JPEG", "dog_1.JPEG", "notes.txt", "zebra", "classes differ", "PNG data", "FAILED"):
        assert fragment in out


def test_make_digits_structure_and_idempotence(tmp_path, capsys):
    out = tmp_path / "digits"
    assert make_digits.main(["--out", str(out), "--size", "16"]) == 0
    meta = json.loads((out / make_digits.MARKER).read_text())
    assert meta["train"] + meta["val"] == 1797
    for split in ("train", "val"):
        assert sorted(p.name for p in (out / split).iterdir()) == [str(c) for c in range(10)]
    n_val = [len(list((out / "val" / str(c)).glob("*.jpg"))) for c in range(10)]
    assert sum(n_val) == meta["val"] and all(34 <= n <= 38 for n in n_val)  # stratified: ~20% of each class
    from PIL import Image

    with Image.open(next((out / "train" / "3").glob("*.jpg"))) as img:
        assert img.size == (16, 16) and img.mode == "RGB"
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*.jpg")}
    assert make_digits.main(["--out", str(out), "--size", "16"]) == 0
    assert "already complete" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.jpg")} == stamp
    with pytest.raises(SystemExit):
        make_digits.main(["--out", str(out), "--size", "24"])  # other options: refuse, do not mix


def test_bench_loader_and_scripts_run_from_anywhere(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "bench_loader.py"),
            "--make-jpegs",
            str(tmp_path / "jpegs"),
            "--num-images",
            "12",
            "--classes",
            "3",
            "--backend",
            "torch",
            "--batch-size",
            "4",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--workers",
            "0",
            "--img-size",
            "32",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["images"] == 8 and report["images_per_sec"] > 0 and report["backend"] == "torch"
    from PIL import Image

    with Image.open(next((tmp_path / "jpegs" / "train").glob("*/*.JPEG"))) as img:
        assert img.size == bench_loader.JPEG_SIZE and img.format == "JPEG"
    checked = subprocess.run(
        [sys.executable, str(REPO / "tools" / "check_dataset.py"), str(tmp_path / "jpegs")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
