"""SIGINT, SIGTERM and SIGHUP for the command line: raised as :class:`Interrupted` in the main thread, so every
cleanup runs, except inside the few system calls that publish an output (converters/in_progress.py), where the
signal is held until they are done. The message names the outputs in progress and those completed."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import Any

from convnextv2.converters import in_progress
from convnextv2.reference.errors import Interrupted

HANDLED_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))

_unwinding = False


def on_signal(signum: int, _frame: Any = None) -> None:
    """The handler: raise :class:`Interrupted` now, or once publishing is done."""
    global _unwinding
    if _unwinding:
        # Already unwinding from the first signal: a second one must not cut the cleanup short.
        return
    if in_progress.deferring():
        in_progress.hold(lambda: on_signal(signum))
        return
    _unwinding = True
    raise Interrupted(signum, in_progress.in_progress(), in_progress.completed())


@contextlib.contextmanager
def handling_signals() -> Iterator[None]:
    """Route SIGINT, SIGTERM and SIGHUP to :func:`on_signal` for the duration (main thread only; elsewhere
    Python cannot install handlers and the defaults stay)."""
    global _unwinding
    in_progress.reset()
    _unwinding = False
    previous: dict[int, Any] = {}
    try:
        for signum in HANDLED_SIGNALS:
            previous[signum] = signal.signal(signum, on_signal)
    except ValueError:  # not the main thread
        pass
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        in_progress.forget_held()
        _unwinding = False


__all__ = ["HANDLED_SIGNALS", "handling_signals", "on_signal"]
