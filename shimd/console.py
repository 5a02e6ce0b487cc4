# -*- test-case-name: tests.test_console -*-
"""
Terminal containers: the console socket, the pty master and its window size.

With C{terminal: true} runc allocates the pty inside the container and sends
its master to the shim over a unix socket (C{--console-socket}): one message
whose C{SCM_RIGHTS} carries the fd, while C{runc create} (or C{exec}) is
still running (spec 5.3).  From then on:

 - the master is the container's only output stream, named C{stdout} (a pty
   merges what the process writes to its stdout and stderr);
 - reading it gives C{EIO} once the container's last slave fd is closed:
   that is end of file, after everything buffered was read (field case C8);
 - input (the engine's stdin FIFO, attach sessions) is written to a C{dup}
   of the master, so a failed write closes only the duplicate: closing the
   master itself would hang up the container's terminal (iSulad bug B23);
 - window sizes arrive on the resize FIFO as C{"<width> <height>"}
   (iSulad's exec resize; accepted for create too) or from attach clients,
   and are applied with C{TIOCSWINSZ}; a size that arrives before the master
   is applied when it arrives.  The initial size is the OCI process's
   C{consoleSize}, which runc applies before the process starts.

No pty fd stays open in the shim once the process is gone: the output
reader closes the master at end of file (or when the drain gives up), and
the input duplicate is closed with it.
"""

from __future__ import annotations

import fcntl
import os
import struct
import termios
from typing import Any, Callable, cast

from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.interfaces import IFileDescriptorReceiver, IReactorFDSet, IReactorTime, IReactorUNIX
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from shimd.fdio import ReadPipe
from shimd.launch import openFifo
from shimd.listener import UnixListener
from shimd.sockets import UnixSocket, listenPrivate
from shimd.streams import OutputStream, StdinPipe

MAX_DIMENSION = 65535
"""Rows and columns are C{unsigned short} in C{struct winsize}."""

RECEIVE_GRACE = 2.0
"""Seconds to wait for the master once the runtime has exited successfully."""

_log = Logger()


class ConsoleError(Exception):
    """The terminal did not arrive, or was not a terminal; C{str()} says why."""


