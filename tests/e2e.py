"""
Helpers for end-to-end tests: real runc containers through the real shim,
with the test playing iSulad's part through L{shimd.engine.Engine}.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, TypeVar

from twisted.trial.unittest import SkipTest

from shimd.engine import Container, Engine

T = TypeVar("T")
BIN = os.path.dirname(sys.executable)


def requireRunc() -> str:
    """Skip unless we are root with runc and the demo bundle; return the bundle."""
    if os.geteuid() != 0:
        raise SkipTest("end-to-end tests need root")
    if not shutil.which("runc"):
        raise SkipTest("runc is not installed (make deps)")
    from shimd.bundle import ensureDemoBundle

    return ensureDemoBundle()


def ptyFds(pid: int) -> list[str]:
    """
    The pty masters and slaves among C{pid}'s open fds.  The process may be
    closing some meanwhile (a shim on its way out): one gone between the
    listing and its C{stat} is not held, and is left out.
    """
    found = []
    base = f"/proc/{pid}/fd"
    for name in os.listdir(base):
        try:
            st = os.stat(os.path.join(base, name))
            link = os.readlink(os.path.join(base, name))
        except OSError:
            continue
        if stat.S_ISCHR(st.st_mode) and (
            os.major(st.st_rdev) == 5 and os.minor(st.st_rdev) == 2 or 136 <= os.major(st.st_rdev) <= 143
        ):
            found.append(f"{name} -> {link}")
    return found


def isAlive(pid: int) -> bool:
    """Whether process C{pid} exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def repeat(default: int) -> int:
    """How many times a repeated field case runs (SHIMD_E2E_SCALE scales it)."""
    scale = float(os.environ.get("SHIMD_E2E_SCALE", "1"))
    return max(1, int(default * scale))


def parallel(fn: Callable[[int], T], count: int, workers: int = 4) -> list[T]:
    """Run C{fn(i)} for i in range(count), a few at a time; re-raise the first failure."""
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, range(count)))


def readRecords(paths: Iterable[str]) -> list[dict[str, Any]]:
    """Every json-file record of C{paths}, in order; every line must be JSON."""
    records = []
    for path in paths:
        with open(path, "rb") as f:
            for line in f.read().splitlines():
                records.append(json.loads(line))
    return records


def reassemble(records: list[dict[str, Any]], stream: str) -> str:
    return "".join(r["log"] for r in records if r["stream"] == stream)


@dataclass
class Result:
    stdout: bytes
    stderr: bytes
    status: int
    shimCode: int
    shimStdout: bytes
    shimStderr: bytes
    workdir: str
    records: list[dict[str, Any]] = field(default_factory=list)
    atStatus: tuple[bytes, bytes, str] | None = None
    exitFileAtStatus: str | None = None
    """What ./exit held when the status arrived on the exit FIFO."""
    inRuncAtStatus: bool | None = None
    """Whether runc still had the container when the status arrived."""


class EngineMixin:
    """For trial TestCases: an engine on a private state root."""

    def setUpEngine(self) -> None:
        self.bundle = requireRunc()
        self.stateRoot = tempfile.mkdtemp(prefix="shimd-e2e-", dir="/tmp")
        self.addCleanup(shutil.rmtree, self.stateRoot, True)  # type: ignore[attr-defined]
        self.engine = Engine(stateRoot=self.stateRoot)

    def runContainer(
        self,
        args: list[str],
        stdinData: bytes | None = None,
        closeStdinBeforeStart: bool = False,
        timeout: float = 60.0,
        between: Callable[[Container], object] | None = None,
        **prepare: Any,
    ) -> Result:
        """
        One container from prepare to the shim's exit, as iSulad would run it.

        @param stdinData: written to the stdin FIFO after start, then closed.
        @param between: called after start, before collecting.
        """
        stdin = stdinData is not None or closeStdinBeforeStart
        c = self.engine.prepare(self.bundle, args, stdin=stdin, **prepare)
        try:
            self.engine.create(c)
            if closeStdinBeforeStart:
                c.closeStdin()
            self.engine.start(c)
            feeder = None
            if stdinData is not None:
                # From a thread, as an engine would: the output must be read
                # while the input is written, or both ends block.
                feeder = threading.Thread(target=c.feedStdin, args=(stdinData,), daemon=True)
                feeder.start()
            if between is not None:
                between(c)
            seen: list[tuple[bytes, bytes, str]] = []
            atStatus: dict[str, Any] = {}

            def onStatus(status: int, out: bytes, err: bytes) -> None:
                log = c.path("console.log")
                text = open(log).read() if os.path.exists(log) else ""
                seen.append((out, err, text))
                atStatus["inRunc"] = os.path.exists(os.path.join(c.root, c.id))
                try:
                    with open(c.path("exit")) as f:
                        atStatus["exitFile"] = f.read()
                except FileNotFoundError:
                    atStatus["exitFile"] = None

            out, err, status = self.engine.collect(c, timeout=timeout, onStatus=onStatus)
            if feeder is not None:
                feeder.join(timeout)
            code = self.engine.reapShim(c)
            logs = [c.path("console.log")] if os.path.exists(c.path("console.log")) else []
            return Result(out, err, status, code, c.shimStatus, c.shimStderr, c.workdir,
                          readRecords(logs), seen[0] if seen else None,
                          atStatus.get("exitFile"), atStatus.get("inRunc"))
        finally:
            self.engine.close(c, remove=False)


