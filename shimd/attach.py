# -*- test-case-name: tests.test_attach -*-
"""
The attach socket: clients (iSulad, L{shimd.client}) attach FIFO triples to
the running container.

Wire protocol (spec section 6.3, plus a JSON form; see README.rst)::

    client -> shim   "<in> <out> <err>"                          (text form)
                     {"stdin": .., "stdout": .., "stderr": ..,
                      "detachKeys": "ctrl-p,ctrl-q"}              (JSON form)
    shim -> client   a native-endian C int (struct "=i"): 0 or -1

Framing (iSulad sends its message in one write, with no terminator, and then
waits for the reply): a message is complete

 - in the JSON form, when the object's braces balance;
 - in the text form, at a newline, or as soon as it is three
   space-separated absolute paths (or C{(null)}) of which the last is an
   existing FIFO (a piece of a path is very unlikely to be one);
 - otherwise when the sender pauses for L{AttachFactory.idleTimeout} seconds
   or half-closes the connection.

Every complete message gets exactly one reply, and the connection stays open
for further requests.  Blank messages are skipped, except that a connection
that never sent a request and then half-closes or pauses gets C{-1}
("empty message").  A message longer than L{MAX_MESSAGE} gets C{-1} and the
connection is closed.

Sessions: the out and err FIFOs become sinks of the container's stdout and
stderr streams (stderr goes to the err FIFO, unlike iSulad's bug B1); the in
FIFO becomes a source of the container's stdin.  A session ends when its in
FIFO hangs up (after what is pending was read), when its out FIFO is gone,
on detach, or when the container's output ends.  Its stdin end of file does
not close the container's stdin: other sessions may still type.

Every rejection is logged at level C{error} in the C{shimd.attach}
namespace, which the service routes to C{attach-log.json}.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
import struct
from dataclasses import dataclass
from typing import Any, Callable

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol, IPullProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from shimd.fdio import ReadPipe, WritePipe
from shimd.launch import listenAttach
from shimd.listener import UnixListener
from shimd.shimlog import ATTACH_LOG_NAME, jsonLineObserver
from shimd.sockets import UnixSocket
from shimd.streams import OutputStream, StdinPipe

LOG_NAMESPACE = "shimd.attach"
"""Namespace of every attach event; C{attach-log.json} gets these."""

DETACH_MESSAGE = b"read escape sequence"
"""Written (in one write) to a session's out FIFO when it detaches."""

DEFAULT_DETACH_KEYS = "ctrl-q"
MAX_SESSIONS = 16
OUTPUT_PIPE_SIZE = 1 << 20
"""F_SETPIPE_SZ for a session's out and err FIFOs: with room for a whole
read of container output, a write seldom leaves a remainder to queue (and
copy again) in user space."""
MAX_MESSAGE = 32 * 1024
"""A request longer than this is refused and its connection closed."""

STREAMS = ("stdin", "stdout", "stderr")
_NULL_TOKEN = b"(null)"
_WHITESPACE = b" \t\r\n"

_log = Logger(namespace=LOG_NAMESPACE)


class RequestError(Exception):
    """An attach request is refused; C{str()} says which path and why."""


# -- detach keys ---------------------------------------------------------

_CTRL = {"@": 0, "[": 27, "\\": 28, "]": 29, "^": 30, "_": 31}
_CTRL.update({chr(ord("a") + i): i + 1 for i in range(26)})


def parseDetachKeys(spec: str) -> bytes:
    """
    Parse detach keys in Docker's syntax: a comma-separated list of
    C{ctrl-<x>} (x one of C{a-z @ [ \\ ] ^ _}) or single ASCII characters.

    @return: the byte sequence; C{b""} (detach disabled) for C{""}.
    @raise ValueError: for anything else.
    """
    if spec == "":
        return b""
    keys = bytearray()
    for key in spec.split(","):
        if len(key) == 1 and ord(key) < 128:
            keys.append(ord(key))
        elif len(key) == 6 and key[:5].lower() == "ctrl-" and key[5].lower() in _CTRL:
            keys.append(_CTRL[key[5].lower()])
        else:
            raise ValueError(f"invalid detach keys {spec!r}: unknown key {key!r}")
    return bytes(keys)


