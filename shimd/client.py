# -*- test-case-name: tests.test_client -*-
"""
The attach client: what an engine (or C{shimd attach}) does to attach to a
container through its shim.

L{attach} makes a private FIFO triple under C{<workdir>/attach/<random>/},
opens its own ends first (as iSulad does), sends the request in the JSON
form and waits for the shim's C{int} reply: at most C{timeout} seconds, and
no longer than the shim lives (B19: a dead shim, or a connection closed
without a reply, fails at once).  The FIFO files are removed as soon as the
reply is in; the open descriptors are what the caller uses.

L{runAttach} is C{shimd attach}: it copies its stdin to the container and
the container's stdout and stderr to its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import struct
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.error import ConnectError
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from shimd.attach import DETACH_MESSAGE, parseDetachKeys
from shimd.localterm import localTerminal
from shimd.shimlog import ATTACH_LOG_NAME, errorMessages

ATTACH_TIMEOUT = 120.0
"""Seconds to wait for the shim's reply (iSulad: ATTACH_WAIT_TIME)."""

EXIT_FAILED = 125
"""C{shimd attach}'s own failure (the Docker/Podman convention)."""

_FIFO_NAMES = {"stdin": "in-fifo", "stdout": "out-fifo", "stderr": "err-fifo"}


class AttachError(Exception):
    """Attaching failed; C{str()} says why."""


class AttachTimeout(AttachError):
    """The shim did not reply in time."""


@dataclass
class Attachment:
    """
    An attached session: the caller's ends of the FIFOs (L{None} for a
    stream not attached).  Write the container's input to C{stdin}; read
    its output from C{stdout} and C{stderr} (non-blocking).  Closing
    C{stdin} ends the session; C{stdout} ends (EOF) when the session does.
    """

    stdin: int | None
    stdout: int | None
    stderr: int | None

    def close(self) -> None:
        for name in ("stdin", "stdout", "stderr"):
            fd = getattr(self, name)
            if fd is not None:
                setattr(self, name, None)
                os.close(fd)


def socketPath(workdir: str) -> str:
    """The attach socket: process.json's C{attach_socket}, else C{attach.sock}."""
    try:
        with open(os.path.join(workdir, "process.json")) as f:
            path = json.load(f).get("attach_socket")
        if isinstance(path, str) and path:
            return os.path.join(workdir, path)
    except (OSError, ValueError, AttributeError):
        pass
    return os.path.join(workdir, "attach.sock")


def shimAlive(workdir: str) -> bool | None:
    """Whether the shim named by C{<workdir>/shim-pid} lives (L{None}: no such file)."""
    try:
        with open(os.path.join(workdir, "shim-pid")) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        return None
    return _processAlive(pid)


def _processAlive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class _FifoTriple:
    """A private directory with the FIFOs; our ends are opened at once."""

    def __init__(self, workdir: str, streams: list[str]) -> None:
        base = os.path.join(workdir, "attach")
        os.makedirs(base, mode=0o700, exist_ok=True)
        self.directory = tempfile.mkdtemp(dir=base)  # mode 0700
        self.paths: dict[str, str] = {}
        self.fds: dict[str, int] = {}
        try:
            for name in streams:
                path = os.path.join(self.directory, _FIFO_NAMES[name])
                os.mkfifo(path, 0o600)
                os.chmod(path, 0o600)  # whatever the umask
                self.paths[name] = path
                # in: O_RDWR, so the shim never sees a hang-up until we close
                # it; out, err: read ends first, so the shim can open them.
                flags = os.O_RDWR if name == "stdin" else os.O_RDONLY
                self.fds[name] = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC)
        except BaseException:
            self.close()
            raise

    def request(self, detachKeys: str | None) -> bytes:
        message: dict[str, Any] = {name: self.paths.get(name) for name in _FIFO_NAMES}
        if detachKeys is not None:
            message["detachKeys"] = detachKeys
        return json.dumps(message).encode()

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        self.remove()


class _ReplyProtocol(Protocol):
    """Sends the request; C{reply} fires with the shim's C{int}."""

    def __init__(self, message: bytes) -> None:
        self.message = message
        self.reply: Deferred[int] = Deferred()
        self._received = b""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.message)

    def dataReceived(self, data: bytes) -> None:
        self._received += data
        if len(self._received) >= 4 and not self.reply.called:
            self.reply.callback(struct.unpack("=i", self._received[:4])[0])

    def connectionLost(self, reason: Failure | None = None) -> None:
        if not self.reply.called:
            short = f" (a short reply of {len(self._received)} bytes)" if self._received else ""
            self.reply.errback(AttachError(f"the shim closed the attach connection without a reply{short}"))


