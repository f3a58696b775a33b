"""Dataset scanning and validation for the ImageNet folder layout (``root/{train,val}/<class>/<image>``).

The class index of a folder is its position in the sorted list of class folder names, so the same
dataset always gives the same labels. Train and val must hold the same class folders. Every problem
raises :class:`DatasetError`, whose message names the path and shows the expected layout (or, for a
folder that cannot be read or a symbolic link that loops, the permission or link to fix).

File lists are stored compactly (:class:`FileTable`: one byte buffer plus offsets) rather than as a
Python list of strings: loader worker processes read them without the copy-on-access memory growth
that a 1.28M-element list of ``str`` causes after ``fork``.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".tif", ".tiff", ".webp")
SPLITS = ("train", "val")

LAYOUT = """\
Expected layout (one folder per class, the same class folders in train/ and val/):
  ROOT/
  ├── train/
  │   ├── n01440764/
  │   │   ├── n01440764_10026.JPEG
  │   │   └── ...
  │   └── n01443537/ ...
  └── val/
      ├── n01440764/
      │   ├── ILSVRC2012_val_00000293.JPEG
      │   └── ...
      └── n01443537/ ...
The official validation images come in one flat folder: sort them into class folders with
  python tools/prepare_imagenet.py ROOT/val LOC_val_solution.csv
