"""SIGTERM and Ctrl-C as exceptions, held back while an output is being swapped into place.

Python ends on SIGTERM without running ``finally`` blocks, so a command stopped by a job
scheduler (``scancel``, ``kill``, a container stopping) would leave its temporary files and
folders behind. While a command runs, the ``hprune`` command line (:func:`termination_raises`) turns SIGTERM into
``SystemExit(143)`` and keeps Ctrl-C a ``KeyboardInterrupt``: the atomic writers of
:mod:`diffusers_hprune.utils.fileio` then remove what they wrote. Inside :func:`uninterrupted`
(the few renames that put an output in place) either signal waits until the block ends, so an
output is never left half swapped: the old one or the new one is in place, not neither.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

_held = 0
_waiting: list[int] = []


def _raise_for(signum: int) -> None:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


def _on_signal(signum, frame) -> None:
    if _held:
        _waiting.append(signum)
        return
    _raise_for(signum)


def raise_on_termination() -> None:
    """In the main thread: SIGTERM raises ``SystemExit(143)`` and SIGINT ``KeyboardInterrupt``, both held back
    inside :func:`uninterrupted`. Elsewhere (a library caller's thread) nothing changes."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)


@contextlib.contextmanager
def termination_raises() -> Iterator[None]:
    """:func:`raise_on_termination` for the length of a block, then the handlers that were there before: a program
    or test process that calls ``hprune``'s ``main()`` gets its own SIGTERM and SIGINT handling back."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    raise_on_termination()
    try:
        yield
    finally:
        for signum, handler in zip((signal.SIGTERM, signal.SIGINT), previous):
            if handler is not None:  # None: installed outside Python, and so not restorable from it
                signal.signal(signum, handler)


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """Hold SIGTERM / SIGINT (when :func:`raise_on_termination` handles them) until the block ends, then raise."""
    global _held
    _held += 1
    try:
        yield
    finally:
        _held -= 1
        if not _held and _waiting:
            signum = _waiting[0]
            _waiting.clear()
            _raise_for(signum)


__all__ = ["raise_on_termination", "termination_raises", "uninterrupted"]
