# -*- test-case-name: tests.test_logfile -*-
"""
The container's Docker C{json-file} log.

Every line the container writes becomes one record::

    {"log":"hello\\n","stream":"stdout","time":"2026-12-03T16:33:05.123456789Z"}

Differences from iSulad (see the spec, section 5.5):

 - A partial line (no C{\\n} yet) is written, without C{\\n}, after
   C{partialDelay} seconds, when it reaches C{partialMax} bytes, or at
   L{JsonFileLog.flush}/L{JsonFileLog.close}: a prompt shows up in the log
   even while the container waits.
 - Bytes that are not valid UTF-8 are written as U+FFFD (as Docker does), so
   every line of the file is valid JSON.
 - C{maxFiles == 1} keeps exactly one file, truncated on rotation (iSulad bug
   B15 kept C{path.1} too).
 - A record larger than C{maxSize} is split into several records, never
   truncated; records are never split across files.
 - Write errors are logged and never raised.

The records are built by L{shimd.records}, all those of a chunk at once, and
written with one C{os.write}.  Regular files are always "ready" for
epoll, so plain blocking writes are used.
"""

from __future__ import annotations

import errno
import os
import time
from typing import Callable, Union

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from shimd.launch import LOG_MODE as _MODE, LOG_OPEN_FLAGS as _OPEN_FLAGS
from shimd.records import PARTIAL_MAX, escape, fileLimit, formatTime, lineRecords, partialRecords, streamMid, utf8Cut

__all__ = ["JsonFileLog", "formatTime"]


class _Stream:
    """
    Line-assembly state of one stream.

    @ivar mid: the bytes between the log text and the time of a record
        without C{\\n}: C{","stream":"stdout","time":"}.
    @ivar pending: bytes after the last C{\\n}, not yet written.
    @ivar since: when the bytes in C{pending} began to wait (clock seconds).
    @ivar timer: fires L{JsonFileLog._partialTimeout} while C{pending}; it
        is armed once and moved on only when it fires early, so a stream of
        chunks that end mid-line costs no timer work per chunk.
    """

    __slots__ = ("name", "mid", "pending", "since", "timer")

    def __init__(self, name: str) -> None:
        self.name = name
        self.mid: bytes = streamMid(name)
        self.pending: bytes = b""
        self.since = 0.0
        self.timer: IDelayedCall | None = None