class DetachFilter:
    """
    Finds a detach key sequence in a byte stream that arrives in pieces.

    Bytes that may start the sequence are held back until the next byte
    decides; if it does not complete the sequence they are passed on, in
    order, before it.
    """

    def __init__(self, keys: bytes) -> None:
        self.keys = keys
        self._held = b""

    def feed(self, data: bytes) -> tuple[bytes, bool]:
        """
        @return: the bytes to deliver, and whether the sequence was seen
            (then everything after it in C{data} is dropped).
        """
        keys = self.keys
        if not keys:
            return data, False
        out = bytearray()
        i, n, first = 0, len(data), keys[:1]
        while i < n:
            if not self._held:
                j = data.find(first, i)
                if j < 0:
                    out += data[i:]
                    break
                out += data[i:j]
                i = j
            candidate = self._held + data[i : i + 1]
            i += 1
            if candidate == keys:
                self._held = b""
                return bytes(out), True
            if keys.startswith(candidate):
                self._held = candidate
                continue
            keep = _overlap(candidate, keys)
            out += candidate[: len(candidate) - keep]
            self._held = candidate[len(candidate) - keep :]
        return bytes(out), False

    def flush(self) -> bytes:
        """The held bytes (at end of input they are delivered too)."""
        held, self._held = self._held, b""
        return held


def _overlap(candidate: bytes, keys: bytes) -> int:
    """Length of the longest proper suffix of C{candidate} that starts C{keys}."""
    for k in range(min(len(candidate), len(keys)) - 1, 0, -1):
        if candidate.endswith(keys[:k]):
            return k
    return 0


# -- requests --------------------------------------------------------------


@dataclass
class AttachRequest:
    """One parsed request; a stream is L{None} when not attached."""

    stdin: str | None
    stdout: str | None
    stderr: str | None
    detachKeys: str | None = None

    def paths(self) -> dict[str, str | None]:
        return {"stdin": self.stdin, "stdout": self.stdout, "stderr": self.stderr}


def _preview(message: bytes, limit: int = 80) -> str:
    text = repr(message[:limit])
    return text + (f" ({len(message)} bytes)" if len(message) > limit else "")


def parseRequest(message: bytes) -> AttachRequest:
    """
    Parse one complete message, in the text or the JSON form.

    @raise RequestError: if it is neither.
    """
    if message.lstrip(_WHITESPACE).startswith(b"{"):
        return _parseJSON(message)
    if not message.strip(_WHITESPACE):
        raise RequestError("empty message")
    tokens = message.split(b" ")
    if len(tokens) != 3:
        raise RequestError(
            f"expected 3 space-separated paths (stdin stdout stderr), got {len(tokens)} "
            f"tokens in {_preview(message)}"
        )
    stdin, stdout, stderr = (None if t == _NULL_TOKEN else os.fsdecode(t) for t in tokens)
    return AttachRequest(stdin, stdout, stderr)


def _parseJSON(message: bytes) -> AttachRequest:
    try:
        obj = json.loads(message)
    except ValueError as e:
        raise RequestError(f"invalid JSON ({e}) in {_preview(message)}") from None
    unknown = sorted(set(obj) - {*STREAMS, "detachKeys"})
    if unknown:
        raise RequestError(f"unknown keys in the JSON message: {', '.join(unknown)}")
    for key in (*STREAMS, "detachKeys"):
        if obj.get(key) is not None and not isinstance(obj[key], str):
            raise RequestError(f"{key} must be a string or null, not {json.dumps(obj[key])[:80]}")
    return AttachRequest(obj.get("stdin"), obj.get("stdout"), obj.get("stderr"), obj.get("detachKeys"))


def _isFifo(path: str) -> bool:
    try:
        return stat.S_ISFIFO(os.stat(path).st_mode)
    except OSError:
        return False


def frameMessage(
    buffer: bytes, final: bool, exists: Callable[[str], bool] = _isFifo
) -> tuple[bytes, bytes] | None:
    """
    Cut the first complete message off C{buffer}.

    @param final: no more data is coming for this message (the sender
        paused or half-closed): whatever is there is the message.
    @return: (message, rest), or L{None} if the message is not complete.
    """
    body = buffer.lstrip(_WHITESPACE)
    if not body:
        return (buffer, b"") if final and buffer else None
    if body.startswith(b"{"):
        end = _jsonObjectEnd(buffer, len(buffer) - len(body))
        if end is None:
            return (buffer, b"") if final else None
        return buffer[:end], buffer[end:]
    newline = buffer.find(b"\n")
    if newline >= 0:
        return buffer[:newline].rstrip(b"\r"), buffer[newline + 1 :]
    if final or _isCompleteTriple(buffer, exists):
        return buffer, b""
    return None