def attach(
    reactor: Any,
    workdir: str,
    stdin: bool = True,
    stdout: bool = True,
    stderr: bool = True,
    detachKeys: str | None = None,
    timeout: float = ATTACH_TIMEOUT,
    clock: Any = None,
    socket: str | None = None,
    pollInterval: float = 0.1,
) -> Deferred[Attachment]:
    """
    Attach to the container whose shim works in C{workdir}.

    @param detachKeys: Docker syntax; L{None}: the shim's default.
    @param clock: for the timeout and the liveness checks (default: reactor).
    @param socket: the attach socket (default: L{socketPath}).
    @return: fires with an L{Attachment}, or fails with L{AttachError}
        (L{AttachTimeout} after C{timeout} seconds without a reply).
    """
    return ensureDeferred(
        _attach(reactor, os.path.abspath(workdir), [n for n, on in
                (("stdin", stdin), ("stdout", stdout), ("stderr", stderr)) if on],
                detachKeys, timeout, clock if clock is not None else reactor,
                socket or socketPath(workdir), pollInterval)
    )


async def _attach(
    reactor: Any, workdir: str, streams: list[str], detachKeys: str | None,
    timeout: float, clock: Any, path: str, pollInterval: float,
) -> Attachment:
    if detachKeys is not None:
        try:
            parseDetachKeys(detachKeys)
        except ValueError as e:
            raise AttachError(str(e)) from None
    try:
        fifos = _FifoTriple(workdir, streams)
    except OSError as e:
        raise AttachError(f"cannot make the attach FIFOs in {workdir}: {e}") from None
    try:
        code = await _request(reactor, clock, workdir, path, fifos.request(detachKeys), timeout, pollInterval)
        if code != 0:
            raise AttachError(f"the shim refused the attach request ({code}){_shimReason(workdir, fifos.directory)}")
    except BaseException:
        fifos.close()
        raise
    fifos.remove()  # our ends and the shim's are open; the names are not needed
    return Attachment(*(fifos.fds.get(name) for name in _FIFO_NAMES))


async def _request(
    reactor: Any, clock: Any, workdir: str, path: str, message: bytes, timeout: float, pollInterval: float
) -> int:
    protocol = _ReplyProtocol(message)
    try:
        await connectProtocol(UNIXClientEndpoint(reactor, path), protocol)
    except ConnectError as e:
        alive = shimAlive(workdir)
        state = " (the shim is not running)" if alive is False else ""
        why = os.strerror(e.osError) if isinstance(e.osError, int) else str(e.osError or e)
        raise AttachError(f"cannot connect to the attach socket {path}{state}: {why}") from None

    def checkShim() -> None:
        if shimAlive(workdir) is False and not protocol.reply.called:
            protocol.reply.errback(AttachError("the shim is not running (it died before replying)"))

    watch = LoopingCall(checkShim)
    watch.clock = clock
    watch.start(pollInterval, now=False)
    try:
        return await protocol.reply.addTimeout(timeout, clock)
    except defer.TimeoutError:
        raise AttachTimeout(f"no reply from the shim within {timeout:g}s") from None
    finally:
        watch.stop()
        if protocol.transport is not None:
            protocol.transport.loseConnection()


def _shimReason(workdir: str, fifoDir: str) -> str:
    """The shim's reason from attach-log.json (the last error naming our FIFOs)."""
    errors = errorMessages(os.path.join(workdir, ATTACH_LOG_NAME), tail=65536)
    mine = [msg for msg in errors if fifoDir in msg]
    chosen = mine or errors
    return f": {chosen[-1]}" if chosen else ""


# -- shimd attach ------------------------------------------------------------


