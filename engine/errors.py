"""User-facing errors and the one handler every entry point runs under.

An input the user can fix (a config, a checkpoint, a dataset folder, a file of a tool) raises an exception whose
message is one paragraph naming the file or key and the fix. :func:`main_guard` runs an entry point's ``main``,
prints such a message on stderr as ``Error: ...`` and returns :data:`EXIT_USER_ERROR` (2), without a traceback.
Any other exception is a bug and keeps its traceback. ``AN_DEBUG=1`` in the environment (or ``--debug`` on the
command line, which the guard removes before ``main`` parses the arguments) prints the traceback of user errors
too. Usage, at the bottom of ``train.py``, ``eval.py`` and every ``tools/*.py``::

    if __name__ == "__main__":
        sys.exit(main_guard(main))

The user errors: :class:`UserError` and its subclasses (``engine.config.ConfigError``,
``engine.checkpoint.CheckpointError``, ``tools.official.ConversionError``), the dataset errors of ``data``
(``DatasetError``, ``DataLoadError``; ``data`` sits below ``engine`` and does not import it), ``OSError``s
that name a file (a missing, unreadable or unwritable path given on the command line), and ``SystemExit`` with
a message (``raise SystemExit("...")``, the idiom of the small tools), whose exit status becomes 2 as well.
"""

from __future__ import annotations

import os
import re
import sys
import traceback
from collections.abc import Callable

EXIT_USER_ERROR = 2
DEBUG_ENV = "AN_DEBUG"
DEBUG_FLAG = "--debug"


class UserError(Exception):
    """An input the user can fix; the message (one paragraph: the file or key, and the fix) is shown as is."""


def user_error_types() -> tuple[type[BaseException], ...]:
    """The exception types :func:`main_guard` reports as a message rather than a traceback."""
    from data.folder import DataLoadError, DatasetError

    return (UserError, DatasetError, DataLoadError)


def _unwrap_worker_message(e: BaseException) -> str:
    """The original message of an exception re-raised by a DataLoader worker (whose text holds the worker's
    traceback: "Caught X in DataLoader worker process 0. Original Traceback ... X: message")."""
    text = str(e)
    if "Original Traceback" not in text:
        return text
    name = type(e).__name__
    parts = re.split(rf"^(?:[\w.]+\.)?{re.escape(name)}: ", text, flags=re.MULTILINE)
    return parts[-1].strip() if len(parts) > 1 else text


def describe(e: BaseException) -> str | None:
    """The one-paragraph message of a user error, or None when ``e`` is not one (a bug: keep the traceback)."""
    if isinstance(e, user_error_types()):
        return _unwrap_worker_message(e)
    if isinstance(e, OSError) and e.filename:
        what = e.strerror or type(e).__name__
        path = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 else "")
        return f"{path}: {what}. Check the path and its permissions (and the free space when writing)."
    return None


def debug_requested(argv: list[str] | None = None) -> bool:
    """``AN_DEBUG`` is set to something other than ``0``/empty, or ``--debug`` is among the arguments."""
    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        return True
    return DEBUG_FLAG in (sys.argv[1:] if argv is None else argv)


def main_guard(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Runs ``main(argv)`` (``argv`` default: the command line, without ``--debug``) and returns its exit status.

    A user error (see :func:`describe`) prints ``Error: <message>`` on stderr and returns 2; with the debug switch
    its traceback is printed first. Other exceptions propagate with their traceback.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(args)
    args = [a for a in args if a != DEBUG_FLAG]
    try:
        status = main(args)
    except SystemExit as e:
        if not isinstance(e.code, str):  # argparse's own exits (usage errors: 2, --help: 0) and sys.exit(n)
            raise
        if debug:
            traceback.print_exc()
        print(f"Error: {e.code}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except Exception as e:
        message = describe(e)
        if message is None:
            raise
        if debug:
            traceback.print_exc()
        print(f"Error: {message}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    return 0 if status is None else int(status)
