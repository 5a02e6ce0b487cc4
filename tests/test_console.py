"""
Tests for L{shimd.console}: the console socket (with a fake runc that sends
a pty master from a thread, as runc does), the resize parser, the window
size and the resize FIFO, and the input path to the master (B23).
"""

from __future__ import annotations

import fcntl
import os
import pty
import shutil
import socket
import stat
import struct
import tempfile
import termios
import threading

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from shimd.console import (
    ConsoleError,
    ConsoleSocket,
    ResizeFifo,
    WindowSize,
    parseResize,
    setWindowSize,
)
from shimd.localterm import windowSize, writeResize
from shimd.streams import OutputStream, StdinPipe
from tests.test_streams import _close as _closeQuietly


def openPty(test: SynchronousTestCase) -> tuple[int, int]:
    master, slave = pty.openpty()
    for fd in (master, slave):
        test.addCleanup(_closeQuietly, fd)
    return master, slave


def openFds() -> set[int]:
    """Our open fds; not the one listdir itself held (it is closed by now)."""
    fds = set()
    for n in os.listdir("/proc/self/fd"):
        try:
            os.fstat(int(n))
        except OSError:
            continue
        fds.add(int(n))
    return fds


class ParseResizeTests(SynchronousTestCase):
    """C{"<width> <height>"}; everything else is rejected, never fatal (B6)."""

    def assertParsed(self, data: bytes, sizes: list[tuple[int, int]], rejected: int = 0) -> None:
        got, bad = parseResize(data)
        self.assertEqual(got, sizes)
        self.assertEqual(len(bad), rejected, bad)

    def test_plain(self) -> None:
        self.assertParsed(b"100 40", [(100, 40)])

    def test_trailingNewline(self) -> None:
        self.assertParsed(b"100 40\n", [(100, 40)])

    def test_extraBlanks(self) -> None:
        self.assertParsed(b"  100 \t 40  \r\n", [(100, 40)])

    def test_limits(self) -> None:
        self.assertParsed(b"0 0", [(0, 0)])
        self.assertParsed(b"65535 65535", [(65535, 65535)])
        self.assertParsed(b"00080 0024", [(80, 24)])

    def test_outOfRange(self) -> None:
        self.assertParsed(b"65536 40", [], 1)
        self.assertParsed(b"80 99999999999999999999999", [], 1)
        self.assertParsed(b"-1 40", [], 1)

    def test_garbage(self) -> None:
        for data in (b"garbage", b"80", b"80 x", b"1e3 40", b"80 24 1", b"+80 24", b"\xff\xfe 1", b"0x50 24"):
            self.assertParsed(data, [], 1)

    def test_coalesced(self) -> None:
        """
        C{"80 24"} and C{"90 30"} written without a separator cannot be
        split back into sizes: rejected as a whole.
        """
        self.assertParsed(b"80 2490 30", [], 1)

    def test_coalescedLines(self) -> None:
        """With newlines, coalesced messages are each applied, in order."""
        self.assertParsed(b"80 24\n90 30\n", [(80, 24), (90, 30)])

    def test_validAmongInvalid(self) -> None:
        self.assertParsed(b"80 24\nxx\n70000 1\n90 30", [(80, 24), (90, 30)], 2)

    def test_empty(self) -> None:
        self.assertParsed(b"", [])
        self.assertParsed(b"\n\n", [])


class WindowSizeTests(SynchronousTestCase):
    def test_beforeMaster(self) -> None:
        """A size that arrives before the master is applied when it arrives (the latest one)."""
        master, slave = openPty(self)
        setWindowSize(master, 120, 40)
        size = WindowSize()
        size.resize(100, 30)
        size.resize(200, 50)
        self.assertEqual(windowSize(slave), (120, 40))
        size.setMaster(master)
        self.assertEqual(windowSize(slave), (200, 50))

    def test_rowsAreHeight(self) -> None:
        master, slave = openPty(self)
        size = WindowSize()
        size.setMaster(master)
        size.resize(132, 43)
        rows, cols = struct.unpack("HHHH", fcntl.ioctl(slave, termios.TIOCGWINSZ, b"\0" * 8))[:2]
        self.assertEqual((rows, cols), (43, 132))

    def test_noPendingSize(self) -> None:
        """Without a resize, the master keeps the size runc gave it (consoleSize)."""
        master, slave = openPty(self)
        setWindowSize(master, 120, 40)
        WindowSize().setMaster(master)
        self.assertEqual(windowSize(slave), (120, 40))

    def test_ioctlFails(self) -> None:
        """A failing TIOCSWINSZ is logged, never raised."""
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        size = WindowSize()
        size.setMaster(r)
        size.resize(80, 24)  # no exception

    def test_masterGone(self) -> None:
        """After the master closed, its fd number is never touched again."""
        master, slave = openPty(self)
        size = WindowSize()
        size.setMaster(master)
        size.masterGone()
        size.resize(10, 10)
        self.assertNotEqual(windowSize(slave), (10, 10))