def setWindowSize(fd: int, width: int, height: int) -> None:
    """C{TIOCSWINSZ} on C{fd}: C{height} rows of C{width} columns."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))


# -- the console socket -------------------------------------------------------


@implementer(IFileDescriptorReceiver)
class _ConsoleProtocol(Protocol):
    """
    One connection from the runtime.  Twisted hands over the fds of a
    message before its data (the master's file name, of no use to us).
    """

    factory: ConsoleSocket

    def __init__(self) -> None:
        self._got = False

    def fileDescriptorReceived(self, fd: int) -> None:
        # Twisted's recvmsg does not ask for MSG_CMSG_CLOEXEC (B24).
        os.set_inheritable(fd, False)
        if self._got:
            _log.warn("console socket: closed an extra fd {fd} from the runtime", fd=fd)
            os.close(fd)
            return
        self._got = True
        self.factory._received(fd)
        assert self.transport is not None
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: object = None) -> None:
        if not self._got:
            self.factory._failed("the runtime closed the console socket without sending a terminal")


class ConsoleSocket(Factory[Any]):
    """
    A one-shot listener for the runtime's C{--console-socket}.

    The socket lives in a private directory (mode 0700; the socket itself
    0600) with a short path, C{/run/shimd-XXXXXXXX/pty.sock}, well under the
    107 bytes of C{sun_path}.  It is removed as soon as a connection was
    handled, and by L{close}.

    @ivar path: the socket's path, once L{listen} was called.
    """

    protocol: type[_ConsoleProtocol] = _ConsoleProtocol
    noisy = False

    def __init__(self, reactor: IReactorUNIX, directory: str | None = None) -> None:
        self._reactor = reactor
        self._parent = directory
        self._listener: UnixListener | None = None
        self.path: str | None = None
        self._fd: int | None = None
        self._error: str | None = None
        self._done = False
        self._waiting: list[Deferred[int]] = []

    def listen(self) -> str:
        """Start listening; return the path to give the runtime."""
        try:
            listening = listenPrivate(self._parent, "pty.sock", backlog=2)
        except OSError as e:
            raise ConsoleError(f"cannot listen on a console socket: {e.strerror}: {e.filename}") from e
        return self.adopt(listening)

    def adopt(self, listening: UnixSocket) -> str:
        """Accept on a socket made before the reactor (L{shimd.launch}); return its path."""
        self.path = listening.path
        self._listener = UnixListener(self._reactor, listening, self)
        return self.path

    def receive(self) -> Deferred[int]:
        """
        Fire with the master fd (the caller owns it from then on), or fail
        with L{ConsoleError}.  Only one caller gets the fd.
        """

        def cancel(d: Deferred[int]) -> None:
            if d in self._waiting:
                self._waiting.remove(d)

        d: Deferred[int] = Deferred(cancel)
        self._waiting.append(d)
        self._deliver()
        return d

    def _received(self, fd: int) -> None:
        if self._done:
            os.close(fd)
            return
        self._done = True
        if os.isatty(fd):
            self._fd = fd
        else:
            os.close(fd)
            self._error = "the runtime sent a file that is not a terminal over the console socket"
        self._stopListening()
        self._deliver()

    def _failed(self, why: str) -> None:
        if self._done:
            return
        self._done = True
        self._error = why
        self._stopListening()
        self._deliver()

    def _deliver(self) -> None:
        while self._waiting and (self._fd is not None or self._error is not None):
            d = self._waiting.pop(0)
            if self._fd is not None:
                fd, self._fd = self._fd, None
                d.callback(fd)
            else:
                d.errback(ConsoleError(self._error))

    def _stopListening(self) -> None:
        """Stop accepting; the socket and its directory are removed at once."""
        if self._listener is not None:
            listener, self._listener = self._listener, None
            listener.close()

    def close(self) -> None:
        """Stop listening, remove the socket, close a master nobody took."""
        self._done = True
        self._stopListening()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._error = self._error or "the console socket was closed"
        self._deliver()


# -- window size --------------------------------------------------------------


def parseResize(data: bytes) -> tuple[list[tuple[int, int]], list[bytes]]:
    """
    Parse one read of the resize FIFO.

    Each line (iSulad writes none; a trailing newline is harmless) must be
    C{"<width> <height>"}, two decimal numbers in 0..65535.  Anything else
    is rejected as a whole, including coalesced messages such as
    C{"80 2490 30"} (C{"80 24"} then C{"90 30"}, written without a
    separator): they cannot be split back into sizes, and guessing would
    set a wrong one.

    @return: the valid C{(width, height)} pairs in order, and the rejected
        lines.
    """
    sizes: list[tuple[int, int]] = []
    rejected: list[bytes] = []
    for line in data.splitlines():
        words = line.split()
        if not words:
            continue
        values = [_dimension(w) for w in words]
        if len(values) == 2 and values[0] is not None and values[1] is not None:
            sizes.append((values[0], values[1]))
        else:
            rejected.append(line)
    return sizes, rejected


def _dimension(word: bytes) -> int | None:
    digits = word.lstrip(b"0") or b"0"
    if not word.isdigit() or len(digits) > 5:
        return None
    value = int(digits)
    return value if value <= MAX_DIMENSION else None


class WindowSize:
    """
    The pty's window size: applied to the master, or kept (the latest one)
    until the master arrives.  Failures are logged; they never stop IO.
    """

    def __init__(self) -> None:
        self._fd: int | None = None
        self._pending: tuple[int, int] | None = None
        self._gone = False

    def resize(self, width: int, height: int) -> None:
        if self._fd is None:
            if self._gone:
                _log.debug("resize to {w}x{h} after the terminal closed: ignored", w=width, h=height)
            else:
                self._pending = (width, height)
            return
        try:
            setWindowSize(self._fd, width, height)
        except OSError as e:
            _log.warn("cannot resize the terminal to {w}x{h}: {e}", w=width, h=height, e=e)
        else:
            _log.debug("terminal resized to {w}x{h}", w=width, h=height)

    def setMaster(self, fd: int) -> None:
        """The master is here: apply the size that arrived before it, if any."""
        self._fd = fd
        pending, self._pending = self._pending, None
        if pending is not None:
            self.resize(*pending)

    def masterGone(self) -> None:
        """The master is closed (its fd number may be reused): never touch it again."""
        self._fd = None
        self._pending = None
        self._gone = True


class ResizeFifo:
    """
    Reads C{"<width> <height>"} messages from the resize FIFO (spec 4.5).

    A write end is held for the shim's lifetime (as iSulad does) so that the
    FIFO never reports a hang-up between two writers.  Bad messages are
    logged and ignored; nothing here can stop IO (iSulad bug B6).
    """

    def __init__(
        self, reactor: IReactorFDSet, path: str, resize: Callable[[int, int], object], fd: int | None = None
    ) -> None:
        """@param fd: C{path} already open for reading (by L{shimd.launch})."""
        self.path = path
        self._resize = resize
        self._closing = False
        if fd is None:
            fd = openFifo(path, os.O_RDONLY)
        try:
            self._writeEnd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            os.close(fd)
            raise
        self.reader = ReadPipe(reactor, fd, self._dataReceived, self._ended)
        self.reader.startReading()

    def _dataReceived(self, data: bytes) -> None:
        sizes, rejected = parseResize(data)
        for line in rejected:
            _log.warn(
                "resize FIFO: ignored {msg!r}: expected '<width> <height>' in 0..{max}",
                msg=line[:80].decode("ascii", "backslashreplace"),
                max=MAX_DIMENSION,
            )
        for width, height in sizes:
            self._resize(width, height)

    def _ended(self, reason: Failure) -> None:
        if not self._closing:
            _log.warn("resize FIFO {path} failed ({why}); resizing stops", path=self.path,
                      why=reason.getErrorMessage())

    def close(self) -> None:
        self._closing = True
        self.reader.close()
        if self._writeEnd >= 0:
            os.close(self._writeEnd)
            self._writeEnd = -1


# -- the terminal as a whole ------------------------------------------------------


class Terminal:
    """
    A terminal container's IO from the shim's side: listens on the console
    socket, and once the master arrives makes it the source of C{stream}
    and the target of C{stdin}, and applies window sizes to it.

    @ivar console: the L{ConsoleSocket} (its C{path} goes to the runtime).
    @ivar size: the L{WindowSize}; attach clients may call C{size.resize}.
    """

    def __init__(
        self,
        reactor: IReactorUNIX,
        clock: IReactorTime,
        stream: OutputStream,
        stdin: StdinPipe,
        resizeFifo: str | None = None,
        socketDirectory: str | None = None,
        console: UnixSocket | None = None,
        resizeFd: int | None = None,
    ) -> None:
        """
        @param console: the console socket, already listening (made before
            the reactor); by default a new one in C{socketDirectory}.
        @param resizeFd: C{resizeFifo} already open for reading.
        @raise ConsoleError: no console socket could be made.
        """
        self._clock = clock
        self._stream = stream
        self._stdin = stdin
        self.size = WindowSize()
        self.console = ConsoleSocket(reactor, socketDirectory)
        if console is not None:
            self.console.adopt(console)
        else:
            self.console.listen()
        self._fifo: ResizeFifo | None = None
        if resizeFifo:
            try:
                # A reactor that listens on unix sockets is a whole reactor.
                self._fifo = ResizeFifo(cast(IReactorFDSet, reactor), resizeFifo, self.size.resize, resizeFd)
            except OSError as e:
                _log.warn("cannot open the resize FIFO {path} ({e}); resizing is off", path=resizeFifo, e=e)

    @property
    def socketPath(self) -> str:
        assert self.console.path is not None
        return self.console.path

    def receive(self, grace: float = RECEIVE_GRACE) -> Deferred[None]:
        """
        Call once the runtime has exited successfully: fires when the master
        is connected, or fails with L{ConsoleError} if it did not come
        within C{grace} seconds.
        """

        def timedOut(failure: Failure) -> None:
            failure.trap(TimeoutError)
            raise ConsoleError(
                f"the runtime exited without sending a terminal over the console socket within {grace:g}s"
            )

        d = self.console.receive()
        d.addTimeout(grace, self._clock)
        d.addErrback(timedOut)
        return d.addCallback(self._connect)

    def _connect(self, master: int) -> None:
        self.size.setMaster(master)
        self._stream.setSource(master)
        self._stream.ended.addBoth(self._masterClosed)
        self._stdin.setTarget(os.dup(master), watchReader=False)

    def _masterClosed(self, result: object) -> object:
        self.size.masterGone()
        # The duplicate used for input goes with it, queued input or not.
        if self._stdin.writer is not None:
            self._stdin.writer.abort()
        return result

    def close(self) -> None:
        """Close the socket, the resize FIFO and the input duplicate."""
        self.console.close()
        if self._fifo is not None:
            self._fifo.close()
        self._masterClosed(None)