and check a dataset with
  python tools/check_dataset.py ROOT"""


class DatasetError(ValueError):
    """The dataset on disk is missing or does not have the expected layout; the message says what to fix."""


class DataLoadError(RuntimeError):
    """Reading or decoding images failed in a way the loader cannot skip (e.g. inside a DALI pipeline)."""


def is_image_file(name: str) -> bool:
    """True when ``name`` has one of :data:`IMG_EXTENSIONS` (case-insensitive) and is not hidden."""
    return not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS)


def _error(message: str, path: Path | str) -> DatasetError:
    return DatasetError(f"{message}: {path}\n{LAYOUT}")


class FileTable:
    """An immutable list of ``(relative path, label)`` pairs under a root folder, stored in numpy arrays.

    Args:
        root: folder the relative paths start from.
        rel_paths: paths relative to ``root`` (e.g. ``n01440764/x.JPEG``).
        labels: class index of each path.
    """

    def __init__(self, root: str | Path, rel_paths: Sequence[str], labels: Sequence[int]):
        if len(rel_paths) != len(labels):
            raise ValueError("rel_paths and labels differ in length")
        self.root = str(root)
        encoded = [p.encode("utf-8", "surrogateescape") for p in rel_paths]
        lengths = np.fromiter((len(b) for b in encoded), dtype=np.int64, count=len(encoded))
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum(lengths, out=self._offsets[1:])
        self._buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def rel_path(self, index: int) -> str:
        """The path of sample ``index`` relative to the root."""
        start, end = self._offsets[index], self._offsets[index + 1]
        return self._buffer[start:end].tobytes().decode("utf-8", "surrogateescape")

    def path(self, index: int) -> str:
        """The full path of sample ``index``."""
        return os.path.join(self.root, self.rel_path(index))

    def paths(self, indices: Iterable[int]) -> list[str]:
        """Full paths of several samples."""
        return [self.path(int(i)) for i in indices]


@dataclass
class SplitIndex:
    """The scanned contents of one split folder."""

    split: str
    folder: Path
    classes: list[str]
    files: FileTable

    @property
    def num_samples(self) -> int:
        return len(self.files)


def _unreadable(path: str | Path, err: OSError) -> DatasetError:
    """The error for a dataset path the OS refuses: no permission, a looping symbolic link, or another OSError."""
    if err.errno == errno.ELOOP:
        return DatasetError(
            f"{path} is a symbolic link that loops (it leads back to itself: {err.strerror}). Remove it, or make it "
            f"point at the real folder or file (`ls -l {path}` shows its target)."
        )
    if isinstance(err, PermissionError):
        user = os.environ.get("USER") or str(os.geteuid())
        return DatasetError(
            f"{path} cannot be read: permission denied for the user running this ({user}). Give it read and "
            f"execute permission (chmod -R a+rX {path}, or ask its owner), or move it out of the dataset."
        )
    if isinstance(err, FileNotFoundError):
        return DatasetError(f"{path} does not exist. Check the path (data.root, or --data-root).\n{LAYOUT}")
    return DatasetError(f"{path} cannot be read ({err.strerror or err}). Fix or remove it.")


def read_dir(folder: str | Path) -> list[os.DirEntry]:
    """The entries of ``folder``; a folder the OS refuses to list raises DatasetError naming it and the fix."""
    try:
        with os.scandir(folder) as it:
            return list(it)
    except OSError as e:
        raise _unreadable(folder, e) from None


def entry_is_dir(entry: os.DirEntry) -> bool:
    """``entry.is_dir()`` (following links), with a DatasetError for a looping or unreadable symbolic link."""
    try:
        return entry.is_dir()
    except OSError as e:
        raise _unreadable(entry.path, e) from None


def entry_is_file(entry: os.DirEntry) -> bool:
    """``entry.is_file()`` (following links), with a DatasetError for a looping or unreadable symbolic link."""
    try:
        return entry.is_file()
    except OSError as e:
        raise _unreadable(entry.path, e) from None


def list_classes(split_dir: Path) -> list[str]:
    """Sorted names of the class folders (sub-folders, hidden ones excluded) of a split folder."""
    return sorted(e.name for e in read_dir(split_dir) if not e.name.startswith(".") and entry_is_dir(e))


def _root_path(root: str | Path) -> Path:
    if not str(root).strip():
        raise DatasetError(f"data.root is not set: give the dataset folder, e.g. data.root=/data/imagenet\n{LAYOUT}")
    return Path(root)


def check_split_folder(root: Path, split: str) -> Path:
    """Returns ``root/split`` after checking that root and split exist and are folders."""
    if not root.exists():
        raise _error("The dataset root does not exist", root)
    if not root.is_dir():
        raise _error("The dataset root is not a folder", root)
    folder = root / split
    if not folder.is_dir():
        found = ", ".join(sorted(e.name for e in read_dir(root) if entry_is_dir(e))[:10]) or "no sub-folders"
        raise _error(f"The '{split}' folder is missing (the root holds: {found})", folder)
    return folder


def scan_split(root: str | Path, split: str, classes: list[str] | None = None) -> SplitIndex:
    """Lists the images of ``root/split``.

    Args:
        root: dataset root.
        split: ``train`` or ``val``.
        classes: expected class folder names (e.g. those of the other split); a difference raises.

    Returns:
        The split's classes and files, files sorted by class then file name.

    Raises:
        DatasetError: missing folders, no class folders, an empty class, or classes that differ from ``classes``.
    """
    root = _root_path(root)
    folder = check_split_folder(root, split)
    found = list_classes(folder)
    if not found:
        loose = sum(1 for e in read_dir(folder) if is_image_file(e.name) and entry_is_file(e))
        hint = f" It holds {loose} images directly: sort them into class folders first." if loose else ""
        raise _error(f"No class folders in the '{split}' split.{hint}", folder)
    if classes is not None and found != classes:
        raise class_mismatch_error(root, classes, found, split)
    rel_paths: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(found):
        names = sorted(e.name for e in read_dir(folder / name) if is_image_file(e.name) and entry_is_file(e))
        if not names:
            raise _error(
                f"Class folder '{name}' of the '{split}' split has no images "
                f"(accepted extensions: {', '.join(IMG_EXTENSIONS)}, any case)",
                folder / name,
            )
        rel_paths.extend(f"{name}/{n}" for n in names)
        labels.extend([label] * len(names))
    return SplitIndex(split, folder, found, FileTable(folder, rel_paths, labels))


def class_difference(found: list[str], expected: list[str]) -> tuple[str, str]:
    """The class names only in ``found`` and only in ``expected``, each as a short sorted list for a message
    (the first 8 names and the count, or "none")."""

    def show(names: set[str]) -> str:
        names = sorted(names)
        return ", ".join(names[:8]) + (f" ... ({len(names)} in all)" if len(names) > 8 else "") or "none"

    return show(set(found) - set(expected)), show(set(expected) - set(found))


def class_mismatch_error(root: Path, expected: list[str], found: list[str], split: str) -> DatasetError:
    """The error for a split whose class folders differ from the other split's."""
    other = "val" if split == "train" else "train"
    only_here, only_there = class_difference(found, expected)
    return _error(
        f"The class folders of '{split}' ({len(found)}) and '{other}' ({len(expected)}) differ. "
        f"Only in {split}/: {only_here}. Only in {other}/: {only_there}",
        root,
    )


def scan_dataset(root: str | Path, need_train: bool = True, need_val: bool = True) -> dict[str, SplitIndex]:
    """Scans the splits that are needed and checks that train and val agree on the classes.

    When only one split is needed and the other exists, the other's class folder names are still
    compared (its files are not listed), so a model is never evaluated against a shifted label map.

    Returns:
        ``{"train": SplitIndex, "val": SplitIndex}`` restricted to the needed splits.
    """
    root = _root_path(root)
    out: dict[str, SplitIndex] = {}
    classes: list[str] | None = None
    for split in SPLITS:
        if (split == "train" and need_train) or (split == "val" and need_val):
            out[split] = scan_split(root, split, classes)
            classes = out[split].classes
    if classes is not None and len(out) == 1:
        (only,) = out
        other = "val" if only == "train" else "train"
        if (root / other).is_dir():
            other_classes = list_classes(root / other)
            if other_classes and other_classes != classes:
                raise class_mismatch_error(root, other_classes, classes, only)
    return out


def count_images(root: str | Path, split: str = "train") -> int:
    """Number of images in ``root/split`` (with the same checks as :func:`scan_split`)."""
    return scan_split(root, split).num_samples
