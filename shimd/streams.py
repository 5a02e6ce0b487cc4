# -*- test-case-name: tests.test_streams -*-
"""
Container streams: one output stream fanned out to many sinks, and many
input sources fanned in to the container's stdin.

The policy for output sinks (engine FIFOs, attach sessions):

 - A slow reader gets every byte.  When a sink has more than its high-water
   mark queued, the stream stops reading the container's pipe
   (backpressure); the container blocks in C{write()} until the sink drains.
 - A reader that is gone (C{EPIPE}, or the kernel reporting no reader) is
   dropped at once; a reader that makes no progress at all for
   C{stallTimeout} seconds while data is queued for it is dropped too.  The
   rest carry on.  C{EAGAIN} is never "gone".
 - The json-file log is written synchronously and never dropped.

Each chunk is read once, and written to the log before any sink sees it.  A
sink that is a pipe and has nothing queued gets it by C{tee(2)} (the kernel
shares the pages: no copy, and no write), from a staging pipe the chunk was
teed into before the read; the others get it by write.  Either way a sink
gets the same bytes in the same order.
"""

from __future__ import annotations

import fcntl
import os
from typing import Protocol

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorFDSet, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer
from twisted.internet.interfaces import IPushProducer

from shimd.fdio import GATHER, SPLICE_F_NONBLOCK, ReadPipe, WritePipe, isPipe, setNonBlocking, tee


class StreamLog(Protocol):
    """What a stream needs of the container log."""

    def write(self, stream: str, data: bytes) -> None:
        ...


@implementer(IPushProducer)
class _SinkFlow:
    """The producer a stream registers on each sink's writer."""

    def __init__(self, stream: OutputStream, sink: WritePipe) -> None:
        self._stream = stream
        self._sink = sink

    def pauseProducing(self) -> None:
        self._stream._sinkPaused(self._sink)

    def resumeProducing(self) -> None:
        self._stream._sinkResumed(self._sink)

    def stopProducing(self) -> None:
        # The writer's own C{lost} callback reports the loss.
        pass


