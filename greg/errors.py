"""One-line CLI errors and the exit codes every ``greg`` command uses.

A user of ``greg evaluate`` with a truncated data file, a wrong checkpoint or a full disk should see one line
naming the file and what was expected, not a Python traceback. :func:`cli_errors` does that for a
command's ``run(args)``::

    @cli_errors("greg evaluate")          # as a decorator: returns the exit code on error
    def run(args) -> int: ...

    def run(args) -> int:                 # or as a context manager: ``ce.code`` after the block
        with cli_errors("greg train") as ce:
            return Trainer(...).run()
        return ce.code

Exit codes (:data:`EXIT_INPUT`, :data:`EXIT_IO`; ``3`` numerical, ``130`` interrupted and ``143``
preempted are listed in :data:`EXIT_STATUS_HELP` and docs/RELIABILITY.md):

- ``2`` bad input: invalid arguments or config, an input file that is missing, or whose content is wrong
  (checkpoint of another architecture, truncated/corrupted data, checksum mismatch);
- ``1`` I/O failure: a file that cannot be written or read for another reason (read-only or full disk,
  permission denied), a failed download, out of memory.

Only the exceptions a user can cause are caught (``OSError``, ``ValueError``, ``RuntimeError``,
``KeyError``, ``EOFError``, ``MemoryError`` and their subclasses such as ``greg.models.CheckpointError``);
anything else is a bug and keeps its traceback. ``GREG_TRACEBACK=1`` prints the traceback of caught errors
too (for debugging). An exception class may set an ``exit_code`` attribute to choose its code.
"""

from __future__ import annotations

import difflib
import functools
import json
import os
import sys
import traceback
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self

EXIT_IO = 1
EXIT_INPUT = 2
EXIT_NUMERIC = 3  # greg train: the loss or the weights became NaN/inf
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT)
EXIT_PREEMPTED = 143  # greg train: stopped by SIGTERM/SIGUSR1 after checkpointing; rerun to resume
CAUGHT: tuple[type[BaseException], ...] = (OSError, ValueError, RuntimeError, KeyError, EOFError, MemoryError)
#: Help text for a command's ``epilog`` (argparse).
EXIT_STATUS_HELP = (
    "exit status: 0 success; 1 I/O or environment failure (read-only or full disk, permission denied, failed "
    "download, out of memory, output directory locked by another greg process); 2 bad input (invalid arguments "
    "or config, a missing input file, a file whose content is wrong: checkpoint of another architecture or "
    "config, truncated or corrupted data); 3 numerical failure (greg train: the loss or the weights became "
    "NaN/inf; the last good checkpoint is kept); 130 interrupted (Ctrl-C); 143 stopped by SIGTERM or SIGUSR1 "
    "after checkpointing (greg train: rerun the same command to resume). Errors are one line naming the file; "
    "GREG_TRACEBACK=1 also prints the traceback."
)
# OSErrors that mean "the input named on the command line / in the config is not there".
_MISSING = (FileNotFoundError, NotADirectoryError, IsADirectoryError)


def did_you_mean(name: Any, known: Any) -> str:
    """`` (did you mean 'x'?)`` for the known name closest to ``name``, or ``""``: the one suggestion
    helper of every "unknown ..." message (registries, config keys, hparams, keyword arguments)."""
    close = difflib.get_close_matches(str(name), [str(k) for k in known], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class InputError(ValueError):
    """A bad argument or option value; the message says which and what was expected (exit 2)."""

    exit_code = EXIT_INPUT


class ReportError(InputError):
    """A table spec, results file or workflow-config entry that the planner or ``greg report`` cannot use."""


def json_object(text: str, flag: str, error: type[InputError] = InputError) -> dict:
    """A command-line flag's JSON object; ``error`` (exit 2) naming the flag if it is not one."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{flag}: not valid JSON ({e.msg})") from None
    if not isinstance(value, dict):
        raise error(f"{flag} must be a JSON object, got {text[:60]!r}")
    return value


def exit_code(e: BaseException) -> int:
    """The exit code of a caught error (see the module doc)."""
    code = getattr(e, "exit_code", None)
    if isinstance(code, int) and not isinstance(code, bool):
        return code
    if isinstance(e, _MISSING):
        return EXIT_INPUT
    if isinstance(e, (OSError, MemoryError)) or type(e).__name__ == "OutOfMemoryError":  # torch's CUDA OOM
        return EXIT_IO
    return EXIT_INPUT


GPU_OOM_HINT = (
    "the GPU is too small for this job at the configured batch (the batch is part of the paper's recipe: do not "
    "shrink it to fit); docs/WORKFLOW.md 'Rehearsal' lists each method's measured memory: use a larger GPU"
)


def error_text(e: BaseException) -> str:
    """The message of ``e``: OSErrors keep ``[Errno N]`` and get their file name; a foreign error (numpy,
    torch, a bare ``KeyError('x')``) is prefixed with its type, whose name is part of the information."""
    if isinstance(e, KeyError) and e.args and " " in str(e.args[0]):
        return str(e.args[0])  # a sentence (greg's registries: "unknown dataset ..."); str() would quote it
    text = str(e)
    if isinstance(e, OSError):
        for name in (e.filename, e.filename2):
            if name is not None and str(name) not in text:
                text += f": {name}"
        return text
    if type(e).__name__ == "OutOfMemoryError":  # torch's CUDA OOM: a long allocator report, then what to do
        return f"{type(e).__name__}: {cap(text, 600)} -- {GPU_OOM_HINT}"
    own = type(e).__module__.startswith("greg.") or isinstance(e, InputError)
    if not text:
        return type(e).__name__
    return text if own else f"{type(e).__name__}: {text}"


# Longest message printed: an error quoting a hostile input (a huge YAML value) stays readable.
MAX_MESSAGE = 2000


def cap(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` cut to ``limit`` characters, saying how long it was."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters in all)"


def report_error(prog: str, e: BaseException, file: Any = None) -> int:
    """Print ``<prog>: <message>`` to stderr (the traceback too with ``GREG_TRACEBACK=1``), capped at
    :data:`MAX_MESSAGE` characters; return the exit code."""
    file = sys.stderr if file is None else file
    if os.environ.get("GREG_TRACEBACK", "") not in ("", "0"):
        traceback.print_exception(e, file=file)
    print(f"{prog}: {cap(error_text(e))}", file=file, flush=True)
    return exit_code(e)


class cli_errors:
    """Catch the user-caused errors of a CLI command, print one line, give the exit code.

    As a decorator the wrapped function returns the code instead of raising; as a context manager the
    error is swallowed and ``.code`` / ``.error`` tell what happened (``code`` is 0 when nothing was
    raised). ``SystemExit`` and ``KeyboardInterrupt`` pass through."""

    def __init__(self, prog: str):
        self.prog = prog
        self.code = 0
        self.error: BaseException | None = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> bool:
        if e is None or not isinstance(e, CAUGHT):
            return False
        self.error = e
        self.code = report_error(self.prog, e)
        return True

    def __call__(self, fn: Callable[..., int]) -> Callable[..., int]:
        prog = self.prog

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> int:
            with cli_errors(prog) as ce:
                return fn(*args, **kwargs)
            return ce.code

        return wrapper
