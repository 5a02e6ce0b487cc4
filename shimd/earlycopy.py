# -*- test-case-name: tests.test_earlycopy -*-
"""
The container's output, copied while Twisted loads.

C{isulad-shim} starts runc before it loads Twisted (L{shimd.launch}), and
the imports take 100 to 150 ms.  A container that writes at once fills its
1 MiB pipe in a few milliseconds and then waits for the shim.  So, once
runc is started, C{isulad-shim} forks a copier (L{startEarlyCopy}): a child
process with nothing of Twisted in it, which copies what the container
writes to the json-file log and to the engine's FIFOs, as the service
would, until the service adopts the launch and stops it
(L{EarlyCopy.stop}).  The copier then hands back what it holds
(L{Leftover}), and the service goes on from there: no byte is lost, none
is written twice, and the log and each FIFO get the bytes in order.

The copier stops by itself, leaving the rest to the service (whose
policies it does not repeat), when:

 - an attach client waits in the attach socket's backlog: a session gets
   the output from its reply on, and the service replies;
 - an engine FIFO's reader is gone: the service drops it (a slow reader
   gets every byte: the copier waits for it, and the container for the
   copier);
 - the log would rotate, or a line without C{\\n} grows to
   L{shimd.records.PARTIAL_MAX}, or the log cannot be written;
 - every pipe has reached end of file (the container's exit is the
   service's);
 - the shim closes the control pipe, or dies.

Nothing here imports Twisted; the child imports nothing at all.
"""

from __future__ import annotations

import fcntl
import marshal
import os
import select
import time
from dataclasses import dataclass, field

from shimd.launch import READ_CHUNK
from shimd.records import PARTIAL_MAX, escape, fileLimit, formatTime, lineRecords, streamMid
from shimd.runtimecmd import MAXFD

__all__ = ["EarlyCopy", "Leftover", "startEarlyCopy"]

@dataclass
class Leftover:
    """
    What the copier holds of one stream when it stops.

    @ivar unlogged: output read but not yet in the log: the last line,
        without its C{\\n} so far, or (when the copier stopped before a
        chunk's records were written) everything since the last record.
    @ivar since: when the first byte of C{unlogged} was read (C{time.time()}).
    @ivar unsent: output in the log but not yet written to the engine's FIFO.
    """

    unlogged: bytes = b""
    since: float = 0.0
    unsent: bytes = b""


@dataclass
class EarlyCopy:
    """
    The running copier, as the shim sees it.

    @ivar pid: the child's pid.
    @ivar copied: bytes read from the container, once stopped.
    @ivar why: why the copier stopped (for the shim log), once stopped.
    @ivar error: a log write failure the copier met (C{errno}, message),
        for the service's log to report.
    """

    pid: int
    _control: int
    _result: int
    copied: int = 0
    why: str = ""
    error: tuple[int, str] | None = None
    leftovers: dict[str, Leftover] = field(default_factory=dict)

    def stop(self) -> dict[str, Leftover]:
        """
        Stop the copier (at a chunk boundary), wait for it, and return what
        it holds, by stream name; called again, return the same.
        """
        if self._control < 0:
            return self.leftovers
        os.close(self._control)
        self._control = -1
        chunks = []
        try:
            while True:
                chunk = os.read(self._result, 1 << 20)
                if not chunk:
                    break
                chunks.append(chunk)
        finally:
            os.close(self._result)
            _, status = os.waitpid(self.pid, 0)
        try:
            self.copied, self.why, self.error, held = marshal.loads(b"".join(chunks))
        except (EOFError, ValueError, TypeError):
            self.why = f"the copier ended without a report (wait status {status})"
            return {}
        self.leftovers = {name: Leftover(*value) for name, value in held.items()}
        return self.leftovers


class _Source:
    """One of the container's output pipes, with its log and FIFO state."""

    __slots__ = ("name", "fd", "sink", "mid", "held", "since", "unsent")

    def __init__(self, name: str, fd: int, sink: int | None) -> None:
        self.name = name
        self.fd = fd
        self.sink = sink
        self.mid = streamMid(name)
        self.held = b""
        self.since = 0.0
        self.unsent = b""


class _Stop(Exception):
    """The copier stops; the argument says why."""