class JsonFileLog:
    """
    A Docker C{json-file} log with line assembly and size-based rotation.

    @ivar path: the log file.
    @ivar maxSize: rotate before a file would exceed this many bytes; C{0}
        means never rotate.
    @ivar maxFiles: files kept, C{path} included.
    """

    log = Logger()

    def __init__(
        self,
        path: str,
        maxSize: int = 0,
        maxFiles: int = 1,
        clock: IReactorTime | None = None,
        partialDelay: float = 1.0,
        partialMax: int = PARTIAL_MAX,
        timeNs: Callable[[], int] = time.time_ns,
        fd: int | None = None,
    ) -> None:
        """
        Open (create, append to) C{path}.  An open failure is logged, and the
        open is retried on the next write.

        @param maxSize: C{0} for no rotation; otherwise at least 4096.
        @param maxFiles: at least 1.
        @param clock: for the partial-line timer; the global reactor if
            L{None}.
        @param partialDelay: seconds a partial line is held at most.
        @param partialMax: a held partial line is written in pieces of this
            many bytes once it is that long.
        @param timeNs: the clock for the records' C{time}.
        @param fd: C{path} already open (by L{shimd.launch}), which the
            log owns from now on.
        """
        if clock is None:
            from twisted.internet import reactor

            clock = reactor  # type: ignore[assignment]
        assert clock is not None
        self.path = path
        self.maxSize = fileLimit(maxSize)
        self.maxFiles = max(maxFiles, 1)
        self._clock: IReactorTime = clock
        self._partialDelay = partialDelay
        self._partialMax = max(partialMax, 1)
        self._timeNs = timeNs
        self._streams: dict[str, _Stream] = {}
        self._fd: int = -1
        self._size = 0
        self._closed = False
        self._failing = False
        if fd is None:
            self._open(truncate=False)
        else:
            self._fd = fd
            self._size = os.fstat(fd).st_size

    # -- public API ---------------------------------------------------------

    def write(self, stream: str, data: bytes, since: float | None = None) -> None:
        """
        Log a chunk of the container's output.

        @param stream: C{"stdout"} or C{"stderr"}.
        @param data: raw bytes as read from the container.
        @param since: when C{data} was read, if before now (clock seconds):
            a line without C{\\n} is then held C{partialDelay} from then
            (output that L{shimd.earlycopy} read and held).
        """
        if self._closed or not data:
            return
        st = self._streams.get(stream)
        if st is None:
            st = self._streams[stream] = _Stream(stream)
        waiting = bool(st.pending)
        if waiting:
            data = st.pending + data
        last = data.rfind(b"\n")
        ts = formatTime(self._timeNs())
        tailPart = st.mid + ts + b'"}\n'
        out: bytes = b""
        if last >= 0:
            body = data[:last]
            rest = data[last + 1 :]
            waiting = False
            out = lineRecords(escape(body), tailPart, self.maxSize)
        else:
            rest = data
        if len(rest) >= self._partialMax:
            pieces = []
            while len(rest) >= self._partialMax:
                cut = utf8Cut(rest, self._partialMax)
                pieces.append(partialRecords(rest[:cut], tailPart, self.maxSize))
                rest = rest[cut:]
            out += b"".join(pieces)
        st.pending = rest
        if rest:
            if not waiting:
                # New bytes began to wait: the delay counts from now.  An
                # armed timer stays; if it fires early it re-arms itself.
                st.since = self._clock.seconds() if since is None else since
            if st.timer is None:
                delay = self._partialDelay
                if since is not None:
                    delay = max(0.0, st.since + delay - self._clock.seconds())
                st.timer = self._clock.callLater(delay, self._partialTimeout, st)
        elif st.timer is not None:
            st.timer.cancel()
            st.timer = None
        if out:
            self._emit(out)

    def flush(self) -> None:
        """
        Write every held partial line now, as a record without C{\\n}.
        """
        if self._closed:
            return
        ts: bytes | None = None
        for st in self._streams.values():
            if st.timer is not None:
                st.timer.cancel()
                st.timer = None
            if st.pending:
                if ts is None:
                    ts = formatTime(self._timeNs())
                self._flushStream(st, ts)

    def close(self) -> None:
        """
        L{flush}, cancel the timers and close the file.  Idempotent.
        """
        if self._closed:
            return
        self.flush()
        self._closed = True
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            try:
                os.close(fd)
            except OSError as e:
                self.log.error(
                    "Cannot close container log {path}: {error}",
                    path=self.path,
                    error=e,
                )

    # -- partial lines --------------------------------------------------------

    def _flushStream(self, st: _Stream, ts: bytes) -> None:
        """
        Write C{st.pending} as records without C{\\n}.
        """
        data, st.pending = st.pending, b""
        self._emit(partialRecords(data, st.mid + ts + b'"}\n', self.maxSize))

    def _partialTimeout(self, st: _Stream) -> None:
        """
        A partial line has been held for C{partialDelay}: write it.
        """
        st.timer = None
        if st.pending and not self._closed:
            left = st.since + self._partialDelay - self._clock.seconds()
            if left > 0.001:
                # These bytes began to wait after the timer was armed.
                st.timer = self._clock.callLater(left, self._partialTimeout, st)
                return
            self._flushStream(st, formatTime(self._timeNs()))

    # -- file handling ------------------------------------------------------

    def _emit(self, out: bytes) -> None:
        """
        Append whole records, rotating between records when needed.

        @param out: one or more records; each ends with the only raw C{\\n}
            it contains, and each is at most C{maxSize} bytes.
        """
        if self._fd < 0 and not self._open(truncate=False):
            return
        maxSize = self.maxSize
        if not maxSize or self._size + len(out) <= maxSize:
            self._writeAll(out)
            return
        view = memoryview(out)
        start = 0
        total = len(out)
        while start < total:
            room = maxSize - self._size
            if total - start <= room:
                self._writeAll(view[start:])
                return
            end = out.rfind(b"\n", start, start + max(room, 0)) + 1
            if end > start:
                self._writeAll(view[start:end])
                start = end
            elif self._size == 0:
                # A record larger than maxSize: not produced by this class,
                # but never loop forever.
                end = out.index(b"\n", start) + 1
                self._writeAll(view[start:end])
                start = end
                continue
            if start < total:
                self._rotate()
                if self._fd < 0:
                    return

    def _writeAll(self, buf: Union[bytes, memoryview]) -> None:
        """
        Write all of C{buf}; log (and drop the rest) on error.
        """
        fd = self._fd
        if fd < 0:
            return
        view = memoryview(buf)
        try:
            while view:
                n = os.write(fd, view)
                self._size += n
                view = view[n:]
        except OSError as e:
            self.writeFailed(e)
        else:
            if self._failing:
                self._failing = False
                self.log.info("Writing container log {path} again", path=self.path)

    def writeFailed(self, error: OSError) -> None:
        """
        A write of records failed (here, or in L{shimd.earlycopy}): log it,
        once for a run of failures; the next write that succeeds says so.
        """
        self._failed("Cannot write container log {path}: {error}", error)

    def _failed(self, fmt: str, error: OSError) -> None:
        """
        Log an error, only the first of a run of failures.
        """
        if not self._failing:
            self._failing = True
            self.log.error(fmt, path=self.path, error=error)

    def _open(self, truncate: bool) -> bool:
        """
        (Re)open C{path}; on success close the previous descriptor.

        @return: whether the file is open.
        """
        flags = _OPEN_FLAGS | (os.O_TRUNC if truncate else 0)
        try:
            fd = os.open(self.path, flags, _MODE)
        except OSError as e:
            self._failed("Cannot open container log {path}: {error}", e)
            return False
        old, self._fd = self._fd, fd
        if old >= 0:
            try:
                os.close(old)
            except OSError:
                pass
        try:
            self._size = 0 if truncate else os.fstat(fd).st_size
        except OSError:
            self._size = 0
        return True

    def _rotate(self) -> None:
        """
        Keep at most C{maxFiles} files: shift C{path.(i-1)} to C{path.i},
        C{path} to C{path.1}, and reopen; with one file, truncate it.
        """
        if self.maxFiles == 1:
            self._open(truncate=True)
            return
        path = self.path
        for i in range(self.maxFiles - 1, 1, -1):
            self._rename(f"{path}.{i - 1}", f"{path}.{i}")
        self._rename(path, f"{path}.1")
        # O_TRUNC: if the rename failed, still do not exceed maxSize.
        self._open(truncate=True)

    def _rename(self, old: str, new: str) -> None:
        """
        C{os.rename}, ignoring C{ENOENT} and logging other errors.
        """
        try:
            os.rename(old, new)
        except OSError as e:
            if e.errno != errno.ENOENT:
                self.log.error(
                    "Cannot rotate container log {old} to {new}: {error}",
                    old=old,
                    new=new,
                    error=e,
                )