class ResizeFifoTests(SynchronousTestCase):
    def setUp(self) -> None:
        d = self.mktemp()
        os.makedirs(d)
        self.path = os.path.join(d, "resize_fifo")
        os.mkfifo(self.path, 0o600)
        self.sizes: list[tuple[int, int]] = []
        self.fifo = ResizeFifo(MemoryReactorClock(), self.path, lambda w, h: self.sizes.append((w, h)))
        self.addCleanup(self.fifo.close)

    def send(self, data: bytes) -> None:
        """Write one message as iSulad does: open, write, close; then read it."""
        fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
        os.write(fd, data)
        os.close(fd)
        self.fifo.reader.doRead()

    def test_messages(self) -> None:
        for data in (b"100 40", b"garbage", b"80 2490 30", b"70000 1", b"90 30\n"):
            self.send(data)
        self.assertEqual(self.sizes, [(100, 40), (90, 30)])

    def test_noHangup(self) -> None:
        """The held write end means a writer closing is not end of file."""
        self.send(b"100 40")
        self.assertIsNone(self.fifo.reader.doRead())
        self.assertGreaterEqual(self.fifo.reader.fd, 0)

    def test_close(self) -> None:
        before = openFds()
        self.fifo.close()
        self.assertEqual(len(before - openFds()), 2)

    def test_writeResize(self) -> None:
        """The client side (shimd attach, shimd run -t) writes what the shim reads."""
        self.assertTrue(writeResize(self.path, 80, 24))
        self.fifo.reader.doRead()
        self.assertEqual(self.sizes, [(80, 24)])

    def test_writeResizeNoReader(self) -> None:
        other = self.path + "2"
        os.mkfifo(other, 0o600)
        self.assertFalse(writeResize(other, 80, 24))
        self.assertFalse(writeResize(self.path + ".missing", 80, 24))


