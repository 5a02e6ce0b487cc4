# -*- test-case-name: tests.test_fdio -*-
"""
Readers and writers for pipes, FIFOs and pty masters, as reactor descriptors.

Everything here is non-blocking and bytes-only.  The rules that matter:

 - A reader reads what is pending before it acts on a hang-up, so the
   last chunk is never dropped (iSulad bug B7).  The reactor calls
   L{ReadPipe.doRead} first when it sees C{IN|HUP}, but takes C{HUP}
   without C{IN} for a clean end and reads nothing.  A pty master can say
   just that while the last bytes its slave wrote are still on their way
   to its read buffer (the kernel's flip-buffer push races the poll), so
   a reader that the reactor ends reads to the real end first.
 - A writer treats C{EAGAIN} as "not now" and only C{EPIPE} (or the kernel
   saying the reader is gone) as "gone" (iSulad bug B5).
 - A pty master answers C{EIO} once its last slave closes: that is end of
   file, not an error.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import time
from typing import Any, Callable

from twisted.internet import abstract, main
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IReactorFDSet, IReactorTime
from twisted.python.failure import Failure

from shimd.launch import READ_CHUNK

READ_BURST = 8
"""Reads per wake-up at most (L{ReadPipe.doRead})."""

BURST_MIN = 4096
"""A read at least this large suggests more is waiting: read again."""

GATHER = 0.0002
"""Seconds a streaming pipe is left alone after it was read empty (see
L{ReadPipe}): long enough for a fast writer to queue tens of KiB, short
enough that nobody sees the delay."""


def setNonBlocking(fd: int) -> None:
    """Set C{O_NONBLOCK} on C{fd}."""
    os.set_blocking(fd, False)


SPLICE_F_NONBLOCK = 2

_libc: Any = None


def _loadLibc() -> Any:
    """libc through ctypes, for the calls the C{os} module lacks (Python 3.11)."""
    global _libc
    if _libc is None:
        # dlopen(NULL): the symbols already loaded, libc among them.
        libc = ctypes.CDLL(None, use_errno=True)
        libc.tee.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_size_t, ctypes.c_uint)
        libc.tee.restype = ctypes.c_ssize_t
        libc.timerfd_create.argtypes = (ctypes.c_int, ctypes.c_int)
        libc.timerfd_create.restype = ctypes.c_int
        libc.timerfd_settime.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
        libc.timerfd_settime.restype = ctypes.c_int
        _libc = libc
    return _libc


def _oserror() -> OSError:
    err = ctypes.get_errno()
    return OSError(err, os.strerror(err))


def isPipe(fd: int) -> bool:
    """Whether C{fd} is a pipe or FIFO (what C{tee(2)} takes)."""
    try:
        return stat.S_ISFIFO(os.fstat(fd).st_mode)
    except OSError:
        return False


def tee(fdIn: int, fdOut: int, length: int) -> int:
    """
    C{tee(2)}, non-blocking: duplicate up to C{length} bytes from the front
    of pipe C{fdIn} into pipe C{fdOut} without consuming them (the kernel
    shares the pages; nothing is copied).

    @return: the bytes duplicated; 0 when C{fdIn} is empty or C{fdOut} is
        full (C{EAGAIN}).
    @raise OSError: C{EPIPE} when C{fdOut} has no reader, C{EINVAL} when
        either is not a pipe (or both are the same pipe).
    """
    n: int = _loadLibc().tee(fdIn, fdOut, length, SPLICE_F_NONBLOCK)
    if n >= 0:
        return n
    err = ctypes.get_errno()
    if err in (errno.EAGAIN, errno.EINTR):
        return 0
    raise OSError(err, os.strerror(err))


class OwnedDescriptor(abstract.FileDescriptor):
    """
    A reactor descriptor that owns one fd and closes it, once, when its
    connection is lost; subclasses hear of it in L{fdClosed}.
    """

    connected = True
    fd: int

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        """Stop watching and close the descriptor now."""
        if self.fd >= 0 and not self.disconnected:
            self.connectionLost(Failure(main.CONNECTION_DONE))

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            self.fdClosed(reason)

    def fdClosed(self, reason: Failure) -> None:
        """The fd was closed, for C{reason}."""


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


_TFD_CLOEXEC = os.O_CLOEXEC
_TFD_NONBLOCK = os.O_NONBLOCK


class NapTimer(OwnedDescriptor):
    """
    A one-shot C{timerfd} on the reactor, for pauses shorter than the
    reactor's own timers can take (C{epoll_wait} counts in milliseconds).
    It stays registered: the descriptor is readable only once it expired.
    """

    def __init__(self, reactor: IReactorFDSet, expired: Callable[[], object]) -> None:
        super().__init__(reactor)
        fd = _loadLibc().timerfd_create(time.CLOCK_MONOTONIC, _TFD_CLOEXEC | _TFD_NONBLOCK)
        if fd < 0:
            raise _oserror()
        self.fd = fd
        self._expired = expired
        self._spec = _Itimerspec()
        self.startReading()

    def arm(self, seconds: float) -> None:
        """Call C{expired} once, C{seconds} from now (re-arming moves it)."""
        ns = max(int(seconds * 1e9), 1)
        self._spec.it_value.tv_sec, self._spec.it_value.tv_nsec = divmod(ns, 1_000_000_000)
        if _loadLibc().timerfd_settime(self.fd, 0, ctypes.byref(self._spec), None) < 0:
            raise _oserror()

    def doRead(self) -> object:
        try:
            os.read(self.fd, 8)
        except BlockingIOError:  # disarmed or re-armed meanwhile
            return None
        self._expired()
        return None

    def writeSomeData(self, data: bytes) -> int | BaseException:
        return main.CONNECTION_LOST


class ReadPipe(OwnedDescriptor):
    """
    Reads a pipe, FIFO or pty master and hands every chunk to a callback.

    @ivar eof: called once, with the reason, when the descriptor is done
        (end of file, error or L{close}).

    With C{gather}, a pipe that was read empty after a wake-up that brought
    at least L{BURST_MIN} bytes (a writer streaming output, 4 KiB per
    C{write} for most programs) is left alone for C{gather} seconds before
    it is watched again, so the next wake-up finds tens of KiB instead of
    one write: a third fewer CPU seconds for a fast writer, which never
    waits (the pipe holds far more than it writes meanwhile).  Small
    output (a prompt, a line) is read at once, and nothing read is ever
    held back.  Not for a pty, whose small buffer would stall the writer.
    """

    def __init__(
        self,
        reactor: IReactorFDSet,
        fd: int,
        dataReceived: Callable[[bytes], object],
        eof: Callable[[Failure], object] = lambda reason: None,
        eioIsEOF: bool = False,
        chunkSize: int = READ_CHUNK,
        read: Callable[[int, int], bytes] = os.read,
        gather: float = 0.0,
    ) -> None:
        """
        @param read: reads a chunk (C{os.read}'s signature and errors); a
            stream that tees its pipe to its sinks first hooks in here.
        @param gather: seconds of pause after a streaming burst; C{0}: none.
        """
        super().__init__(reactor)
        self.fd = fd
        self.chunkSize = chunkSize
        self.gather = gather
        self._read = read
        self._dataReceived = dataReceived
        self._eof = eof
        self._eioIsEOF = eioIsEOF
        if fd >= 0:  # -1: the descriptor comes later (OutputStream.setSource)
            setNonBlocking(fd)

    _reading = False
    """Whether the owner wants the pipe read (a pause does not change it)."""
    _napping = False
    _timer: NapTimer | None = None

    def startReading(self) -> None:
        self._reading = True
        if not self._napping:
            super().startReading()

    def stopReading(self) -> None:
        self._reading = False
        super().stopReading()

    def _nap(self) -> None:
        if self._timer is None:
            try:
                self._timer = NapTimer(self.reactor, self._wake)
            except OSError:
                self.gather = 0.0  # no timerfd: read as it comes
                return
        self._napping = True
        super().stopReading()
        self._timer.arm(self.gather)

    def _wake(self) -> None:
        self._napping = False
        if self._reading and self.fd >= 0:
            super().startReading()

    _atEnd = False
    """Whether the end was seen here (end of file, a read error, L{close})."""

    def close(self) -> None:
        self._atEnd = True
        super().close()

    def connectionLost(self, reason: Failure) -> None:
        if self._timer is not None:
            self._timer.close()
            self._timer = None
        self._napping = False
        if not self._atEnd and self.fd >= 0 and reason.check(ConnectionDone):
            # The reactor saw a hang-up and no readable data, which a pty
            # master reports before its last bytes arrive: read them.
            self._readToEnd()
        super().connectionLost(reason)

    def _readToEnd(self) -> None:
        """Read until end of file, an error or nothing more (after a hang-up)."""
        while self.fd >= 0:
            try:
                data = self._read(self.fd, self.chunkSize)
            except OSError:  # EIO (a pty's end), EAGAIN, or another error
                return
            if not data:
                return
            self._dataReceived(data)

    def doRead(self) -> object:
        # A burst: while reads keep coming back large, read again at once
        # (what arrived while the last chunk was handled) instead of
        # going round the reactor for each; a few times at most, for the
        # other descriptors' sake.
        got = 0
        for _ in range(READ_BURST):
            try:
                data = self._read(self.fd, self.chunkSize)
            except (BlockingIOError, InterruptedError):
                break  # read empty
            except OSError as e:
                self._atEnd = True
                if e.errno == errno.EIO and self._eioIsEOF:
                    return main.CONNECTION_DONE
                return main.CONNECTION_LOST
            if not data:
                self._atEnd = True
                return main.CONNECTION_DONE
            self._dataReceived(data)
            got += len(data)
            if not self._reading or self.fd < 0:
                return None
            if len(data) < (self.chunkSize if self.gather else BURST_MIN):
                # A short read left a pipe empty (nearly, without gather:
                # a small one says the writer is not streaming).
                break
        else:
            return None  # more is waiting: the reactor comes back at once
        if self.gather and got >= BURST_MIN:
            self._nap()
        return None

    def writeSomeData(self, data: bytes) -> int | BaseException:
        return main.CONNECTION_LOST

    def fdClosed(self, reason: Failure) -> None:
        self._eof(reason)


class WritePipe(OwnedDescriptor):
    """
    A buffered, non-blocking writer for a pipe or FIFO write end (or a pty
    master).

    Writes go straight to the kernel when nothing is queued; the rest is
    queued and flushed when the descriptor is writable.  A registered
    streaming producer is paused when more than L{bufferSize} bytes are
    queued.

    @ivar lastProgress: the time of the last write that moved bytes, or at
        which the queue last became non-empty; used for the stall policy.
    @ivar lost: called once with the reason when the descriptor is gone.
    @ivar teeable: whether L{teeFrom} may be used (the descriptor is a pipe).
    """

    def __init__(
        self,
        reactor: IReactorFDSet,
        fd: int,
        clock: IReactorTime,
        lost: Callable[[Failure], object] = lambda reason: None,
        watchReader: bool = True,
    ) -> None:
        super().__init__(reactor)
        self.fd = fd
        self._clock = clock
        self.lost = lost
        self.lastProgress = clock.seconds()
        self.teeable = isPipe(fd)
        setNonBlocking(fd)
        if watchReader:
            # The "read hack" of twisted.internet.process.ProcessWriter: the
            # kernel reports EPOLLERR on a write end whose readers are all
            # gone, which we only hear about if we ask for read events.
            self.startReading()

    def pending(self) -> int:
        """Bytes queued in user space, not yet handed to the kernel."""
        return len(self.dataBuffer) - self.offset + self._tempDataLen

    def write(self, data: bytes) -> None:
        if not self.connected or self.disconnecting or not data:
            return
        if self.pending() == 0:
            self.lastProgress = self._clock.seconds()
            written = self.writeSomeData(data)
            if isinstance(written, BaseException):
                self._lose(written)
                return
            if written == len(data):
                return
            data = data[written:]
        super().write(data)

    def teeFrom(self, fd: int, length: int) -> int:
        """
        Duplicate up to C{length} bytes from the front of pipe C{fd} into
        ours with C{tee(2)}, when nothing is queued here (else the order
        would break) and this descriptor is a pipe.  The caller owes the
        rest: it must write what it reads from C{fd} minus the first
        C{n} bytes.

        @return: C{n}, the bytes duplicated (0: use L{write}).
        """
        if not self.teeable or self.pending() or not self.connected or self.disconnecting:
            return 0
        try:
            n = tee(fd, self.fd, length)
        except OSError as e:
            if e.errno == errno.EPIPE:
                self._lose(main.CONNECTION_LOST)
            else:  # EINVAL: not a pipe after all; write() will tell the rest
                self.teeable = False
            return 0
        if n:
            self.lastProgress = self._clock.seconds()
        return n

    def writeSomeData(self, data: bytes) -> int | BaseException:
        try:
            written = os.write(self.fd, data)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError:
            return main.CONNECTION_LOST
        if written:
            self.lastProgress = self._clock.seconds()
        return written

    def doRead(self) -> object:
        # Only the read hack lands here: the reader went away.  (The epoll
        # reactor ends the descriptor itself instead: see connectionLost.)
        return main.CONNECTION_LOST

    def _lose(self, why: BaseException) -> None:
        # Never tear down inside the caller's write(): it may be iterating
        # over its sinks.  Stop accepting data now, close on the next turn.
        self.connected = False
        self._clock.callLater(0, self._loseNow, why)

    def _loseNow(self, why: BaseException) -> None:
        if self.fd >= 0:
            self.connectionLost(Failure(why))

    def abort(self) -> None:
        """Drop everything queued and close now."""
        if self.fd >= 0:
            self.connectionLost(Failure(main.CONNECTION_LOST))

    def connectionLost(self, reason: Failure) -> None:
        if reason.check(ConnectionDone) and not self.disconnecting:
            # Not our loseConnection: the reactor takes the read hack's
            # EPOLLERR (all readers gone) for a clean end of a reader.
            reason = Failure(main.CONNECTION_LOST)
        self.dataBuffer = b""
        self._tempDataBuffer = []
        self._tempDataLen = 0
        self.offset = 0
        super().connectionLost(reason)

    def fdClosed(self, reason: Failure) -> None:
        self.lost(reason)