class RunningContainerMixin(EngineMixin):
    """An engine and one running container (C{sleep 1000}) to exec in."""

    def setUpRunning(self) -> None:
        self.setUpEngine()
        self.c = self.engine.prepare(self.bundle, ["sleep", "1000"], stdout=False, stderr=False)
        self.engine.create(self.c, detach=True)
        self.engine.start(self.c)
        self.addCleanup(self.stopContainer)  # type: ignore[attr-defined]

    def stopContainer(self) -> None:
        self.engine.runtimeCall(self.c, "kill", self.c.id, "KILL")
        self.engine.collect(self.c, timeout=30)
        self.engine.close(self.c)


def runShimIn(workdir: str, argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    """Run isulad-shim by hand in C{workdir}."""
    return subprocess.run(
        [os.path.join(BIN, "isulad-shim"), *argv], cwd=workdir, capture_output=True, timeout=timeout
    )


def sendAttachRequest(
    socketPath: str, message: bytes, timeout: float = 10.0, halfClose: bool = False
) -> int:
    """
    Send one attach request as iSulad does (one write, no terminator) and
    read the shim's native-endian C{int} reply, synchronously.
    """
    import socket
    import struct

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(socketPath)
        s.sendall(message)
        if halfClose:
            s.shutdown(socket.SHUT_WR)
        reply = b""
        while len(reply) < 4:
            more = s.recv(4 - len(reply))
            if not more:
                raise EOFError(f"the shim closed the connection after {reply!r}")
            reply += more
    return struct.unpack("=i", reply)[0]


class AttachClient:
    """
    A synchronous attach client that makes its FIFOs as iSulad's daemon
    does: under C{<workdir>/attach/<random>/}, mode 0600, its own ends
    opened first (out and err read-only, in read-write, all non-blocking).
    """

    NAMES = {"stdin": "in-fifo", "stdout": "out-fifo", "stderr": "err-fifo"}

    def __init__(self, workdir: str, stdin: bool = True, stdout: bool = True, stderr: bool = True) -> None:
        base = os.path.join(workdir, "attach")
        os.makedirs(base, mode=0o700, exist_ok=True)
        self.workdir = workdir
        self.dir = tempfile.mkdtemp(dir=base)
        self.paths: dict[str, str] = {}
        self.fds: dict[str, int] = {}
        self.received = {"stdout": bytearray(), "stderr": bytearray()}
        self.ended: set[str] = set()
        for name, wanted in (("stdin", stdin), ("stdout", stdout), ("stderr", stderr)):
            if wanted:
                path = os.path.join(self.dir, self.NAMES[name])
                os.mkfifo(path, 0o600)
                os.chmod(path, 0o600)
                self.paths[name] = path
                flags = os.O_RDWR if name == "stdin" else os.O_RDONLY
                self.fds[name] = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC)

    @property
    def socketPath(self) -> str:
        return os.path.join(self.workdir, "attach.sock")

    def textMessage(self) -> bytes:
        return " ".join(self.paths.get(n, "(null)") for n in self.NAMES).encode()

    def jsonMessage(self, detachKeys: str | None = None) -> bytes:
        message: dict[str, Any] = {n: self.paths.get(n) for n in self.NAMES}
        if detachKeys is not None:
            message["detachKeys"] = detachKeys
        return json.dumps(message).encode()

    def attach(self, detachKeys: str | None = None, message: bytes | None = None, timeout: float = 10.0) -> int:
        """Request the session: the text form, or the JSON one with detach keys."""
        if message is None:
            message = self.textMessage() if detachKeys is None else self.jsonMessage(detachKeys)
        return sendAttachRequest(self.socketPath, message, timeout)

    def write(self, data: bytes) -> None:
        import select

        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.fds["stdin"], view):]
            except BlockingIOError:
                select.select([], [self.fds["stdin"]], [], 1.0)

    def pump(self, timeout: float) -> bool:
        """Read what is there (waiting up to C{timeout}); False once all output ended."""
        import select

        fds = {self.fds[n]: n for n in ("stdout", "stderr") if n in self.fds and n not in self.ended}
        if not fds:
            return False
        ready, _, _ = select.select(list(fds), [], [], timeout)
        for fd in ready:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                continue
            if data:
                self.received[fds[fd]] += data
            else:
                self.ended.add(fds[fd])
        return True

    def readUntil(self, expected: bytes, stream: str = "stdout", timeout: float = 10.0) -> bytes:
        """Read until C{expected} has arrived on C{stream}; return all of it."""
        import time

        deadline = time.monotonic() + timeout
        while expected not in self.received[stream]:
            left = deadline - time.monotonic()
            if left <= 0 or not self.pump(min(left, 0.5)) and expected not in self.received[stream]:
                raise AssertionError(f"{expected!r} not received on {stream}: {bytes(self.received[stream][-200:])!r}")
        return bytes(self.received[stream])

    def readToEnd(self, timeout: float = 30.0) -> tuple[bytes, bytes]:
        """Read until every output FIFO reaches end of file."""
        import time

        deadline = time.monotonic() + timeout
        while self.pump(0.5):
            if time.monotonic() > deadline:
                raise AssertionError(f"no end of file within {timeout}s")
        return bytes(self.received["stdout"]), bytes(self.received["stderr"])

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        shutil.rmtree(self.dir, ignore_errors=True)