def _writeAll(fd: int, data: bytes) -> None:
    """Write everything, waiting when C{fd} is non-blocking and full."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            select.select([], [fd], [])


def _copyInput(source: int, target: int) -> None:
    """Copy our stdin to the session (a thread: never touches the reactor)."""
    while True:
        try:
            data = os.read(source, 65536)
        except OSError:
            return
        if not data:
            return  # end of our input; the session (and its output) go on
        try:
            _writeAll(target, data)
        except OSError:
            return


class _Copier:
    """
    Copies the session's output to our stdout and stderr, and tells a
    detach (the shim's C{"read escape sequence"}, then end of file) from
    the end of the container's output.
    """

    def __init__(self, reactor: Any, session: Attachment, stdoutFd: int, stderrFd: int,
                 done: Callable[[str], object]) -> None:
        from shimd.fdio import ReadPipe

        self._targets = {"stdout": stdoutFd, "stderr": stderrFd}
        self._held = b""
        self._open: set[str] = set()
        self._done = done
        for name in ("stdout", "stderr"):
            fd = getattr(session, name)
            if fd is not None:
                self._open.add(name)
                pipe = ReadPipe(reactor, os.dup(fd), self._receiver(name), self._ender(name))
                pipe.startReading()

    def _receiver(self, name: str) -> Callable[[bytes], None]:
        def received(data: bytes) -> None:
            if name == "stdout":
                # The detach message arrives in one write, after the output
                # queued before it; hold it back until we know what follows.
                data, self._held = self._held + data, b""
                if data.endswith(DETACH_MESSAGE):
                    data, self._held = data[: -len(DETACH_MESSAGE)], DETACH_MESSAGE
            self._write(name, data)

        return received

    def _write(self, name: str, data: bytes) -> None:
        try:
            _writeAll(self._targets[name], data)
        except OSError as e:
            self._open.clear()  # our reader is gone: nothing more to do
            self._done(f"cannot write to {name}: {e.strerror}")

    def _ender(self, name: str) -> Callable[[Failure], None]:
        def ended(reason: Failure) -> None:
            if name not in self._open:
                return
            self._open.discard(name)
            if not self._open:
                self._done("detached" if self._held == DETACH_MESSAGE else "ended")

        return ended


def _terminal(workdir: str) -> tuple[bool, str | None]:
    """Whether the container has a terminal, and its resize FIFO."""
    try:
        with open(os.path.join(workdir, "process.json")) as f:
            state = json.load(f)
        resize = state.get("resizeFifo")
        return state.get("terminal") is True, os.path.join(workdir, resize) if resize else None
    except (OSError, ValueError, AttributeError, TypeError):
        return False, None


def waitForExitCode(workdir: str, timeout: float = ATTACH_TIMEOUT, interval: float = 0.05) -> int | None:
    """
    After the output ended: the container's exit code from C{<workdir>/exit}
    (the shim writes it before it exits), or L{None} if the container still
    runs (the session was ended by the shim) or the shim died without one.
    """
    deadline = time.monotonic() + timeout
    pid = _readInt(os.path.join(workdir, "pid"))
    while True:
        code = _readInt(os.path.join(workdir, "exit"))
        if code is not None:
            return code
        if pid is not None and _processAlive(pid):
            return None
        if shimAlive(workdir) is False or time.monotonic() > deadline:
            return _readInt(os.path.join(workdir, "exit"))
        time.sleep(interval)


def _readInt(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def runAttach(
    workdir: str,
    detachKeys: str | None = None,
    attachStdin: bool = True,
    stdinFd: int = 0,
    stdoutFd: int = 1,
    stderrFd: int = 2,
    reactor: Any = None,
) -> int:
    """
    C{shimd attach}: 0 on detach; the container's exit code when it exits;
    128+N when signal N interrupts it (the container runs on);
    L{EXIT_FAILED} when attaching fails.
    """
    workdir = os.path.abspath(workdir)

    def fail(message: str) -> int:
        sys.stderr.write(f"shimd: {message}\n")
        sys.stderr.flush()
        return EXIT_FAILED

    if detachKeys is not None:
        try:
            parseDetachKeys(detachKeys)
        except ValueError as e:
            return fail(str(e))
    if not os.path.isfile(os.path.join(workdir, "process.json")):
        return fail(f"{workdir} is not a container workdir (it has no process.json)")
    if os.path.exists(os.path.join(workdir, "exit")):
        return fail("the container has exited; there is nothing to attach to")
    terminal, resizeFifo = _terminal(workdir)
    local: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
    if attachStdin and terminal:
        if not os.isatty(stdinFd):
            return fail("the input device is not a TTY")
        # Raw mode (every key, the detach keys too, goes to the pty) and
        # the window size to the resize FIFO; undone on every exit path.
        local = localTerminal(stdinFd, resizeFifo)
    if reactor is None:
        from twisted.internet import reactor
    outcome: dict[str, Any] = {}

    def finished(end: str) -> None:
        if "end" not in outcome:
            outcome["end"] = end
            reactor.callLater(0, reactor.stop)

    def attached(session: Attachment) -> None:
        outcome["session"] = session
        _Copier(reactor, session, stdoutFd, stderrFd, finished)
        if session.stdin is not None:
            threading.Thread(target=_copyInput, args=(stdinFd, session.stdin), daemon=True).start()

    def failed(reason: Failure) -> None:
        outcome["error"] = reason.getErrorMessage() if reason.check(AttachError) else str(reason.value)
        reactor.stop()

    def start() -> None:
        attach(reactor, workdir, stdin=attachStdin, detachKeys=detachKeys).addCallbacks(attached, failed)

    def stopping() -> None:
        # With no end yet, a signal (SIGINT, SIGTERM) stops the reactor.  Its
        # shutdown then closes the session's FIFOs, which must not pass for
        # the end of the container's output.
        outcome.setdefault("end", None)

    with local:
        reactor.callWhenRunning(start)
        reactor.addSystemEventTrigger("before", "shutdown", stopping)
        reactor.run()
    if "error" in outcome:
        return fail(f"cannot attach: {outcome['error']}")
    end = outcome.get("end")
    if end is None:
        # Leave the container running, as shimd run does when interrupted.
        # (_exitSignal: the signal that stopped the reactor; twistd reads it too.)
        signum = getattr(reactor, "_exitSignal", None) or signal.SIGINT
        sys.stderr.write(f"\nshimd: the container keeps running: shimd attach {workdir}\n")
        sys.stderr.flush()
        return 128 + signum
    if end == "detached":
        return 0
    if end != "ended":
        return fail(end)
    code = waitForExitCode(workdir)
    if code is None:
        return fail("the attach session ended but the container did not exit")
    return code
