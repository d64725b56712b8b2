"""What every stage driver shares: `stage_main` (the `python -m components.<stage>` entry point:
read params.yaml, run, one `<stage>: error: ...` line on failure) and `StageError`."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

from components.config import Params, ParamsError, load_params

DEBUG_ENV = "STILL_DEBUG"


class StageError(RuntimeError):
    """A stage cannot go on; the message says what was wrong and how to fix it."""


def stage_main(name: str, run: Callable[[Params], Any]) -> None:
    """Entry point of `python -m components.<stage>`: read params.yaml, run, report the time.

    Any failure prints one `<stage>: error: ...` line on stderr and exits with status 2:
    ParamsError/StageError with their message (they already say what to fix), anything else
    (a library's error on unreadable input, say) as `<Type>: <first line>` plus a hint.
    With STILL_DEBUG=1 the exception propagates with its full traceback. KeyboardInterrupt
    and SystemExit are not caught.
    """
    start = time.perf_counter()
    try:
        run(load_params())
    except Exception as err:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        if isinstance(err, ParamsError | StageError):
            print(f"{name}: error: {err}", file=sys.stderr)
        else:
            first = next(iter(str(err).strip().splitlines()), "")
            print(f"{name}: error: {type(err).__name__}" + (f": {first}" if first else ""),
                  file=sys.stderr)
            print(f"{name}: rerun with {DEBUG_ENV}=1 to see the traceback", file=sys.stderr)
        sys.exit(2)
    print(f"{name}: done in {time.perf_counter() - start:.1f} s")
