"""Checkpoints: atomic writes, safe loading, RNG capture, and errors a user can act on.

A checkpoint is a plain dict of tensors and Python primitives, so it loads with
``torch.load(weights_only=True)`` (no pickled code is ever executed)::

    model, ema, optimizer, scaler        state dicts (ema/scaler may be None)
    epoch, step_in_epoch, global_update  where training stands: resume continues from here
    best_top1, best_epoch, meters        bookkeeping, so a resumed run logs what an unbroken one would
    record                               the epoch's log.jsonl line (end-of-epoch checkpoints; else None)
    rng                                  Python, NumPy, torch CPU and CUDA generator states, one per rank
    world_size, steps_per_epoch          the run's shape, checked on resume
    config                               the resolved config (a nested dict), enough to rebuild the model
    classes                              class folder names in label order (None: synthetic data, or older files)
    git_rev, versions                    provenance

Writes go to a temporary file ``.<name>.<random>.tmp`` in the same folder, are flushed to disk, then
renamed over the target (``os.replace`` is atomic on POSIX), so a crash or a kill mid-write leaves the
previous file intact, plus a temporary file that the next run removes (:func:`temporary_files`).
"""

from __future__ import annotations

import os
import pickle
import platform
import random
import re
import shutil
import subprocess
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine import faults
from engine.errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used; the message names the file and the fix."""


def git_revision() -> str:
    """The code's git revision, with "-dirty" when the tree has uncommitted changes ("unknown" outside git)."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict[str, str]:
    # Plain str() everywhere: torch.__version__ is a TorchVersion, which weights_only loading refuses.
    info = {"python": platform.python_version(), "torch": str(torch.__version__)}
    if torch.version.cuda:
        info["cuda"] = str(torch.version.cuda)
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        import torchvision

        info["torchvision"] = str(torchvision.__version__)
    except ImportError:
        pass
    return info