class ConsoleSocketTests(TestCase):
    """The listener, against a fake runc in a thread (Python's send_fds)."""

    timeout = 10

    def setUp(self) -> None:
        # trial's temporary directories are too deep for sun_path.
        self.dir = tempfile.mkdtemp(prefix="shimd-test-", dir="/tmp")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.console = ConsoleSocket(reactor, self.dir)
        self.path = self.console.listen()
        self.addCleanup(self.console.close)

    def fakeRunc(self, fds: list[int], payload: bytes = b"/dev/ptmx", close: bool = True) -> Deferred[None]:
        """Connect and send C{fds} from a thread, as runc init does."""
        done: Deferred[None] = Deferred()

        def run() -> None:
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.connect(self.path)
                    if fds:
                        socket.send_fds(s, [payload], fds)
                    if not close:
                        s.recv(1)  # until the shim closes the connection
                reactor.callFromThread(done.callback, None)
            except BaseException as e:
                reactor.callFromThread(done.errback, e)

        threading.Thread(target=run, daemon=True).start()
        return done

    def test_shortPrivatePath(self) -> None:
        self.assertLess(len(self.path), 108)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.dirname(self.path)).st_mode), 0o700)

    def test_defaultPathIsShort(self) -> None:
        console = ConsoleSocket(reactor)
        path = console.listen()
        self.addCleanup(console.close)
        self.assertLessEqual(len(path), 32 if path.startswith("/run/") else 107)

    @inlineCallbacks
    def test_receivesMaster(self):  # type: ignore[no-untyped-def]
        master, slave = openPty(self)
        yield self.fakeRunc([master], close=False)  # the shim closes the connection (B24)
        fd = yield self.console.receive()
        self.addCleanup(os.close, fd)
        self.assertTrue(os.isatty(fd))
        self.assertFalse(os.get_inheritable(fd), "FD_CLOEXEC must be set on the received fd")
        setWindowSize(fd, 200, 50)
        self.assertEqual(windowSize(slave), (200, 50))
        yield deferLater(reactor, 0.05, lambda: None)
        self.assertFalse(os.path.exists(self.path), "the socket is removed once used")
        self.assertFalse(os.path.exists(os.path.dirname(self.path)))

    @inlineCallbacks
    def test_receiveBeforeArrival(self):  # type: ignore[no-untyped-def]
        master, slave = openPty(self)
        d = self.console.receive()
        self.assertNoResult(d)
        yield self.fakeRunc([master])
        fd = yield d
        os.close(fd)

    @inlineCallbacks
    def test_extraFdsClosed(self):  # type: ignore[no-untyped-def]
        master, slave = openPty(self)
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        before = openFds()
        yield self.fakeRunc([master, r])
        fd = yield self.console.receive()
        yield deferLater(reactor, 0.05, lambda: None)
        pipe = os.readlink(f"/proc/self/fd/{r}")
        extra = {n: os.readlink(f"/proc/self/fd/{n}") for n in openFds() - before - {fd}}
        self.assertNotIn(pipe, extra.values(), "the extra fd must be closed")
        self.assertFalse([n for n in extra.values() if n.startswith("socket:")], "the connection must be closed")
        os.close(fd)

    @inlineCallbacks
    def test_notATerminal(self):  # type: ignore[no-untyped-def]
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        yield self.fakeRunc([r])
        e = yield self.assertFailure(self.console.receive(), ConsoleError)
        self.assertIn("not a terminal", str(e))

    @inlineCallbacks
    def test_noFd(self):  # type: ignore[no-untyped-def]
        d = self.console.receive()
        yield self.fakeRunc([])
        e = yield self.assertFailure(d, ConsoleError)
        self.assertIn("without sending a terminal", str(e))

    @inlineCallbacks
    def test_closeRemovesSocket(self):  # type: ignore[no-untyped-def]
        d = self.console.receive()
        self.console.close()
        yield self.assertFailure(d, ConsoleError)
        yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(os.listdir(self.dir), [])

    @inlineCallbacks
    def test_closeClosesUntakenMaster(self):  # type: ignore[no-untyped-def]
        master, slave = openPty(self)
        before = openFds()
        yield self.fakeRunc([master])
        yield deferLater(reactor, 0.1, lambda: None)
        ttys = [n for n in openFds() - before if os.isatty(n)]
        self.assertEqual(len(ttys), 1)
        self.console.close()
        self.assertFalse([n for n in openFds() - before if os.isatty(n)])


class TerminalInputTests(SynchronousTestCase):
    """Input goes to a duplicate of the master: a write error never closes the master (B23)."""

    def test_writeErrorKeepsMaster(self) -> None:
        master, slave = openPty(self)
        clock = Clock()
        memory = MemoryReactorClock()
        stream = OutputStream(memory, clock, "stdout", -1, eioIsEOF=True)
        stdin = StdinPipe(memory, clock, None, waitForTarget=True)
        stream.setSource(master)
        dup = os.dup(master)
        stdin.setTarget(dup, watchReader=False)
        assert stdin.writer is not None
        self.assertNotIn(stdin.writer, memory.readers, "the master is readable with output: no read hack")
        # Make writes to the input descriptor fail (EPIPE), whatever the
        # pty would do.
        r, w = os.pipe()
        os.close(r)
        os.dup2(w, dup)
        os.close(w)
        stdin.write(b"x" * 10)
        clock.advance(0)
        self.assertIsNone(stdin.writer)
        self.assertEqual(stream.reader.fd, master)
        os.fstat(master)  # still open
        stream.reader.close()

    def test_sourcesWaitForTarget(self) -> None:
        """Input that arrives before the master is kept in its FIFO, not dropped."""
        memory = MemoryReactorClock()
        stdin = StdinPipe(memory, Clock(), None, waitForTarget=True)
        r, w = os.pipe()
        self.addCleanup(_closeQuietly, w)
        from shimd.fdio import ReadPipe

        source = ReadPipe(memory, r, stdin.write)
        self.addCleanup(source.close)
        stdin.addSource(source)
        self.assertNotIn(source, memory.readers)
        master, slave = openPty(self)
        stdin.setTarget(os.dup(master), watchReader=False)
        self.assertIn(source, memory.readers)
        assert stdin.writer is not None
        stdin.writer.abort()