def _jsonObjectEnd(buffer: bytes, start: int) -> int | None:
    """The index just past the JSON object starting at C{start}, if complete."""
    depth, inString, escaped = 0, False, False
    for i in range(start, len(buffer)):
        c = buffer[i]
        if inString:
            if escaped:
                escaped = False
            elif c == 0x5C:
                escaped = True
            elif c == 0x22:
                inString = False
        elif c == 0x22:
            inString = True
        elif c in b"{[":
            depth += 1
        elif c in b"}]":
            depth -= 1
            if depth <= 0:
                return i + 1
    return None


def _isCompleteTriple(buffer: bytes, exists: Callable[[str], bool]) -> bool:
    tokens = buffer.split(b" ")
    if len(tokens) != 3 or not all(t == _NULL_TOKEN or t.startswith(b"/") for t in tokens):
        return False
    if tokens[2] == _NULL_TOKEN:
        return True
    try:
        return exists(os.fsdecode(tokens[2]))
    except ValueError:
        return False


# -- validation ------------------------------------------------------------


def checkFifo(name: str, path: str, workdir: str, ownerUid: int = 0) -> os.stat_result:
    """
    Check one path of a request (spec 6.3 step 5): absolute; its real path
    strictly inside C{workdir} (a directory-boundary test, not a string
    prefix: B16); a FIFO; mode 0600; owned by C{ownerUid}.

    @param workdir: the shim's workdir, already a real path.
    @return: the C{lstat} of the real path.
    @raise RequestError: naming the stream, the path and the reason.
    """

    def refuse(why: str) -> RequestError:
        return RequestError(f'{name} path "{path}" {why}')

    if not path:
        raise refuse("is empty")
    if "\0" in path:
        raise refuse("contains a NUL byte")
    if not os.path.isabs(path):
        raise refuse("is not an absolute path")
    try:
        real = os.path.realpath(path, strict=True)
    except OSError as e:
        raise refuse(f"cannot be resolved: {e.strerror}") from None
    if real == workdir or os.path.commonpath([real, workdir]) != workdir:
        raise refuse(f"resolves to {real}, which is not inside the workdir {workdir}")
    try:
        st = os.lstat(real)
    except OSError as e:
        raise refuse(f"cannot be examined: {e.strerror}") from None
    if not stat.S_ISFIFO(st.st_mode):
        raise refuse("is not a FIFO")
    if stat.S_IMODE(st.st_mode) != 0o600:
        raise refuse(f"has mode {stat.S_IMODE(st.st_mode):04o}, not 0600")
    if st.st_uid != ownerUid:
        raise refuse(f"is owned by uid {st.st_uid}, not {ownerUid}")
    return st


def openChecked(name: str, path: str, st: os.stat_result) -> int:
    """
    Open a checked FIFO without blocking (in: read; out, err: write) and
    make sure it is still the file that was checked.

    @raise RequestError: ENXIO (no reader on out/err) or any other failure.
    """
    flags = os.O_RDONLY if name == "stdin" else os.O_WRONLY
    real = os.path.realpath(path)
    try:
        fd = os.open(real, flags | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY | os.O_NOFOLLOW)
    except OSError as e:
        if e.errno == errno.ENXIO:
            raise RequestError(
                f'{name} path "{path}" has no reader (open its read end before the request)'
            ) from None
        raise RequestError(f'{name} path "{path}" cannot be opened: {e.strerror}') from None
    now = os.fstat(fd)
    if (now.st_dev, now.st_ino, now.st_mode, now.st_uid) != (st.st_dev, st.st_ino, st.st_mode, st.st_uid):
        os.close(fd)
        raise RequestError(f'{name} path "{path}" changed while it was being checked')
    if name != "stdin":
        try:
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, OUTPUT_PIPE_SIZE)
        except OSError:
            pass  # above /proc/sys/fs/pipe-max-size: keep the size it has
    return fd


# -- sessions --------------------------------------------------------------


