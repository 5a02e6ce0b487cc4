"""
The slow/gone policy of output streams, with a fake reactor and clock and
real pipes: a slow reader pauses the source (backpressure), a stalled one
is dropped after the stall timeout, a gone one at once; the drain gives up
after an idle period.
"""

from __future__ import annotations

import fcntl
import os
import socket

from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from shimd import fdio
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


def numbered(start: int, count: int) -> bytes:
    """C{count} bytes that differ at every offset (a lost, doubled or swapped piece shows)."""
    lines = b"".join(b"%015d\n" % i for i in range(start // 16, (start + count) // 16 + 2))
    return lines[start % 16 : start % 16 + count]


class OutputStreamTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.log = FakeLog()
        self.source, self.container = pipe(self)
        fcntl.fcntl(self.source, fcntl.F_SETPIPE_SZ, 1 << 20)
        self.stream = OutputStream(self.reactor, self.reactor, "stdout", self.source, self.log, stallTimeout=10)
        # These tests tell a paused source by its absence from the
        # reactor's readers, which a gather pause would fake.
        self.assertEqual(self.stream.reader.gather, fdio.GATHER)
        self.stream.reader.gather = 0.0
        self.teed: list[int | str] = []
        realTee = fdio.tee

        def countingTee(fdIn: int, fdOut: int, length: int) -> int:
            try:
                n = realTee(fdIn, fdOut, length)
            except OSError as e:
                self.teed.append(os.strerror(e.errno or 0))
                raise
            self.teed.append(n)
            return n

        self.patch(fdio, "tee", countingTee)

    def teedBytes(self) -> int:
        return sum(n for n in self.teed if isinstance(n, int))

    def sink(self, size: int | None = None) -> tuple[WritePipe, int]:
        """A sink on a pipe of C{size} bytes (the default: 64 KiB)."""
        r, w = pipe(self)
        if size is not None:
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, size)
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

    def test_fanOutByTee(self) -> None:
        """
        A sink with nothing queued gets the pipe's bytes by tee(2), not by
        a write, and gets them once.
        """
        writer, r = self.sink()
        data = numbered(0, 3000)
        written: list[bytes] = []
        realWrite = writer.writeSomeData
        writer.writeSomeData = lambda d: (written.append(d), realWrite(d))[1]  # type: ignore[method-assign]
        self.feed(data)
        self.assertEqual(self.teedBytes(), 3000)
        self.assertEqual(written, [])
        self.assertEqual(readAll(r), data)
        self.assertEqual(self.log.records, [("stdout", data)])

    def test_logBeforeSinks(self) -> None:
        """No sink sees a byte before the log has it; the staging pipe is closed at the end."""
        _, r = self.sink()
        seen: list[bytes] = []

        class CheckingLog:
            def write(self, stream: str, data: bytes) -> None:
                seen.append(readAll(r))

        self.stream._containerLog = CheckingLog()
        self.feed(b"first\n")
        self.assertEqual(seen, [b""])
        self.assertEqual(readAll(r), b"first\n")
        self.assertGreater(self.teedBytes(), 0)
        self.stream.reader.close()
        self.assertIsNone(self.stream._stage)

    def test_teeAndWriteMixed(self) -> None:
        """
        A sink that gets some chunks by tee, one partly by tee (its pipe
        filled up) and partly queued, and some by write (while its queue is
        not empty) receives every byte once, in order.
        """
        page = 4096
        writer, r = self.sink(size=4 * page)  # four pipe buffers
        sent = b""

        def send(n: int) -> None:
            nonlocal sent
            data = numbered(len(sent), n)
            sent += data
            self.feed(data)

        send(2 * page)  # all by tee: two of four buffers used
        self.assertEqual(self.teedBytes(), 2 * page)
        send(3 * page)  # two pages by tee (the pipe is then full), one queued
        self.assertEqual(self.teedBytes(), 4 * page)
        self.assertEqual(writer.pending(), page)
        got = readAll(r)  # room in the pipe again, but a page still queued:
        send(1000)  # no tee (it would overtake the queue), appended to the queue
        self.assertEqual(self.teedBytes(), 4 * page)
        self.assertEqual(writer.pending(), page + 1000)
        pump(writer)
        self.assertEqual(writer.pending(), 0)
        send(page + 7)  # the queue is empty again: by tee
        self.assertEqual(self.teedBytes(), 5 * page + 7)
        got += readAll(r)
        self.assertEqual(len(got), len(sent))
        self.assertEqual(got, sent)
        self.assertEqual(b"".join(d for _, d in self.log.records), sent)

    def test_fullSinkTeesNothing(self) -> None:
        """
        A sink whose pipe is full gets no tee; the chunk is queued whole
        and delivered, in order, once the reader catches up.  The other
        sink is not held back.
        """
        page = 4096
        full, r = self.sink(size=page)
        other, o = self.sink()
        first = numbered(0, page)
        self.feed(first)
        second = numbered(page, 2 * page)
        self.feed(second)
        self.assertEqual(full.pending(), 2 * page)
        self.assertEqual([n for n in self.teed if n], [page, page, 2 * page])
        self.assertEqual(readAll(o), first + second)
        got = readAll(r)
        while full.pending():
            pump(full)
            got += readAll(r)
        self.assertEqual(got, first + second)

    def test_goneReaderByTee(self) -> None:
        """
        tee's EPIPE drops a sink whose reader is gone, at once; the other
        sink and the log get every byte.
        """
        gone, r = self.sink()
        _, other = self.sink()
        os.close(r)
        self.feed(b"one\n")
        self.assertIn("Broken pipe", self.teed)
        self.assertFalse(gone.connected)
        self.reactor.advance(0)
        self.assertEqual(self.stream.sinkCount(), 1)
        self.assertEqual(gone.fd, -1)
        self.feed(b"two\n")
        self.assertEqual(readAll(other), b"one\ntwo\n")
        self.assertEqual(self.log.records, [("stdout", b"one\n"), ("stdout", b"two\n")])

    def test_socketSinkByWrite(self) -> None:
        """A sink that is not a pipe gets its bytes by write."""
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        writer = WritePipe(self.reactor, os.dup(a.fileno()), self.reactor)
        self.addCleanup(writer.abort)
        self.stream.addSink(writer, "socket")
        _, r = self.sink()
        self.feed(b"both\n")
        self.assertEqual(b.recv(100), b"both\n")
        self.assertEqual(readAll(r), b"both\n")
        self.assertEqual(self.teedBytes(), 5)

    def test_ptySourceByWrite(self) -> None:
        """A source that is not a pipe (a pty master) is copied by write."""
        master, slave = os.openpty()
        self.addCleanup(_close, slave)
        stream = OutputStream(self.reactor, self.reactor, "stdout", -1, self.log, eioIsEOF=True)
        r, w = pipe(self)
        stream.addSink(WritePipe(self.reactor, w, self.reactor), "fifo")
        stream.setSource(master)
        self.addCleanup(stream.reader.close)
        os.write(slave, b"tty")
        stream.reader.doRead()
        self.assertEqual(readAll(r), b"tty")
        self.assertEqual(self.teed, [])
        # Nor does it pause after a burst: a pty's small buffer would
        # stall the writer.
        self.assertEqual(stream.reader.gather, 0.0)

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
