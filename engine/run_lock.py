"""One run per output folder: an exclusive lock on ``OUTPUT_DIR/.lock``, held for the life of the process.

The lock is ``fcntl.flock`` on an open file, so the kernel releases it when the process ends, however it
ends (SIGKILL, a lost node's process dying, a crash): a killed run never leaves a stale lock behind. The
file holds the PID, host, start time and command of the run that holds the lock, so a second run can
say which run it collided with. On filesystems without flock support (some Lustre mounts) the run goes
on with a warning.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from engine.errors import UserError


class RunFolderError(UserError, RuntimeError):
    """The run folder cannot be used; the message names the folder and the fix."""


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    pid, host = info.get("pid", "unknown"), info.get("host", "an unknown host")
    started, command = info.get("started", "an unknown time"), info.get("command")
    return f"PID {pid} on host {host}, started {started}" + (f" ({command})" if command else "")


class RunLock:
    """Exclusive lock on ``folder/.lock``; :meth:`acquire` raises :class:`RunFolderError` when another run holds it."""

    NAME = ".lock"

    def __init__(self, fd: int | None, path: Path):
        self.fd, self.path = fd, path

    @classmethod
    def acquire(cls, folder: Path) -> RunLock:
        path = folder / cls.NAME
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunFolderError(unwritable_message(folder, e)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunFolderError(
                    f"Another run is already writing into the output folder {folder}: {_holder(path)}. Two runs in "
                    f"one folder would mix their checkpoints and logs. Wait for that run to end or stop it (SIGTERM "
                    f"makes it checkpoint and exit), or give this run another train.output_dir."
                ) from None
            logging.getLogger("an").warning(
                f"Cannot lock {path} ({os.strerror(e.errno or 0)}): this filesystem does not support flock, so "
                f"nothing stops a second run from writing into {folder} at the same time."
            )
            return cls(None, path)
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "command": " ".join(sys.argv),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        return cls(fd, path)

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)  # also for loader workers that inherited the descriptor
            os.close(self.fd)
            self.fd = None


def unwritable_message(folder: Path, e: OSError) -> str:
    """One paragraph for an output folder that cannot be created or written, naming the cause and the fix."""
    reason = os.strerror(e.errno) if e.errno else str(e)
    if isinstance(e, FileExistsError) or (folder.exists() and not folder.is_dir()):
        return (
            f"The output folder {folder} is a file, not a folder. Set train.output_dir to a folder (it is "
            f"created if missing), or move the file away."
        )
    if isinstance(e, NotADirectoryError):
        return (
            f"The output folder {folder} cannot be created: a part of its path is a file, not a folder "
            f"({reason}). Set train.output_dir to a path under a folder."
        )
    if e.errno == errno.ENOSPC:
        return (
            f"The output folder {folder} cannot be written: no space left on its device. Free space there "
            f"(df -h {folder.parent}) or set train.output_dir to a disk with room."
        )
    return (
        f"The output folder {folder} cannot be created or written ({reason}). Set train.output_dir to a "
        f"folder you can write to, or fix its permissions (e.g. chmod u+w on it or on its parent)."
    )
