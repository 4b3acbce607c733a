"""The outputs being written now, and the few system calls a signal must wait for.

The command line (converters/cli/signals.py) turns SIGINT, SIGTERM and SIGHUP into :class:`Interrupted`; it
reads here which outputs were in progress and which were complete, and holds a signal that arrives inside
:func:`signals_deferred` (publishing renames, making and removing temporaries) until the block is done. The
state is per process, like the signal handlers it serves; without those handlers it is only bookkeeping.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

from convnextv2.converters.fs_faults import user_facing

_writing: list[Path] = []  # destinations being written now, innermost last
_written: list[Path] = []  # destinations completed since the last reset()
_defer_depth = 0
_held: Callable[[], None] | None = None  # the delivery of a signal that arrived inside signals_deferred


def reset() -> None:
    """Forget completed outputs and any held signal (a command starts)."""
    global _defer_depth, _held
    _written.clear()
    _defer_depth, _held = 0, None


def forget_held() -> None:
    """Drop a held signal (the handlers are being removed)."""
    global _held
    _held = None


def deferring() -> bool:
    return _defer_depth > 0


def hold(deliver: Callable[[], None]) -> None:
    """Keep the first signal arriving inside :func:`signals_deferred`; ``deliver`` runs when the block ends."""
    global _held
    if _held is None:
        _held = deliver


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold an arriving signal until the block is done (publishing renames, creating and removing temporaries)."""
    global _defer_depth, _held
    _defer_depth += 1
    try:
        yield
    finally:
        _defer_depth -= 1
        if _defer_depth == 0 and _held is not None:
            deliver, _held = _held, None
            deliver()


@contextlib.contextmanager
def writing(dest: Path) -> Iterator[None]:
    """Around the writing of one output: named in an interruption's message as in progress."""
    shown = user_facing(dest)
    _writing.append(shown)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            _writing.remove(shown)


def mark_written(dest: Path) -> None:
    if user_facing(dest) != dest:
        return  # a staged output is written, not yet published
    with contextlib.suppress(ValueError):
        _writing.remove(dest)
    _written.append(dest)


def in_progress() -> tuple[str, ...]:
    return tuple(dict.fromkeys(str(p) for p in _writing if p not in _written))


def completed() -> tuple[str, ...]:
    return tuple(dict.fromkeys(str(p) for p in _written))


__all__ = ["completed", "deferring", "forget_held", "hold", "in_progress", "mark_written", "reset", "signals_deferred", "writing"]