class OutputStream:
    """
    One output stream of the container (C{stdout} or C{stderr}, or the pty).

    @ivar name: C{"stdout"} or C{"stderr"}: the stream name in the log.
    @ivar ended: fires when the container's side reached end of file (or
        the stream was closed).

    With C{fd=-1} the stream exists (sinks can be added) before its
    descriptor does; L{setSource} gives it one (the pty master).
    """

    _log = Logger()

    def __init__(
        self,
        reactor: IReactorFDSet,
        clock: IReactorTime,
        name: str,
        fd: int,
        log: StreamLog | None = None,
        stallTimeout: float = 10.0,
        eioIsEOF: bool = False,
    ) -> None:
        self.name = name
        self._clock = clock
        self._containerLog = log
        self._stallTimeout = stallTimeout
        self._sinks: dict[WritePipe, str] = {}
        self._teeSource = fd >= 0 and isPipe(fd)
        self._stage: tuple[int, int] | None = None
        self._null = -1
        self._staged = 0
        self._paused: set[WritePipe] = set()
        self._closing: dict[WritePipe, Deferred[None]] = {}
        self._stallTimer: IDelayedCall | None = None
        self._drainTimer: IDelayedCall | None = None
        self._drainIdle = 0.0
        self._chunks = 0
        self._finished = False
        self.ended: Deferred[None] = Deferred()
        self.reader = ReadPipe(reactor, fd, self._dataReceived, self._eof, eioIsEOF, read=self._read,
                               gather=GATHER if self._teeSource else 0.0)
        if fd >= 0:
            self.reader.startReading()

    def setSource(self, fd: int) -> None:
        """Start reading C{fd}, for a stream made with C{fd=-1}."""
        assert self.reader.fd < 0 and not self.ended.called
        setNonBlocking(fd)
        self.reader.fd = fd
        self._teeSource = isPipe(fd)
        self.reader.gather = GATHER if self._teeSource else 0.0
        if not self._paused:
            self.reader.startReading()

    # -- sinks ---------------------------------------------------------

    def addSink(self, writer: WritePipe, label: str) -> None:
        """
        Copy everything from now on to C{writer}.

        @param label: names the sink in the shim log.
        """
        self._sinks[writer] = label
        previous = writer.lost

        def lost(reason: Failure) -> None:
            previous(reason)
            self._sinkLost(writer, reason)

        writer.lost = lost
        writer.registerProducer(_SinkFlow(self, writer), True)

    def removeSink(self, writer: WritePipe) -> None:
        """Stop copying to C{writer} (it is not closed)."""
        self._sinks.pop(writer, None)
        if writer.producer is not None:
            writer.unregisterProducer()
        self._sinkResumed(writer)

    def sinkCount(self) -> int:
        return len(self._sinks)

    def _sinkPaused(self, writer: WritePipe) -> None:
        self._paused.add(writer)
        if self._drainTimer is not None and self._drainTimer.active():
            self._drainTimer.cancel()
            self._drainTimer = None
        self.reader.stopReading()
        self._armStallTimer()

    def _sinkResumed(self, writer: WritePipe) -> None:
        self._paused.discard(writer)
        if not self._paused and self.reader.fd >= 0:
            self.reader.startReading()
            self._armDrainTimer()

    def _sinkLost(self, writer: WritePipe, reason: Failure) -> None:
        label = self._sinks.pop(writer, None)
        closing = self._closing.pop(writer, None)
        if closing is not None:
            closing.callback(None)
        elif label is not None:
            self._log.warn(
                "{stream} reader {label} is gone ({why}); dropped it",
                stream=self.name,
                label=label,
                why=reason.getErrorMessage(),
            )
        self._sinkResumed(writer)

    # -- stall policy ----------------------------------------------------

    def _armStallTimer(self) -> None:
        if self._stallTimer is not None and self._stallTimer.active():
            return
        waiting = [w.lastProgress for w in self._sinks if w.pending()]
        if not waiting:
            return
        delay = max(0.0, min(waiting) + self._stallTimeout - self._clock.seconds())
        self._stallTimer = self._clock.callLater(delay, self._checkStalls)

    def _checkStalls(self) -> None:
        self._stallTimer = None
        now = self._clock.seconds()
        for writer, label in list(self._sinks.items()):
            if writer.pending() and now - writer.lastProgress >= self._stallTimeout:
                self._log.warn(
                    "{stream} reader {label} made no progress for {timeout}s "
                    "with {pending} bytes queued; dropped it",
                    stream=self.name,
                    label=label,
                    timeout=self._stallTimeout,
                    pending=writer.pending(),
                )
                self._sinks.pop(writer, None)
                writer.abort()
        self._armStallTimer()

    # -- data ------------------------------------------------------------

    def _read(self, fd: int, size: int) -> bytes:
        # Zero-copy fan-out, in two steps so that no sink sees a byte
        # before the log has it.  Here, before the read: tee(2) what the
        # pipe holds into our staging pipe (the kernel shares the pages).
        # The read that follows returns at least that much (we are the
        # pipe's only reader, tee duplicates from its front, and a
        # non-blocking pipe read returns all it holds up to size).
        # _dataReceived then writes the log, tees the staged bytes on to
        # each sink and writes it only the part it did not get.
        self._staged = 0
        if self._teeSource and self._sinks:
            try:
                if self._stage is None:
                    self._stage = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
                    fcntl.fcntl(self._stage[1], fcntl.F_SETPIPE_SZ, 2 * size)
                    self._null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
                self._staged = tee(fd, self._stage[1], size)
            except OSError:
                self._teeSource = False  # the write path, as for a pty
                self._closeStage()
        return os.read(fd, size)

    def _dataReceived(self, data: bytes) -> None:
        self._chunks += 1
        if self._containerLog is not None:
            self._containerLog.write(self.name, data)
        queued = False
        staged, self._staged = self._staged, 0
        stage = self._stage[0] if self._stage is not None else -1
        for writer in list(self._sinks):
            # A sink with bytes queued, or that is not a pipe, gets no tee.
            n = writer.teeFrom(stage, staged) if staged else 0
            writer.write(data[n:] if n else data)
            queued = queued or writer.pending() > 0
        if staged:
            self._unstage(staged)
        if queued:
            self._armStallTimer()
        if self._drainTimer is not None and self._drainTimer.active():
            self._drainTimer.reset(self._drainIdle)

    def _unstage(self, count: int) -> None:
        """Discard the staged bytes (spliced to /dev/null: not copied)."""
        assert self._stage is not None
        try:
            while count > 0:
                moved = os.splice(self._stage[0], self._null, count, flags=SPLICE_F_NONBLOCK)
                if moved <= 0:
                    break
                count -= moved
        except OSError:
            pass
        if count > 0:  # never; but the stage must be empty for the next chunk
            self._teeSource = False
            self._closeStage()

    def _closeStage(self) -> None:
        for fd in (*(self._stage or ()), self._null):
            if fd >= 0:
                os.close(fd)
        self._stage = None
        self._null = -1

    def _eof(self, reason: Failure) -> None:
        self._closeStage()
        if self._drainTimer is not None and self._drainTimer.active():
            self._drainTimer.cancel()
        self._drainTimer = None
        if not self.ended.called:
            self.ended.callback(None)

    # -- ending ------------------------------------------------------------

    def drain(self, idleTimeout: float) -> Deferred[None]:
        """
        Wait for end of file, but give up after C{idleTimeout} seconds in
        which the pipe gave nothing while we were reading it (a background
        process may hold the pipe open for ever).  Time spent paused by a
        slow sink does not count: the stall policy bounds that.
        """
        if self.ended.called:
            return succeed(None)
        self._drainIdle = idleTimeout
        self._armDrainTimer()
        d: Deferred[None] = Deferred()
        self.ended.addBoth(lambda r: d.callback(None))
        return d

    def _armDrainTimer(self) -> None:
        if self._drainIdle <= 0 or self.ended.called or self._paused:
            return
        if self._drainTimer is not None and self._drainTimer.active():
            self._drainTimer.reset(self._drainIdle)
        else:
            self._drainTimer = self._clock.callLater(self._drainIdle, self._drainTimedOut)

    def _drainTimedOut(self) -> None:
        self._drainTimer = None
        # A timer can fire late, after this whole process was starved of CPU,
        # with output waiting that the reactor has not read yet (timed calls
        # run before the poll): read what is there before giving up.
        if self.reader.fd >= 0 and not self._paused:
            before = self._chunks
            why = self.reader.doRead()
            if why is not None:
                self.reader.close()  # end of file after all
                return
            if self._chunks != before:
                self._armDrainTimer()
                return
        self._log.info(
            "{stream}: no end of file {idle}s after the process exited "
            "(a background process holds the pipe); stopped reading it",
            stream=self.name,
            idle=self._drainIdle,
        )
        self.reader.close()

    def finish(self) -> Deferred[None]:
        """
        Stop reading, flush what is queued to every sink and close them.

        Fires when every sink is closed or dropped (a stalled sink is dropped
        after the stall timeout, so this always ends).
        """
        self._finished = True
        self.reader.close()
        waits = []
        for writer in list(self._sinks):
            d: Deferred[None] = Deferred()
            self._closing[writer] = d
            waits.append(d)
            if writer.producer is not None:
                writer.unregisterProducer()
            writer.loseConnection()
        self._armStallTimer()
        return gatherResults(waits).addCallback(lambda _: None)


