"""Stopping inside a long model call.

A pipeline's step callback can stop a run only between steps; on a CPU one real-size UNet step
takes seconds (4-9 s at 512x512, tens of seconds for Kandinsky 3 at 1024) and a MoVQ decode as
long as two steps. The models therefore call `check()` between their blocks: while a job runs,
`checking(fn)` makes that call `fn()` (the job's own cancel check, which raises), so a Stop
takes effect within one block. Outside a job `check()` does nothing. The models never learn what
a job is: they only call `check()`.

One checker at a time is enough: all model work runs on the engine thread (and on the host
pool's workers, which it waits for), one job after another.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

_checker: Callable[[], None] | None = None


def check() -> None:
    """Raise the running job's stop exception if it was asked to stop; otherwise nothing."""
    checker = _checker
    if checker is not None:
        checker()


@contextmanager
def checking(checker: Callable[[], None]):
    """While the block runs, `check()` calls `checker` (which raises to stop)."""
    global _checker
    previous, _checker = _checker, checker
    try:
        yield
    finally:
        _checker = previous
