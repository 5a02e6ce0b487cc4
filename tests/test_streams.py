"""
The slow/gone policy of output streams, with a fake reactor and clock and
real pipes: a slow reader pauses the source (backpressure), a stalled one
is dropped after the stall timeout, a gone one at once; the drain gives up
after an idle period.
"""

from __future__ import annotations

import os

from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from shimd.fdio import WritePipe
from shimd.streams import OutputStream, StdinPipe


class FakeLog:
    def __init__(self) -> None:
        self.records: list[tuple[str, bytes]] = []

    def write(self, stream: str, data: bytes) -> None:
        self.records.append((stream, data))


def pipe(test: SynchronousTestCase) -> tuple[int, int]:
    r, w = os.pipe2(os.O_CLOEXEC)
    for fd in (r, w):
        test.addCleanup(_close, fd)
    return r, w


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def pump(writer: WritePipe) -> None:
    """Do what the reactor would: one doWrite, and tear down on its verdict."""
    why = writer.doWrite()
    if why:
        writer.connectionLost(Failure(why))


def readAll(fd: int) -> bytes:
    os.set_blocking(fd, False)
    out = b""
    while True:
        try:
            chunk = os.read(fd, 1 << 20)
        except BlockingIOError:
            return out
        if not chunk:
            return out
        out += chunk


class OutputStreamTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.log = FakeLog()
        self.source, self.container = pipe(self)
        self.stream = OutputStream(self.reactor, self.reactor, "stdout", self.source, self.log, stallTimeout=10)

    def sink(self) -> tuple[WritePipe, int]:
        r, w = pipe(self)
        writer = WritePipe(self.reactor, w, self.reactor)
        self.stream.addSink(writer, f"sink{w}")
        return writer, r

    def feed(self, data: bytes) -> None:
        os.write(self.container, data)
        self.stream.reader.doRead()

    def test_fanOut(self) -> None:
        """Every sink and the log get the bytes, unchanged."""
        (_, a), (_, b) = self.sink(), self.sink()
        self.feed(b"\xff\x00hello\n")
        self.assertEqual(readAll(a), b"\xff\x00hello\n")
        self.assertEqual(readAll(b), b"\xff\x00hello\n")
        self.assertEqual(self.log.records, [("stdout", b"\xff\x00hello\n")])

    def test_slowReaderPausesSource(self) -> None:
        """Over the high-water mark the source stops; once drained it resumes; no byte lost."""
        writer, r = self.sink()
        self.assertIn(self.stream.reader, self.reactor.getReaders())
        chunk = b"x" * 65536
        sent = 0
        while self.stream.reader in self.reactor.getReaders():
            self.feed(chunk)
            sent += len(chunk)
            self.assertLess(sent, 10 << 20, "never paused")
        self.assertGreater(writer.pending(), 0)
        got = b""
        while writer.pending():
            got += readAll(r)
            writer.doWrite()
        got += readAll(r)
        self.assertEqual(len(got), sent)
        self.assertIn(self.stream.reader, self.reactor.getReaders())
        self.assertEqual(self.stream.sinkCount(), 1)

    def test_stalledReaderDropped(self) -> None:
        """No progress for the stall timeout: dropped; the source resumes for the others."""
        writer, r = self.sink()
        _, other = self.sink()
        while self.stream.reader in self.reactor.getReaders():
            self.feed(b"y" * 65536)
            readAll(other)
        self.reactor.advance(9.9)
        self.assertEqual(self.stream.sinkCount(), 2)
        self.reactor.advance(0.2)
        self.assertEqual(self.stream.sinkCount(), 1)
        self.assertEqual(writer.fd, -1)
        self.assertIn(self.stream.reader, self.reactor.getReaders())
        self.feed(b"after\n")
        self.assertTrue(readAll(other).endswith(b"after\n"))

    def test_progressIsNotAStall(self) -> None:
        """A reader that keeps making progress, however slowly, is kept."""
        writer, r = self.sink()
        while self.stream.reader in self.reactor.getReaders():
            self.feed(b"z" * 65536)
        for _ in range(5):
            self.reactor.advance(8)
            os.read(r, 4096)
            writer.doWrite()
        self.assertEqual(self.stream.sinkCount(), 1)
        self.assertNotEqual(writer.fd, -1)

    def test_goneReaderDropped(self) -> None:
        """EPIPE: dropped at once, not after a timeout; the log still gets everything."""
        writer, r = self.sink()
        os.close(r)
        self.feed(b"one\n")
        self.reactor.advance(0)
        self.assertEqual(self.stream.sinkCount(), 0)
        self.feed(b"two\n")
        self.assertEqual(self.log.records, [("stdout", b"one\n"), ("stdout", b"two\n")])

    def test_drainGivesUpWhenIdle(self) -> None:
        d = self.stream.drain(2.0)
        self.reactor.advance(1.5)
        self.feed(b"late\n")
        self.reactor.advance(1.5)
        self.assertNoResult(d)
        self.reactor.advance(0.6)
        self.successResultOf(d)
        self.assertEqual(self.stream.reader.fd, -1)

    def test_lateDrainTimerReadsFirst(self) -> None:
        """
        A drain timer that fires late (the shim was starved) with output
        waiting reads it instead of giving up on it.
        """
        _, r = self.sink()
        d = self.stream.drain(2.0)
        os.write(self.container, b"waiting\n")  # the reactor has not read it yet
        self.reactor.advance(2.1)
        self.assertNoResult(d)
        self.assertEqual(readAll(r), b"waiting\n")
        self.reactor.advance(2.1)
        self.successResultOf(d)

    def test_drainEndsAtEOF(self) -> None:
        d = self.stream.drain(2.0)
        os.close(self.container)
        self.stream.reader.doRead()  # b"" -> CONNECTION_DONE is the reactor's job; emulate it
        self.stream.reader.close()
        self.successResultOf(d)

    def test_finishFlushesThenCloses(self) -> None:
        writer, r = self.sink()
        self.feed(b"bye\n")
        d = self.stream.finish()
        self.assertNoResult(d)
        pump(writer)
        self.successResultOf(d)
        self.assertEqual(readAll(r), b"bye\n")
        self.assertEqual(writer.fd, -1)


class StdinPipeTests(SynchronousTestCase):
    def test_closeIsEndOfInput(self) -> None:
        reactor = MemoryReactorClock()
        r, w = pipe(self)
        stdin = StdinPipe(reactor, reactor, w)
        stdin.write(b"hello\n")
        writer = stdin.writer
        assert writer is not None
        stdin.close()
        pump(writer)
        self.assertEqual(readAll(r), b"hello\n")
        self.assertEqual(os.read(r, 10), b"")

    def test_containerClosedStdin(self) -> None:
        """Input for a container that closed its stdin is discarded, not an error."""
        reactor = MemoryReactorClock()
        r, w = pipe(self)
        stdin = StdinPipe(reactor, reactor, w)
        os.close(r)
        stdin.write(b"x")
        reactor.advance(0)
        self.assertIsNone(stdin.writer)
        stdin.write(b"more")