# ----------------------------------------------------------------------------------------------------
# RNG state, stored as tensors and primitives so that weights_only loading accepts it.
# ----------------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seeds Python's, NumPy's and torch's global generators (torch's seeds every CUDA device too)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": _tuples_to_lists(random.getstate()),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(_lists_to_tuples(state["python"]))
    npst = state["numpy"]
    np.random.set_state(
        ("MT19937", npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples_to_lists(obj):
    if isinstance(obj, tuple):
        return [_tuples_to_lists(o) for o in obj]
    return obj


def _lists_to_tuples(obj):
    if isinstance(obj, list):
        return tuple(_lists_to_tuples(o) for o in obj)
    return obj


# ----------------------------------------------------------------------------------------------------
# Saving and loading.
# ----------------------------------------------------------------------------------------------------


TEMP_SUFFIX = ".tmp"  # temporary files are ".<target name>.<random>.tmp" next to their target


def temporary_files(folder: str | os.PathLike) -> list[Path]:
    """The temporary files that interrupted atomic writes into ``folder`` left behind."""
    return sorted(p for p in Path(folder).glob(f".*{TEMP_SUFFIX}") if p.is_file())


def _replace_atomically(path: Path, write: Callable[[str], None]) -> Path:
    """Runs ``write(tmp)`` on a temporary file next to ``path``, then renames it over ``path`` (atomic on POSIX).

    The temporary file is removed on any failure, so ``path`` is either the old file or the complete new one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _fsynced(tmp: str, target: Path, write_to: Callable[[Any], None]) -> None:
    """Writes ``tmp`` with ``write_to(file)`` and flushes it to disk (the data is there before any rename)."""
    with open(tmp, "wb") as f:
        write_to(f)
        faults.at(f"write:{target.name}", tmp)
        f.flush()
        os.fsync(f.fileno())


def save_atomic(obj: dict[str, Any], path: str | os.PathLike) -> Path:
    """Writes ``obj`` with torch.save to ``path`` through a temporary file and an atomic rename."""
    path = Path(path)
    return _replace_atomically(path, lambda tmp: _fsynced(tmp, path, lambda f: torch.save(obj, f)))


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Replaces a small text file (status.json, summary.json, ...) atomically: readers never see half of it."""
    path = Path(path)
    return _replace_atomically(path, lambda tmp: _fsynced(tmp, path, lambda f: f.write(text.encode())))


def copy_atomic(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copies a finished checkpoint with the same atomic guarantee (data flushed to disk before the rename)."""

    dst = Path(dst)

    def write(tmp: str) -> None:
        with open(src, "rb") as fsrc:
            _fsynced(tmp, dst, lambda f: shutil.copyfileobj(fsrc, f, 16 << 20))

    return _replace_atomically(dst, write)


def link_atomic(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Makes ``dst`` the same file as the finished ``src`` (a hard link renamed over ``dst``: instant, atomic).

    Falls back to :func:`copy_atomic` on filesystems without hard links. ``src`` can later be replaced
    (``last.pth`` is, at every save) without touching ``dst``.
    """
    dst = Path(dst)
    tmp = dst.parent / f".{dst.name}.{os.urandom(4).hex()}{TEMP_SUFFIX}"
    try:
        os.link(src, tmp)
    except OSError:
        return copy_atomic(src, dst)
    try:
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(dst.parent)
    return dst


def same_checkpoint(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when ``b`` holds the same training point as ``a`` (the same file, or epoch/step/update equal)."""
    try:
        if os.path.samefile(a, b):
            return True
        x, y = (torch.load(p, map_location="cpu", weights_only=True, mmap=True) for p in (a, b))
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile):
        return False
    keys = ("epoch", "step_in_epoch", "global_update")
    return isinstance(y, dict) and all(x.get(k) == y.get(k) for k in keys)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def not_a_checkpoint(path: Path) -> str | None:
    """Why ``path`` cannot be a file written by ``torch.save`` (a text file, an archive, other binary data), or None.

    ``torch.save`` writes a zip archive holding ``<name>/data.pkl`` (older versions: a pickle stream starting with
    byte 0x80). A zip whose central directory is missing (a cut-off copy) is not judged here: torch.load's error
    tells it apart. The answer also feeds the official-checkpoint converter (tools/official.py).
    """
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(b"PK\x03\x04"):
        if not zipfile.is_zipfile(path):
            return None  # truncated: torch.load says so
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
        if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            return None
        shown = ", ".join(names[:5]) + (f" ... ({len(names)} files)" if len(names) > 5 else "")
        return (
            f"a zip archive holding {shown or 'nothing'}, not a PyTorch checkpoint; unpack it and pass the "
            f".pth / .pth.tar file inside"
        )
    if head.startswith(b"\x80"):
        return None  # a pickle stream, as torch.save wrote it before PyTorch 1.6
    if head.startswith(b"\x1f\x8b"):
        return "a gzip-compressed file, not a PyTorch checkpoint; decompress it first (gunzip, or tar -xzf)"
    if len(head) > 262 and head[257:262] == b"ustar":
        return "a tar archive, not a PyTorch checkpoint; unpack it (tar -xf) and pass the checkpoint inside"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and text.strip() and all(c.isprintable() or c in "\r\n\t" for c in text):
        start = " ".join(text.split())[:60]
        return f"a text file (it starts with {start!r}), not a PyTorch checkpoint written by torch.save"
    return (
        f"neither a zip archive nor a pickle stream (it starts with bytes {head[:8].hex(' ')}), so not a PyTorch "
        f"checkpoint written by torch.save"
    )


def refused_global(error: BaseException) -> str | None:
    """The class a ``weights_only`` load refused (e.g. ``argparse.Namespace``), or None for other load errors."""
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
    return found[1] if found else None


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Loads a checkpoint safely (``weights_only=True``), with a clear error for every failure mode."""
    path = Path(path)
    if not path.exists():
        siblings = sorted(p.name for p in path.parent.glob("*.pth")) if path.parent.is_dir() else []
        hint = f" Checkpoints in {path.parent}: {', '.join(siblings)}." if siblings else ""
        raise CheckpointError(f"Checkpoint {path} does not exist.{hint} Check the path (e.g. RUN_DIR/best.pth).")
    if path.is_dir():
        raise CheckpointError(f"Checkpoint path {path} is a folder; pass a file such as {path / 'best.pth'}.")
    if path.stat().st_size == 0:
        raise CheckpointError(
            f"Checkpoint {path} is empty (0 bytes), probably from an interrupted copy. Use another checkpoint "
            f"(last.pth or best.pth in the same run folder) or re-copy the file."
        )
    try:
        reason = not_a_checkpoint(path)
    except OSError as e:
        raise CheckpointError(f"Checkpoint {path} cannot be read ({e.strerror or e}); check its permissions.") from None
    if reason is not None:
        raise CheckpointError(
            f"Checkpoint {path} is {reason}. Pass a checkpoint written by train.py (RUN_DIR/last.pth or best.pth) "
            f"or by tools/convert_checkpoint.py."
        )
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        refused = refused_global(e)
        if refused is not None:
            raise CheckpointError(
                f"Checkpoint {path} holds a pickled Python object ({refused}) besides tensors and plain containers; "
                f"torch.load(weights_only=True) refuses such files because unpickling them can run code stored in "
                f"the file. Checkpoints of this framework never hold one. An official AN release file "
                f"(model_best.pth.tar) converts with tools/convert_checkpoint.py (--trust-pickle if you trust its "
                f"source); for another file, save its state dict alone (torch.save(model.state_dict(), ...))."
            ) from None
        if "WeightsUnpickler error" in str(e) or "Weights only load failed" in str(e):
            raise CheckpointError(
                f"Checkpoint {path} is a pickle stream that is not a PyTorch checkpoint, or a corrupt one "
                f"(torch.load could not read it: {_unpickler_problem(e)}). Pass a checkpoint written by train.py "
                f"or tools/convert_checkpoint.py, or re-copy the file."
            ) from None
        raise CheckpointError(
            f"Checkpoint {path} is truncated or corrupt and cannot be read ({type(e).__name__}: {msg}). It was "
            f"probably cut off by a full disk or an interrupted copy. Use the previous checkpoint in the same "
            f"folder (last.pth / best.pth / epoch_*.pth) or re-copy the file."
        ) from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(
            f"Checkpoint {path} is not a checkpoint of this framework (expected a dict with a 'model' entry, "
            f"got {type(ckpt).__name__} with keys {list(ckpt)[:8] if isinstance(ckpt, dict) else '-'})."
        )
    return ckpt


def _unpickler_problem(error: BaseException) -> str:
    """The unpickler's own complaint inside torch's long weights_only message (e.g. "Unsupported operand 2")."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    for i, line in enumerate(lines):
        if "WeightsUnpickler error" in line:
            rest = line.split("WeightsUnpickler error:", 1)[1].strip()
            return rest or (lines[i + 1] if i + 1 < len(lines) else "unknown")
    return lines[0] if lines else type(error).__name__


def model_weights(ckpt: dict[str, Any], path: str | os.PathLike, ema: bool = False) -> dict[str, torch.Tensor]:
    """The model's state_dict in a loaded checkpoint ``ckpt`` (read from ``path``): its ``model`` entry, or with
    ``ema`` the EMA weights (the ``module.`` entries of the stored EMA, under the model's own names)."""
    if not ema:
        return ckpt["model"]
    if ckpt.get("ema") is None:
        raise CheckpointError(f"{path} has no EMA weights (the run had train.ema=false); drop --ema.")
    return {k.removeprefix("module."): v for k, v in ckpt["ema"].items() if k.startswith("module.")}


def state_mismatch(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> str:
    """Why ``state`` does not load into ``model`` strictly, or "" when it does.

    The reason counts the missing keys, the unexpected keys and the tensors of other shapes, with up to three
    examples of each, e.g. ``1 with other shapes (e.g. fc.weight (10, 64) vs (1000, 64))``.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    if mismatched:
        parts.append(f"{len(mismatched)} with other shapes (e.g. {'; '.join(mismatched[:3])})")
    return ", ".join(parts)


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str | os.PathLike) -> None:
    """``load_state_dict(strict=True)`` with an error that says which model the weights belong to."""
    mismatch = state_mismatch(model, state)
    if mismatch:
        raise CheckpointError(
            f"The weights in {source} do not fit this model: {mismatch}. The checkpoint was written for a "
            f"different model, norm or number of classes; rebuild the model from the checkpoint's own config "
            f"(eval.py does this) or pick the checkpoint of this experiment."
        )
    model.load_state_dict(state, strict=True)
