"""
L{shimd.fdio.ReadPipe} reads a burst in one wake-up: while reads come back
large it reads again at once, a few times at most, and stops as soon as
it is told to stop reading.
"""

from __future__ import annotations

import fcntl
import os

from twisted.internet import main
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from shimd.fdio import BURST_MIN, READ_BURST, ReadPipe


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