@implementer(IPushProducer)
class StdinPipe:
    """
    The container's stdin: one writer, any number of sources.

    Sources are readers whose data is forwarded here.  When the writer's
    queue is full, every source stops reading (backpressure to whoever
    writes to it); when it drains, they resume.  If the container closes its
    stdin, input is discarded.

    With C{fd=None} and C{waitForTarget}, sources are paused until
    L{setTarget} gives the container's stdin (the pty master comes late).
    """

    _log = Logger()

    def __init__(
        self, reactor: IReactorFDSet, clock: IReactorTime, fd: int | None, waitForTarget: bool = False
    ) -> None:
        self._reactor = reactor
        self._clock = clock
        self._sources: set[ReadPipe] = set()
        self._paused = waitForTarget and fd is None
        self._closed = False
        self.writer: WritePipe | None = None
        if fd is not None:
            self.setTarget(fd)

    def setTarget(self, fd: int, watchReader: bool = True) -> None:
        """
        Write to C{fd} from now on (it is closed with the writer).

        @param watchReader: C{False} for a pty master, which is readable
            whenever the container wrote output.
        """
        if self._closed:
            os.close(fd)
            return
        self.writer = WritePipe(self._reactor, fd, self._clock, lost=self._writerLost, watchReader=watchReader)
        self.writer.registerProducer(self, True)
        self.resumeProducing()

    def addSource(self, reader: ReadPipe) -> None:
        self._sources.add(reader)
        if not self._paused:
            reader.startReading()

    def removeSource(self, reader: ReadPipe) -> None:
        self._sources.discard(reader)

    def write(self, data: bytes) -> None:
        if self.writer is not None:
            self.writer.write(data)

    def close(self) -> None:
        """End of input: flush what is queued, then close the container's stdin."""
        self._closed = True
        if self.writer is not None:
            writer, self.writer = self.writer, None
            if writer.producer is not None:
                writer.unregisterProducer()
            writer.loseConnection()
        self.resumeProducing()

    def _writerLost(self, reason: Failure) -> None:
        if self.writer is not None:
            self._log.info("the container closed its stdin; input is discarded")
        self.writer = None
        self.resumeProducing()

    def pauseProducing(self) -> None:
        self._paused = True
        for source in self._sources:
            source.stopReading()

    def resumeProducing(self) -> None:
        self._paused = False
        for source in self._sources:
            if source.fd >= 0:
                source.startReading()

    def stopProducing(self) -> None:
        pass
