"""
L{shimd.fdio.ReadPipe} reads a burst in one wake-up: while reads come back
large it reads again at once, a few times at most, and stops as soon as
it is told to stop reading.
"""

from __future__ import annotations

import fcntl
import os

import errno
import select
import socket

from twisted.internet import main
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from shimd.fdio import BURST_MIN, READ_BURST, NapTimer, ReadPipe, WritePipe, tee


class ReadBurstTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        r, self.w = os.pipe2(os.O_CLOEXEC)
        self.addCleanup(os.close, self.w)
        fcntl.fcntl(r, fcntl.F_SETPIPE_SZ, 1 << 20)
        self.chunks: list[bytes] = []
        self.reader = ReadPipe(self.reactor, r, self.chunks.append, chunkSize=BURST_MIN)
        self.addCleanup(self.reader.close)
        self.reader.startReading()

    def writeOnFirstChunk(self, more: bytes) -> None:
        """Make the container write C{more} while the first chunk is handled."""

        def received(data: bytes) -> None:
            if not self.chunks:
                os.write(self.w, more)
            self.chunks.append(data)

        self.reader._dataReceived = received

    def test_smallReadOnce(self) -> None:
        """A read smaller than BURST_MIN ends the wake-up (interactive output)."""
        self.writeOnFirstChunk(b"b")
        os.write(self.w, b"a" * 100)
        self.assertIsNone(self.reader.doRead())
        self.assertEqual(self.chunks, [b"a" * 100])

    def test_largeReadThenWhatArrived(self) -> None:
        """After a large read, what arrived meanwhile is read in the same wake-up."""
        self.writeOnFirstChunk(b"b" * 10)
        os.write(self.w, b"a" * BURST_MIN)
        self.assertIsNone(self.reader.doRead())
        self.assertEqual(self.chunks, [b"a" * BURST_MIN, b"b" * 10])

    def test_burstReadAgain(self) -> None:
        """Large reads are followed by more reads in the same wake-up, READ_BURST at most."""
        os.write(self.w, b"x" * (BURST_MIN * (READ_BURST + 2)))
        self.assertIsNone(self.reader.doRead())
        self.assertEqual(len(self.chunks), READ_BURST)
        self.reader.doRead()
        self.assertEqual(len(self.chunks), READ_BURST + 2)

    def test_stopReadingEndsTheBurst(self) -> None:
        """A callback that stops reading (backpressure) gets no further chunk."""
        self.reader._dataReceived = lambda data: (self.chunks.append(data), self.reader.stopReading())
        os.write(self.w, b"y" * (BURST_MIN * 3))
        self.reader.doRead()
        self.assertEqual(self.chunks, [b"y" * BURST_MIN])
        self.assertNotIn(self.reader, self.reactor.getReaders())

    def test_endOfFileAfterBurst(self) -> None:
        """End of file met within a burst is reported after the data."""
        os.write(self.w, b"z" * (BURST_MIN * 2))
        os.close(self.w)
        self.w = os.open("/dev/null", os.O_WRONLY | os.O_CLOEXEC)
        self.assertIs(self.reader.doRead(), main.CONNECTION_DONE)
        self.assertEqual(b"".join(self.chunks), b"z" * (BURST_MIN * 2))


