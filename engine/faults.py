"""Fault injection: make the trainer die, or a write fail, at a named point (for tests/test_faults.py).

Set ``AN_FAULT`` to ``ACTION:POINT`` or ``ACTION:POINT@N`` (the N-th time the point is reached, default
the first); several faults are separated by commas. Unset, :func:`at` returns at once. Actions:

* ``kill``: the process sends itself SIGKILL (nothing runs after it: no handler, no ``finally``), as when
  a node dies or the OOM killer strikes;
* ``enospc``: raises ``OSError(ENOSPC)`` for the file being written, as a full disk does.

Points (see the calls of :func:`at`):

=====================  ==============================================================================
``write:NAME``         inside the write of run-folder file NAME (e.g. ``last.pth``): its temporary file
                       holds part of the data, the target is not replaced yet
``save:last``          ``last.pth`` has just been replaced (every save)
``save:best``          ``best.pth`` has just been replaced (saves of an improved epoch)
``epoch:logged``       the epoch's line has just been appended to ``log.jsonl``
``run:summary``        ``summary.json`` has just been written, ``status.json`` still says ``running``
=====================  ==============================================================================
"""

from __future__ import annotations

import errno
import os
import signal
from collections import Counter

ENV = "AN_FAULT"
_hits: Counter[str] = Counter()


def _parse(spec: str) -> list[tuple[str, str, int]]:
    faults = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        action, _, rest = item.partition(":")
        point, _, nth = rest.partition("@")
        if action not in ("kill", "enospc") or not point or (nth and not nth.isdigit()):
            raise ValueError(
                f"{ENV}={spec!r}: expected ACTION:POINT[@N] with ACTION kill or enospc, e.g. kill:save:last@2"
            )
        faults.append((action, point, int(nth or 1)))
    return faults


def at(point: str, path: str | os.PathLike | None = None) -> None:
    """Fault point ``point``: does what ``AN_FAULT`` asks when it names this point (else nothing)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    _hits[point] += 1
    for action, name, nth in _parse(spec):
        if name != point or _hits[point] != nth:
            continue
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path) if path is not None else point)