@implementer(IPullProducer)
class _Goodbye:
    """Writes the detach message on its own once the writer's queue is empty."""

    def __init__(self, writer: WritePipe, message: bytes, then: Callable[[], object]) -> None:
        self._writer = writer
        self._message = message
        self._then = then

    def resumeProducing(self) -> None:
        if self._writer.pending():
            return  # called again when the queue has drained
        self._writer.unregisterProducer()
        self._writer.write(self._message)
        self._then()

    def stopProducing(self) -> None:
        pass


class AttachSession:
    """
    One attached FIFO triple.

    @ivar number: names the session in the log.
    @ivar ended: why it ended, once it has.
    """

    def __init__(self, server: AttachServer, number: int, fds: dict[str, int], keys: bytes) -> None:
        self.server = server
        self.number = number
        self.ended: str | None = None
        self._filter = DetachFilter(keys)
        self._timers: dict[WritePipe, Any] = {}
        reactor, clock = server.reactor, server.clock
        self.out = self.err = None
        self.input: ReadPipe | None = None
        if "stdout" in fds:
            self.out = WritePipe(reactor, fds["stdout"], clock, lost=self._outLost)
        if "stderr" in fds:
            self.err = WritePipe(reactor, fds["stderr"], clock, lost=self._errLost)
        if "stdin" in fds:
            self.input = ReadPipe(reactor, fds["stdin"], self._inData, self._inEnded)

    def start(self) -> None:
        server = self.server
        for stream, writer, name in ((server.stdout, self.out, "stdout"), (server.stderr, self.err, "stderr")):
            if stream is not None and writer is not None:
                stream.addSink(writer, f"attach session {self.number} {name}")
        if self.input is not None:
            if server.stdin is not None:
                server.stdin.addSource(self.input)
            else:
                self.input.startReading()

    # -- input -------------------------------------------------------------

    def _inData(self, data: bytes) -> None:
        if self.ended:
            return
        deliver, detached = self._filter.feed(data)
        if deliver and self.server.stdin is not None:
            self.server.stdin.write(deliver)
        if detached:
            self.end("detached", goodbye=DETACH_MESSAGE)

    def _inEnded(self, reason: Failure) -> None:
        held = self._filter.flush()
        if held and not self.ended and self.server.stdin is not None:
            self.server.stdin.write(held)
        self.end("its stdin FIFO was closed")

    # -- output ------------------------------------------------------------

    def _outLost(self, reason: Failure) -> None:
        self._cancelTimer(self.out)
        self.end(_lostWhy("stdout", reason))

    def _errLost(self, reason: Failure) -> None:
        self._cancelTimer(self.err)
        if self.out is None:
            self.end(_lostWhy("stderr", reason))

    def _cancelTimer(self, writer: WritePipe | None) -> None:
        timer = self._timers.pop(writer, None) if writer is not None else None
        if timer is not None and timer.active():
            timer.cancel()

    def _closeWriter(self, stream: OutputStream | None, writer: WritePipe | None, goodbye: bytes, flush: bool) -> None:
        if writer is None or writer.fd < 0:
            return
        if stream is not None:
            stream.removeSink(writer)
        elif writer.producer is not None:
            writer.unregisterProducer()
        if not flush:
            writer.abort()
            return
        # Flush what is queued (bounded by the stall timeout), then close.
        self._timers[writer] = self.server.clock.callLater(self.server.stallTimeout, writer.abort)
        if goodbye:
            writer.registerProducer(_Goodbye(writer, goodbye, writer.loseConnection), False)
        else:
            writer.loseConnection()

    # -- ending ------------------------------------------------------------

    def end(self, why: str, goodbye: bytes = b"", flush: bool = True) -> None:
        """End the session: stop its input, flush and close its outputs."""
        if self.ended:
            return
        self.ended = why
        server = self.server
        server._sessionEnded(self, why)
        if self.input is not None:
            if server.stdin is not None:
                server.stdin.removeSource(self.input)
            self.input.close()
        self._closeWriter(server.stdout, self.out, goodbye, flush)
        self._closeWriter(server.stderr, self.err, b"", flush)


def _lostWhy(name: str, reason: Failure) -> str:
    if reason.check(ConnectionDone):
        return f"its {name} FIFO was closed (the container's output ended)"
    return f"its {name} FIFO reader is gone or stopped reading"


# -- the server ------------------------------------------------------------


