"""
Tests for L{shimd.localterm}: raw mode and its undo, window size
forwarding on SIGWINCH (the resize FIFO writer: tests.test_console).
"""

from __future__ import annotations

import os
import pty
import signal
import termios

from twisted.trial.unittest import SynchronousTestCase

from shimd.console import setWindowSize
from shimd.localterm import WindowSizeForwarder, rawTerminal, windowSize
from tests.test_streams import _close


class RawTerminalTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.master, self.slave = pty.openpty()
        self.addCleanup(_close, self.master)
        self.addCleanup(_close, self.slave)

    def test_rawAndRestored(self) -> None:
        before = termios.tcgetattr(self.slave)
        restore = rawTerminal(self.slave)
        raw = termios.tcgetattr(self.slave)
        lflag, oflag = raw[3], raw[1]
        self.assertFalse(lflag & (termios.ECHO | termios.ICANON | termios.ISIG))
        self.assertFalse(oflag & termios.OPOST)
        restore()
        self.assertEqual(termios.tcgetattr(self.slave), before)
        restore()  # twice is harmless
        self.assertEqual(termios.tcgetattr(self.slave), before)

    def test_restoreAfterHangup(self) -> None:
        """A terminal that went away is not an error."""
        restore = rawTerminal(self.slave)
        os.close(self.slave)
        restore()

    def test_notATerminal(self) -> None:
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        self.assertRaises(termios.error, rawTerminal, r)
        self.assertIsNone(windowSize(r))


class ForwarderTests(SynchronousTestCase):
    def test_startAndSigwinch(self) -> None:
        master, slave = pty.openpty()
        self.addCleanup(_close, master)
        self.addCleanup(_close, slave)
        setWindowSize(master, 120, 40)
        sent: list[tuple[int, int]] = []
        forwarder = WindowSizeForwarder(slave, lambda w, h: sent.append((w, h)))
        previous = signal.getsignal(signal.SIGWINCH)
        forwarder.start()
        try:
            self.assertEqual(sent, [(120, 40)])
            setWindowSize(master, 200, 50)
            os.kill(os.getpid(), signal.SIGWINCH)  # the kernel sends it to the fg group only
            self.assertEqual(sent, [(120, 40), (200, 50)])
            os.kill(os.getpid(), signal.SIGWINCH)  # no change: nothing sent
            self.assertEqual(sent, [(120, 40), (200, 50)])
        finally:
            forwarder.stop()
        self.assertEqual(signal.getsignal(signal.SIGWINCH), previous)

