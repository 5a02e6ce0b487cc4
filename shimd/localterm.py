# -*- test-case-name: tests.test_localterm -*-
"""
The user's side of a terminal session (C{shimd attach}, C{shimd run -t}):
the local terminal in raw mode, and its window size sent to the container.

In raw mode every key, ^C and ^Z and the detach keys included, reaches the
container's pty, whose line discipline does the echo, the line editing and
the signals; its output already has C{\\r\\n} line ends, so output
processing is off too.  The saved modes are restored on every exit path
(the caller's C{finally}; Twisted turns SIGINT and SIGTERM into a reactor
stop, so those unwind through it as well).

The window size goes to the shim's resize FIFO as C{"<width> <height>"}
(spec 4.5): once at the start and again on every C{SIGWINCH}.

Only the standard library is used: no reactor is needed.
"""

from __future__ import annotations

import fcntl
import os
import signal
import struct
import termios
import tty
from contextlib import contextmanager
from types import FrameType
from typing import Any, Callable, Iterator


def rawTerminal(fd: int) -> Callable[[], None]:
    """
    Put the terminal C{fd} in raw mode.

    @return: a function that restores the previous modes (idempotent).
    """
    saved = termios.tcgetattr(fd)
    tty.setraw(fd, termios.TCSANOW)
    restored = False

    def restore() -> None:
        nonlocal restored
        if restored:
            return
        restored = True
        try:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        except termios.error:
            pass  # the terminal is gone (hang-up): nothing to restore

    return restore


def windowSize(fd: int) -> tuple[int, int] | None:
    """C{(width, height)} of the terminal C{fd}, or L{None} if it has none."""
    try:
        rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
    except OSError:
        return None
    return cols, rows


def writeResize(path: str, width: int, height: int) -> bool:
    """
    Send one size to a resize FIFO as iSulad does: a non-blocking open, one
    write of C{"<width> <height>"}, close.

    @return: C{False} if nobody reads the FIFO (the shim is gone) or it is
        full.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        os.write(fd, b"%d %d" % (width, height))
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


class WindowSizeForwarder:
    """
    Sends the local terminal's size now and on every C{SIGWINCH} (installed
    by L{start}, the previous handler put back by L{stop}; main thread
    only).
    """

    def __init__(self, fd: int, send: Callable[[int, int], object]) -> None:
        self._fd = fd
        self._send = send
        self._previous: Any = None
        self._last: tuple[int, int] | None = None

    def start(self) -> None:
        self._previous = signal.signal(signal.SIGWINCH, self._changed)
        self.forward()

    def forward(self) -> None:
        size = windowSize(self._fd)
        if size is not None and size != self._last:
            self._last = size
            self._send(*size)

    def _changed(self, signum: int, frame: FrameType | None) -> None:
        self.forward()

    def stop(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGWINCH, self._previous)
            self._previous = None


@contextmanager
def localTerminal(fd: int, resizeFifo: str | None) -> Iterator[None]:
    """
    The local terminal C{fd} in raw mode, its size sent to C{resizeFifo}
    (if any) now and on every change; all undone on exit.
    """
    restore = rawTerminal(fd)
    forwarder = None
    try:
        if resizeFifo:
            forwarder = WindowSizeForwarder(fd, lambda width, height: writeResize(resizeFifo, width, height))
            forwarder.start()
        yield
    finally:
        if forwarder is not None:
            forwarder.stop()
        restore()