class AttachServer:
    """
    Owns the attach socket and the sessions of one container.

    @param stdout: the container's stdout stream (L{None}: not available).
    @param stderr: its stderr stream (L{None} for a terminal).
    @param stdin: its stdin (L{None}: input is read and dropped).
    @param detachKeys: the default detach keys (Docker syntax).
    @param ownerUid: the owner every FIFO must have.
    """

    def __init__(
        self,
        reactor: Any,
        workdir: str,
        stdout: OutputStream | None,
        stderr: OutputStream | None,
        stdin: StdinPipe | None,
        detachKeys: str = DEFAULT_DETACH_KEYS,
        maxSessions: int = MAX_SESSIONS,
        stallTimeout: float = 10.0,
        ownerUid: int = 0,
        clock: Any = None,
    ) -> None:
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.workdir = os.path.realpath(workdir)
        self.stdout = stdout
        self.stderr = stderr
        self.stdin = stdin
        self.detachKeys = parseDetachKeys(detachKeys)
        self.maxSessions = maxSessions
        self.stallTimeout = stallTimeout
        self.ownerUid = ownerUid
        self.sessions: list[AttachSession] = []
        self.factory = AttachFactory(self)
        self.port: Any = None
        self.socketPath: str | None = None
        self.stopped = False
        self._count = 0
        self._observer: Any = None

    # -- listening ---------------------------------------------------------

    def listen(self, path: str) -> bool:
        """
        Listen on C{path} (relative to the workdir), mode 0600.  A stale
        socket is replaced; a live one (another process listening) is not.

        @return: whether it worked; a failure is logged and attach stays off.
        """
        listening, why = listenAttach(self.workdir, path)
        if listening is None:
            _log.error("{why}; attach is disabled", why=why)
            return False
        self.adopt(listening)
        return True

    def adopt(self, listening: UnixSocket) -> None:
        """Accept requests on a socket made before the reactor (L{shimd.launch})."""
        self.port = UnixListener(self.reactor, listening, self.factory)
        self.socketPath = listening.path
        _log.info("listening for attach requests on {path}", path=listening.path)

    def stop(self) -> None:
        """Stop listening (the socket file is removed), end every session."""
        if self.stopped:
            return
        self.stopped = True
        if self.port is not None:
            self.port.close()  # the socket file goes at once
        for connection in list(self.factory.connections):
            assert connection.transport is not None
            connection.transport.loseConnection()
        for session in list(self.sessions):
            session.end("the shim is stopping", flush=False)
        if self._observer is not None:
            globalLogPublisher.removeObserver(self._observer)
            self._observer.close()
            self._observer = None

    # -- requests ----------------------------------------------------------

    def handle(self, request: AttachRequest) -> int:
        """Validate, open and start a session: 0, or -1 (and a logged reason)."""
        fds: dict[str, int] = {}
        try:
            keys = self._admit(request)
            checked = {}
            for name, path in request.paths().items():
                if path is not None:
                    checked[name] = (path, checkFifo(name, path, self.workdir, self.ownerUid))
            stdin = checked.get("stdin")
            for name in ("stdout", "stderr"):
                if stdin is not None and name in checked and _same(stdin[1], checked[name][1]):
                    raise RequestError(f'stdin and {name} are the same FIFO "{stdin[0]}"')
            for name, (path, st) in checked.items():
                fds[name] = openChecked(name, path, st)
        except RequestError as e:
            for fd in fds.values():
                os.close(fd)
            _log.error("attach request refused: {why}", why=str(e))
            return -1
        self._count += 1
        session = AttachSession(self, self._count, fds, keys)
        self.sessions.append(session)
        session.start()
        _log.info(
            "attach session {n} started (stdin {stdin}, stdout {stdout}, stderr {stderr}); {count} attached",
            n=session.number, count=len(self.sessions), **request.paths(),
        )
        return 0

    def _admit(self, request: AttachRequest) -> bytes:
        if self.stopped:
            raise RequestError("the container has exited")
        if len(self.sessions) >= self.maxSessions:
            raise RequestError(f"{len(self.sessions)} sessions are attached, the limit is {self.maxSessions}")
        if all(path is None for path in request.paths().values()):
            raise RequestError("no stream to attach (stdin, stdout and stderr are all null)")
        if request.detachKeys is None:
            return self.detachKeys
        try:
            return parseDetachKeys(request.detachKeys)
        except ValueError as e:
            raise RequestError(str(e)) from None

    def _sessionEnded(self, session: AttachSession, why: str) -> None:
        if session in self.sessions:
            self.sessions.remove(session)
        _log.info("attach session {n} ended: {why}", n=session.number, why=why)