class HangUpTests(SynchronousTestCase):
    """
    The reactor takes C{HUP} without C{IN} for a clean end and ends the
    reader without a read; a pty master reports just that while its last
    bytes are on their way (C8: the end of C{seq} went missing).
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        r, self.w = os.pipe2(os.O_CLOEXEC)
        self.chunks: list[bytes] = []
        self.ends: list[Failure] = []
        self.reader = ReadPipe(self.reactor, r, self.chunks.append, self.ends.append, chunkSize=BURST_MIN)
        self.reader.startReading()

    def test_hangUpReadsWhatIsLeft(self) -> None:
        """Ended by the reactor on a hang-up, the reader first reads to end of file."""
        os.write(self.w, b"tail" * BURST_MIN)
        os.close(self.w)
        self.reader.connectionLost(Failure(ConnectionDone()))  # as posixbase does on HUP
        self.assertEqual(b"".join(self.chunks), b"tail" * BURST_MIN)
        self.assertEqual(len(self.ends), 1)
        self.assertEqual(self.reader.fd, -1)

    def test_closeReadsNothing(self) -> None:
        """close() is ours: stop now, whatever is left."""
        os.write(self.w, b"left")
        self.addCleanup(os.close, self.w)
        self.reader.close()
        self.assertEqual(self.chunks, [])
        self.assertEqual(len(self.ends), 1)

    def test_lostReadsNothing(self) -> None:
        """A read error (ConnectionLost) is not a hang-up: no further read."""
        os.write(self.w, b"left")
        self.addCleanup(os.close, self.w)
        self.reader.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.chunks, [])

    def test_endOfFileReadOnce(self) -> None:
        """After doRead met end of file itself, the loss reads no more."""
        os.write(self.w, b"all")
        os.close(self.w)
        self.assertIsNone(self.reader.doRead())
        self.assertIs(self.reader.doRead(), main.CONNECTION_DONE)
        calls = []
        self.reader._read = lambda fd, n: calls.append(fd) or b""  # type: ignore[method-assign]
        self.reader.connectionLost(Failure(ConnectionDone()))
        self.assertEqual((self.chunks, calls), ([b"all"], []))


def expire(timer: NapTimer) -> None:
    """Wait (1 s at most) for the timerfd to expire, then do what the reactor would."""
    ready, _, _ = select.select([timer.fd], [], [], 1.0)
    assert ready, "the timerfd never expired"
    timer.doRead()


class GatherTests(SynchronousTestCase):
    """
    With C{gather}, a pipe read empty after a streaming burst is left alone
    for a moment, so that the next wake-up reads many writes at once.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        r, self.w = os.pipe2(os.O_CLOEXEC)
        fcntl.fcntl(self.w, fcntl.F_SETPIPE_SZ, 1 << 20)
        self.addCleanup(self.closeWriter)
        self.chunks: list[bytes] = []
        self.reader = ReadPipe(self.reactor, r, self.chunks.append, gather=0.0002)
        self.addCleanup(self.reader.close)
        self.reader.startReading()

    def closeWriter(self) -> None:
        if self.w >= 0:
            os.close(self.w)
            self.w = -1

    def timer(self) -> NapTimer:
        timer = self.reader._timer
        assert timer is not None, "no pause"
        return timer

    def test_streamingBurstPauses(self) -> None:
        """
        After a burst of at least BURST_MIN bytes has emptied the pipe, the
        reader leaves the reactor until the pause is over; what came
        meanwhile is read in one go.
        """
        os.write(self.w, b"a" * BURST_MIN)
        self.assertIsNone(self.reader.doRead())
        self.assertEqual(self.chunks, [b"a" * BURST_MIN])
        self.assertNotIn(self.reader, self.reactor.getReaders())
        self.assertIn(self.timer(), self.reactor.getReaders())
        for _ in range(5):
            os.write(self.w, b"b" * BURST_MIN)
        expire(self.timer())
        self.assertIn(self.reader, self.reactor.getReaders())
        self.reader.doRead()
        self.assertEqual(self.chunks[1:], [b"b" * BURST_MIN * 5])

    def test_smallOutputAtOnce(self) -> None:
        """A prompt or a line: no pause, the pipe stays watched."""
        os.write(self.w, b"$ ")
        self.reader.doRead()
        self.assertEqual(self.chunks, [b"$ "])
        self.assertIn(self.reader, self.reactor.getReaders())
        self.assertIsNone(self.reader._timer)

    def test_noPauseWhileMoreWaits(self) -> None:
        """A burst that did not empty the pipe comes back at once."""
        os.write(self.w, b"c" * (READ_BURST * self.reader.chunkSize + 1))
        self.reader.doRead()
        self.assertEqual(sum(map(len, self.chunks)), READ_BURST * self.reader.chunkSize)
        self.assertIn(self.reader, self.reactor.getReaders())

    def test_stoppedDuringPause(self) -> None:
        """Stopped during a pause (backpressure), the reader stays stopped after it."""
        os.write(self.w, b"d" * BURST_MIN)
        self.reader.doRead()
        self.reader.stopReading()
        expire(self.timer())
        self.assertNotIn(self.reader, self.reactor.getReaders())
        self.reader.startReading()
        self.assertIn(self.reader, self.reactor.getReaders())

    def test_startedDuringPause(self) -> None:
        """Started during a pause, the reader waits for its end."""
        os.write(self.w, b"e" * BURST_MIN)
        self.reader.doRead()
        self.reader.stopReading()
        self.reader.startReading()
        self.assertNotIn(self.reader, self.reactor.getReaders())
        expire(self.timer())
        self.assertIn(self.reader, self.reactor.getReaders())

    def test_endOfFileAfterPause(self) -> None:
        """The writer closing during a pause is end of file after it; nothing lost."""
        os.write(self.w, b"f" * BURST_MIN)
        self.reader.doRead()
        os.write(self.w, b"last")
        self.closeWriter()
        expire(self.timer())
        self.assertIsNone(self.reader.doRead())
        self.assertIs(self.reader.doRead(), main.CONNECTION_DONE)
        self.assertEqual(self.chunks[-1], b"last")

    def test_closeClosesTheTimer(self) -> None:
        """Closing the reader during a pause closes the timerfd too."""
        os.write(self.w, b"g" * BURST_MIN)
        self.reader.doRead()
        timer = self.timer()
        self.reader.close()
        self.assertEqual(timer.fd, -1)
        self.assertNotIn(timer, self.reactor.getReaders())
        self.assertIsNone(self.reader._timer)

    def test_noGatherNoPause(self) -> None:
        """Without gather (the default), a burst never pauses."""
        self.reader.gather = 0.0
        os.write(self.w, b"h" * BURST_MIN)
        self.reader.doRead()
        self.assertIn(self.reader, self.reactor.getReaders())
        self.assertIsNone(self.reader._timer)