class _Copier:
    """The child's side: copy until something says stop (module docstring)."""

    def __init__(
        self, sources: list[_Source], log: int | None, maxSize: int, control: int, attach: int | None
    ) -> None:
        self.sources = sources
        self.log = log
        self.maxSize = fileLimit(maxSize)
        self.size = os.fstat(log).st_size if log is not None else 0
        self.control = control
        self.attach = attach
        self.copied = 0
        self.error: tuple[int, str] | None = None
        self.poller = select.poll()
        self.readers: dict[int, _Source] = {}
        self.writers: dict[int, _Source] = {}
        """The sources whose FIFO is full, by the FIFO's descriptor."""

    def run(self) -> str:
        """Copy; return why it stopped."""
        for source in self.sources:
            self.poller.register(source.fd, select.POLLIN)
            self.readers[source.fd] = source
        self.poller.register(self.control, select.POLLIN)
        if self.attach is not None:
            self.poller.register(self.attach, select.POLLIN)
        try:
            while True:
                events = self.poller.poll()
                for fd, _ in events:
                    if fd == self.control:
                        raise _Stop("the shim took over")
                    if fd == self.attach:
                        raise _Stop("an attach client is waiting")
                for fd, _ in events:
                    if fd in self.writers:
                        self._send(self.writers[fd])
                    elif fd in self.readers:
                        self._copy(self.readers[fd])
        except _Stop as stop:
            return str(stop)

    def _copy(self, source: _Source) -> None:
        chunk = os.read(source.fd, READ_CHUNK)
        if not chunk:  # the service reads it again: end of file stays
            self.poller.unregister(source.fd)
            del self.readers[source.fd]
            if not self.readers:
                raise _Stop("end of file on every pipe")
            return
        self.copied += len(chunk)
        if self.log is not None:
            self._logChunk(source, chunk)
        if source.sink is not None:
            source.unsent = chunk
            self._send(source)
        if self.error is not None:
            raise _Stop("the log cannot be written")
        if len(source.held) >= PARTIAL_MAX:
            raise _Stop(f"a long line without end on {source.name}")

    def _logChunk(self, source: _Source, chunk: bytes) -> None:
        """Log the complete lines (as L{shimd.logfile.JsonFileLog.write}); hold the rest."""
        ns = time.time_ns()
        data = source.held + chunk
        if not source.held:
            source.since = ns / 1e9
        last = data.rfind(b"\n")
        if last < 0:
            source.held = data
            return
        records = lineRecords(escape(data[:last]), source.mid + formatTime(ns) + b'"}\n', self.maxSize)
        if self.maxSize and self.size + len(records) > self.maxSize:
            source.held = data
            if source.sink is not None:
                source.unsent = chunk
            raise _Stop("the log is due to rotate")
        self._writeLog(records)
        source.held = data[last + 1:]
        source.since = ns / 1e9

    def _writeLog(self, records: bytes) -> None:
        assert self.log is not None
        try:
            _writeAll(self.log, records)
        except OSError as e:
            self.error = (e.errno or 0, e.strerror or str(e))  # the records are dropped, as the log does
            return  # and the copier stops (_copy): the size no longer counts
        self.size += len(records)

    def _send(self, source: _Source) -> None:
        """
        Write C{source.unsent} to its FIFO.  A slow reader gets every byte:
        while the FIFO is full the pipe is not read (the container waits).
        """
        assert source.sink is not None
        try:
            n = os.write(source.sink, source.unsent)
        except BlockingIOError:
            n = 0
        except OSError as e:
            raise _Stop(f"the engine's {source.name} FIFO: {e.strerror}") from None
        source.unsent = source.unsent[n:]
        waiting = source.sink in self.writers
        if source.unsent and not waiting:
            self.poller.unregister(source.fd)
            self.poller.register(source.sink, select.POLLOUT)
            self.writers[source.sink] = source
        elif not source.unsent and waiting:
            self.poller.unregister(source.sink)
            del self.writers[source.sink]
            self.poller.register(source.fd, select.POLLIN)

    def report(self, why: str) -> bytes:
        held = {s.name: (s.held, s.since, s.unsent) for s in self.sources}
        return marshal.dumps((self.copied, why, self.error, held))


def startEarlyCopy(
    stdout: int | None, stderr: int | None, engineOut: int | None, engineErr: int | None,
    log: int | None, maxSize: int, attach: int | None,
) -> EarlyCopy:
    """
    Fork the copier.

    @param stdout: the read end of the container's stdout pipe.
    @param stderr: the read end of its stderr pipe.
    @param engineOut: the engine's stdout FIFO, open for writing without
        blocking (or L{None}).
    @param engineErr: its stderr FIFO.
    @param log: the container's log file, open for appending (L{None}: no
        log).
    @param maxSize: the log's C{logMaxsize} (0: no rotation).
    @param attach: the listening attach socket's descriptor (or L{None}).
    """
    control, controlW = os.pipe2(os.O_CLOEXEC)
    resultR, result = os.pipe2(os.O_CLOEXEC)
    try:
        fcntl.fcntl(result, fcntl.F_SETPIPE_SZ, 1 << 20)  # the report never waits for the shim
    except OSError:
        pass
    pairs = (("stdout", stdout, engineOut), ("stderr", stderr, engineErr))
    sources = [_Source(name, fd, sink) for name, fd, sink in pairs if fd is not None]
    try:
        pid = os.fork()
    except OSError:
        for fd in (control, controlW, resultR, result):
            os.close(fd)
        raise
    if pid == 0:  # the copier
        code = 1
        try:
            keep = {result, control, *(s.fd for s in sources), *(s.sink for s in sources if s.sink is not None)}
            keep.update(fd for fd in (log, attach) if fd is not None)
            _closeAllBut(keep)
            copier = _Copier(sources, log, maxSize, control, attach)
            try:
                why = copier.run()
            except BaseException as e:  # a bug: still hand back what is held
                why = f"the copier failed: {e!r}"
            _writeAll(result, copier.report(why))
            code = 0
        finally:
            os._exit(code)
    os.close(control)
    os.close(result)
    return EarlyCopy(pid, controlW, resultR)


def _writeAll(fd: int, data: bytes) -> None:
    """Write all of C{data} to blocking C{fd} (the log, the result pipe)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _closeAllBut(keep: set[int]) -> None:
    low = 0
    for fd in sorted(keep):
        if fd > low:
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, MAXFD)