def _same(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def startAttachServer(
    reactor: Any,
    workdir: str,
    listening: UnixSocket | None,
    listenError: str | None,
    streams: dict[str, OutputStream],
    stdin: StdinPipe | None,
    detachKeys: str = DEFAULT_DETACH_KEYS,
    stallTimeout: float = 10.0,
) -> AttachServer:
    """
    What the shim does when process.json names an attach socket: open
    C{attach-log.json}, then accept on C{listening} (made by
    L{shimd.launch.launchShim}), or log C{listenError}.  Neither failure
    stops the container.
    """
    observer = None
    try:
        observer = jsonLineObserver(os.path.join(workdir, ATTACH_LOG_NAME), "info", namespacePrefix=LOG_NAMESPACE)
        globalLogPublisher.addObserver(observer)
    except OSError as e:
        _log.warn("cannot open the attach log: {e}", e=e)
    try:
        parseDetachKeys(detachKeys)
    except ValueError as e:
        _log.error("{e}; using {default}", e=e, default=DEFAULT_DETACH_KEYS)
        detachKeys = DEFAULT_DETACH_KEYS
    server = AttachServer(
        reactor, workdir, streams.get("stdout"), streams.get("stderr"), stdin,
        detachKeys=detachKeys, stallTimeout=stallTimeout,
    )
    server._observer = observer
    if listening is not None:
        server.adopt(listening)
    else:
        _log.error("{why}; attach is disabled", why=listenError)
    return server


# -- the protocol ------------------------------------------------------------


@implementer(IHalfCloseableProtocol)
class AttachProtocol(Protocol):
    """One connection to the attach socket: frames requests, replies."""

    factory: AttachFactory

    def __init__(self) -> None:
        self._buffer = b""
        self._idle: Any = None
        self._requests = 0
        self._closing = False

    def connectionMade(self) -> None:
        self.factory.connections.add(self)

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self._buffer += data
        self._process(final=False)

    def readConnectionLost(self) -> None:
        # Half-close: what we have is the last message.  Twisted stops
        # reading this socket, so there is nothing to spin on (B25).
        self._process(final=True)
        if self._requests == 0 and not self._closing:
            self._reply(RequestError("empty message (the client closed its side without a request)"))
        self._closing = True
        assert self.transport is not None
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        self._closing = True
        assert self.transport is not None
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._cancelIdle()
        self.factory.connections.discard(self)

    def _process(self, final: bool) -> None:
        self._cancelIdle()
        while not self._closing:
            framed = frameMessage(self._buffer, final)
            if framed is None:
                if len(self._buffer) > self.factory.maxMessage:
                    self._reply(RequestError(
                        f"message longer than {self.factory.maxMessage} bytes: {_preview(self._buffer)}"
                    ))
                    self._closing = True
                    self._buffer = b""
                    assert self.transport is not None
                    self.transport.loseConnection()
                break
            message, self._buffer = framed
            if not message.strip(_WHITESPACE):
                if final and self._requests == 0:
                    self._reply(RequestError("empty message"))
                continue
            try:
                request = parseRequest(message)
            except RequestError as e:
                self._reply(e)
                continue
            self._reply(request)
        if self._buffer and not final and not self._closing:
            self._idle = self.factory.clock.callLater(self.factory.idleTimeout, self._process, True)

    def _reply(self, what: AttachRequest | RequestError) -> None:
        self._requests += 1
        if isinstance(what, RequestError):
            _log.error("attach request refused: {why}", why=str(what))
            code = -1
        else:
            try:
                code = self.factory.server.handle(what)
            except Exception:
                _log.failure("attach request failed")
                code = -1
        assert self.transport is not None
        self.transport.write(struct.pack("=i", code))

    def _cancelIdle(self) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None


class AttachFactory(Factory[Any]):
    """
    @ivar idleTimeout: seconds of silence after which a partial message is
        taken as complete.
    @ivar maxMessage: longest message accepted.
    """

    protocol: type[AttachProtocol] = AttachProtocol
    noisy = False  # no "Starting factory" lines in attach-log.json
    idleTimeout = 0.2
    maxMessage = MAX_MESSAGE

    def __init__(self, server: AttachServer) -> None:
        self.server = server
        self.clock = server.clock
        self.connections: set[AttachProtocol] = set()