class NapTimerTests(SynchronousTestCase):
    def test_firesOnce(self) -> None:
        """Armed, the timer calls back once, then stays quiet."""
        reactor = MemoryReactorClock()
        calls: list[None] = []
        timer = NapTimer(reactor, lambda: calls.append(None))
        self.addCleanup(timer.close)
        self.assertIn(timer, reactor.getReaders())
        timer.arm(0.0001)
        expire(timer)
        self.assertEqual(len(calls), 1)
        timer.doRead()  # a spurious wake-up: nothing to read
        self.assertEqual(len(calls), 1)
        self.assertEqual(select.select([timer.fd], [], [], 0.01)[0], [])


class TeeTests(SynchronousTestCase):
    """L{tee} and L{WritePipe.teeFrom}: duplicate a pipe's bytes into another."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.src, self.srcW = self.pipe()
        self.dst, self.dstW = self.pipe()

    def pipe(self) -> tuple[int, int]:
        r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        for fd in (r, w):
            self.addCleanup(self.close, fd)
        return r, w

    @staticmethod
    def close(fd: int) -> None:
        try:
            os.close(fd)
        except OSError:
            pass

    def test_duplicatesWithoutConsuming(self) -> None:
        os.write(self.srcW, b"abcdef")
        self.assertEqual(tee(self.src, self.dstW, 4), 4)
        self.assertEqual(os.read(self.dst, 100), b"abcd")
        self.assertEqual(os.read(self.src, 100), b"abcdef")

    def test_emptySourceIsZero(self) -> None:
        self.assertEqual(tee(self.src, self.dstW, 100), 0)

    def test_fullTargetIsZero(self) -> None:
        fcntl.fcntl(self.dstW, fcntl.F_SETPIPE_SZ, 4096)
        os.write(self.dstW, b"x")
        os.write(self.srcW, b"y")
        self.assertEqual(tee(self.src, self.dstW, 100), 0)

    def test_goneReaderIsEPIPE(self) -> None:
        os.write(self.srcW, b"y")
        os.close(self.dst)
        e = self.assertRaises(OSError, tee, self.src, self.dstW, 100)
        self.assertEqual(e.errno, errno.EPIPE)

    def test_notAPipeIsEINVAL(self) -> None:
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        os.write(self.srcW, b"y")
        e = self.assertRaises(OSError, tee, self.src, a.fileno(), 100)
        self.assertEqual(e.errno, errno.EINVAL)

    def writer(self) -> tuple[WritePipe, list[Failure]]:
        lost: list[Failure] = []
        writer = WritePipe(self.reactor, self.dstW, self.reactor, lost=lost.append)
        self.addCleanup(writer.abort)
        return writer, lost

    def test_teeFromCountsAsProgress(self) -> None:
        writer, _ = self.writer()
        self.reactor.advance(5)
        os.write(self.srcW, b"abc")
        self.assertEqual(writer.teeFrom(self.src, 100), 3)
        self.assertEqual(writer.lastProgress, 5)

    def test_teeFromNotWithAQueue(self) -> None:
        """Queued bytes go first: no tee while any are queued."""
        writer, _ = self.writer()
        fcntl.fcntl(self.dstW, fcntl.F_SETPIPE_SZ, 4096)
        writer.write(b"q" * 5000)
        self.assertEqual(writer.pending(), 5000 - 4096)
        os.read(self.dst, 4096)  # room in the pipe again
        os.write(self.srcW, b"t")
        self.assertEqual(writer.teeFrom(self.src, 100), 0)
        self.assertRaises(BlockingIOError, os.read, self.dst, 100)

    def test_teeFromGoneReader(self) -> None:
        """EPIPE from tee: the writer is gone (on the next turn, as for a write)."""
        writer, lost = self.writer()
        os.write(self.srcW, b"t")
        os.close(self.dst)
        self.assertEqual(writer.teeFrom(self.src, 100), 0)
        self.assertFalse(writer.connected)
        self.assertEqual(lost, [])
        self.reactor.advance(0)
        self.assertEqual(len(lost), 1)
        self.assertEqual(writer.fd, -1)
        self.assertTrue(writer.teeable)

    def test_notAPipeNotTeeable(self) -> None:
        a, b = socket.socketpair()
        self.addCleanup(b.close)
        writer = WritePipe(self.reactor, a.detach(), self.reactor)
        self.addCleanup(writer.abort)
        self.assertFalse(writer.teeable)
        os.write(self.srcW, b"t")
        self.assertEqual(writer.teeFrom(self.src, 100), 0)
        self.assertEqual(os.read(self.src, 100), b"t")


class ReaderGoneTests(SynchronousTestCase):
    """
    A L{WritePipe} whose reader is gone: the kernel reports C{EPOLLERR},
    which Twisted's epoll reactor passes on as a clean end
    (L{ConnectionDone}) for a descriptor it watches for reading (the read
    hack).  L{WritePipe} reports it as L{ConnectionLost}: only its own
    C{loseConnection} ends it cleanly.
    """

    def setUp(self) -> None:
        from twisted.internet.epollreactor import EPollReactor

        self.reactor = EPollReactor()
        self.addCleanup(self.reactor._poller.close)
        self.addCleanup(self.reactor.waker.connectionLost, None)
        self.addCleanup(self.reactor.removeAll)
        self.r, w = os.pipe2(os.O_CLOEXEC)
        self.lost: list[Failure] = []
        self.writer = WritePipe(self.reactor, w, self.reactor, lost=self.lost.append)
        self.addCleanup(self.writer.abort)

    def closeReader(self) -> None:
        if self.r >= 0:
            os.close(self.r)
            self.r = -1

    def turn(self) -> None:
        """One turn of the real reactor, without waiting."""
        self.reactor.doIteration(0)

    def test_readerGoneIsLost(self) -> None:
        self.addCleanup(self.closeReader)
        self.turn()
        self.assertEqual(self.lost, [])
        self.closeReader()
        self.turn()
        self.assertEqual(len(self.lost), 1)
        self.assertTrue(self.lost[0].check(ConnectionLost), self.lost[0])
        self.assertEqual(self.writer.fd, -1)

    def test_loseConnectionIsDone(self) -> None:
        self.addCleanup(self.closeReader)
        self.writer.write(b"last")
        self.writer.loseConnection()
        self.turn()
        self.assertEqual(len(self.lost), 1)
        self.assertTrue(self.lost[0].check(ConnectionDone), self.lost[0])
        self.assertEqual(os.read(self.r, 10), b"last")

    def test_readerGoneWhileClosing(self) -> None:
        """Gone while we flush to close: it ends once, however the reactor hears of it."""
        fcntl.fcntl(self.writer.fd, fcntl.F_SETPIPE_SZ, 4096)
        self.writer.write(b"q" * 5000)
        self.writer.loseConnection()
        self.closeReader()
        for _ in range(3):
            self.turn()
        self.assertEqual(len(self.lost), 1)
        self.assertEqual(self.writer.fd, -1)
