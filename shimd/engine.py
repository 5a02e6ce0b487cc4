# -*- test-case-name: tests.test_e2e_create -*-
"""
A small, synchronous container engine that drives the shim exactly as
iSulad does (spec sections 1.2, 2 and 4.5).

It is the engine half of C{shimd run}, of the end-to-end tests and of the
benchmarks: it makes the workdir, FIFOs and process.json, opens its ends of
the FIFOs first, spawns C{isulad-shim} with the workdir as its cwd, polls
C{./pid}, runs C{runc start}, and reads the status from C{exit_fifo}.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import select
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

DEFAULT_STATE_ROOT = "/run/shimd"

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class EngineError(Exception):
    """The engine could not do what was asked; C{str()} says why."""


def shimCommand() -> list[str]:
    """How to run C{isulad-shim}: beside our interpreter, else on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "isulad-shim")
    if os.access(beside, os.X_OK):
        return [beside]
    found = shutil.which("isulad-shim")
    if found:
        return [found]
    return [sys.executable, "-c", "from shimd.cli import isuladShimMain; isuladShimMain()"]


def _mkfifo(path: str) -> str:
    os.mkfifo(path, 0o600)
    os.chmod(path, 0o600)
    return path


@dataclass
class Container:
    """One container (or exec) as the engine sees it."""

    id: str
    workdir: str
    bundle: str
    runtime: str
    process: dict[str, Any]
    fds: dict[str, int] = field(default_factory=dict)
    shim: subprocess.Popen[bytes] | None = None
    shimStatus: bytes = b""
    shimStderr: bytes = b""
    root: str = ""

    def __post_init__(self) -> None:
        if not self.root:
            # runc's --root, as the shim derives it for a container.
            self.root = os.path.join(self.workdir, os.path.basename(self.runtime))

    def path(self, name: str) -> str:
        return os.path.join(self.workdir, name)

    def closeStdin(self) -> None:
        """Close the engine's end of the stdin FIFO: end of input."""
        fd = self.fds.pop("stdin", None)
        if fd is not None:
            os.close(fd)

    def feedStdin(self, data: bytes) -> None:
        """Write C{data} to the stdin FIFO, then close it (end of input)."""
        try:
            if data:
                self.writeStdin(data)
        finally:
            self.closeStdin()

    def resize(self, width: int, height: int) -> None:
        """Resize the terminal as iSulad does: one non-blocking write to the resize FIFO."""
        from shimd.localterm import writeResize

        if not writeResize(self.process["resizeFifo"], width, height):
            raise EngineError(f"cannot write to the resize FIFO of {self.id}")

    def writeStdin(self, data: bytes) -> None:
        fd = self.fds["stdin"]
        view = memoryview(data)
        while view:
            try:
                n = os.write(fd, view)
            except BlockingIOError:
                select.select([], [fd], [], 1.0)
                continue
            view = view[n:]


class Engine:
    """
    Creates, starts and watches containers through the shim.

    @param stateRoot: containers live in C{<stateRoot>/<runtime>/<id>}.
    """

    def __init__(
        self,
        stateRoot: str = DEFAULT_STATE_ROOT,
        runtime: str = "runc",
        shim: list[str] | None = None,
    ) -> None:
        self.stateRoot = stateRoot
        self.runtime = runtime
        self.shim = shim if shim is not None else shimCommand()

    def load(self, workdir: str) -> Container:
        """The container whose workdir is C{workdir} (C{<state root>/<runtime>/<id>})."""
        workdir = os.path.abspath(workdir)
        try:
            with open(os.path.join(workdir, "process.json")) as f:
                process = json.load(f)
        except (OSError, ValueError) as e:
            raise EngineError(f"{workdir} is not a container workdir: {e}") from e
        return Container(os.path.basename(workdir), workdir, workdir, self.runtime, process)

    def prepare(
        self,
        bundle: str,
        args: list[str] | None = None,
        containerId: str | None = None,
        stdin: bool = False,
        stdout: bool = True,
        stderr: bool = True,
        openStdin: bool | None = None,
        log: bool = True,
        logMaxsize: int = 0,
        logMaxfile: int = 0,
        attach: bool = True,
        extra: dict[str, Any] | None = None,
        terminal: bool | None = None,
        consoleSize: tuple[int, int] | None = None,
        resize: bool = False,
    ) -> Container:
        """
        Make the workdir, FIFOs and process.json, and open the engine's ends.

        @param args: replaces the bundle's process args (a private copy of the
            bundle's config.json is written in the workdir).
        @param terminal: replaces the bundle's C{process.terminal} (likewise).
        @param consoleSize: C{(height, width)}: replaces C{process.consoleSize}.
        @param resize: make C{resize_fifo} and name it in process.json
            (iSulad does so for an exec; the shim accepts it for create).
        """
        cid = containerId or "s" + secrets.token_hex(6)
        if not _ID.match(cid):
            raise EngineError(f"bad container id {cid!r}: use letters, digits, '_', '.', '-'")
        if shutil.which(self.runtime) is None:
            raise EngineError(f"runtime {self.runtime!r} not found")
        try:
            with open(os.path.join(bundle, "config.json")) as f:
                config = json.load(f)
            config["process"]["args"]
        except OSError as e:
            raise EngineError(f"{bundle} is not an OCI bundle: {e.strerror}: {e.filename}") from e
        except (ValueError, KeyError, TypeError) as e:
            raise EngineError(f"{bundle}/config.json is not a valid OCI config: {e}") from e
        workdir = os.path.join(self.stateRoot, os.path.basename(self.runtime), cid)
        try:
            os.makedirs(workdir, mode=0o700)
        except FileExistsError:
            raise EngineError(f"a container with id {cid!r} exists ({workdir})") from None
        if args is not None or terminal is not None or consoleSize is not None:
            if args is not None:
                config["process"]["args"] = list(args)
            if terminal is not None:
                config["process"]["terminal"] = terminal
            if consoleSize is not None:
                config["process"]["consoleSize"] = {"height": consoleSize[0], "width": consoleSize[1]}
            rootPath = config["root"]["path"]
            if not os.path.isabs(rootPath):
                config["root"]["path"] = os.path.join(os.path.abspath(bundle), rootPath)
            bundle = os.path.join(workdir, "bundle")
            os.mkdir(bundle)
            with open(os.path.join(bundle, "config.json"), "w") as f:
                json.dump(config, f)
        oci = config["process"]
        process: dict[str, Any] = {
            key: oci[key]
            for key in ("args", "cwd", "env", "terminal", "consoleSize", "user", "capabilities",
                        "apparmorProfile", "selinuxLabel", "oomScoreAdj", "noNewPrivileges", "rlimits")
            if key in oci
        }
        c = Container(cid, workdir, os.path.abspath(bundle), self.runtime, process)
        process["exit_fifo"] = _mkfifo(c.path("exit_fifo"))
        c.fds["exit"] = os.open(c.path("exit_fifo"), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        self._engineFifos(c, stdin, stdout, stderr)
        process["open_stdin"] = stdin if openStdin is None else openStdin
        if log:
            process["logPath"] = c.path("console.log")
            if logMaxsize:
                process["logMaxsize"] = logMaxsize
            if logMaxfile:
                process["logMaxfile"] = logMaxfile
        if attach:
            process["attach_socket"] = c.path("attach.sock")
        if resize:
            process["resizeFifo"] = _mkfifo(c.path("resize_fifo"))
        process.update(extra or {})
        self._writeProcess(c)
        return c

    def _engineFifos(self, c: Container, stdin: bool, stdout: bool, stderr: bool) -> None:
        """Make the engine's stdio FIFOs and open the engine's ends first, as iSulad does."""
        for name, wanted in (("stdin", stdin), ("stdout", stdout), ("stderr", stderr)):
            if not wanted:
                continue
            path = _mkfifo(c.path(f"engine-{name}"))
            key = {"stdin": "isuladStdin", "stdout": "isuladStdout", "stderr": "isuladStderr"}[name]
            c.process[key] = path
            flags = os.O_RDWR if name == "stdin" else os.O_RDONLY
            c.fds[name] = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC)

    def _writeProcess(self, c: Container) -> None:
        with open(c.path("process.json"), "w") as f:
            json.dump(c.process, f)
        os.chmod(c.path("process.json"), 0o640)

    def spawnShim(self, c: Container, execTimeout: int | None = None, detach: bool = False) -> None:
        """Run isulad-shim with the workdir as its cwd, in a session of its own."""
        argv = self.shim + [c.id, c.bundle, self.runtime, "info"]
        if execTimeout is not None:
            argv.append(str(execTimeout))
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)
        c.shim = subprocess.Popen(
            argv,
            cwd=c.workdir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL if detach else subprocess.PIPE,
            stderr=subprocess.DEVNULL if detach else subprocess.PIPE,
            start_new_session=True,
            env=env,
        )
        with open(c.path("shim-pid"), "w") as f:
            f.write(str(c.shim.pid))

    def waitPid(self, c: Container, timeout: float = 120.0) -> int:
        """Poll C{./pid} while the shim is alive, as iSulad does."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with open(c.path("pid")) as f:
                    text = f.read().strip()
                if text:
                    return int(text)
            except (OSError, ValueError):
                pass
            if c.shim is not None and c.shim.poll() is not None:
                self.reapShim(c)
                why = c.shimStderr.decode("utf-8", "replace").strip() or self.shimErrors(c)
                raise EngineError(
                    f"the shim exited with {c.shim.returncode} before the process started: {why}"
                )
            time.sleep(0.005)
        raise EngineError("timed out waiting for the container's pid")

    def shimErrors(self, c: Container) -> str:
        """The error lines of the shim log, as iSulad shows them on failure."""
        from shimd.shimlog import SHIM_LOG_NAME, errorMessages

        return "; ".join(errorMessages(c.path(SHIM_LOG_NAME)))

    def runtimeCall(self, c: Container, *args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [self.runtime, "--root", c.root, *args], capture_output=True, cwd=c.workdir
        )

    def start(self, c: Container) -> None:
        result = self.runtimeCall(c, "start", c.id)
        if result.returncode != 0:
            raise EngineError("runc start failed: " + result.stderr.decode("utf-8", "replace"))

    def create(self, c: Container, execTimeout: int | None = None, detach: bool = False) -> int:
        self.spawnShim(c, execTimeout, detach)
        return self.waitPid(c)

    def collect(
        self,
        c: Container,
        timeout: float = 120.0,
        onOutput: Callable[[str, bytes], object] | None = None,
        onStatus: Callable[[int, bytes, bytes], object] | None = None,
    ) -> tuple[bytes, bytes, int]:
        """
        Read the engine's stdout and stderr FIFOs until both end and the
        status arrives on the exit FIFO.

        @param onStatus: called as soon as the status arrives, after reading
            whatever the FIFOs hold at that moment, with (status, stdout so
            far, stderr so far): what had been delivered when the exit was
            reported.

        @return: (stdout bytes, stderr bytes, status); the status is 137 if
            the exit FIFO ended without one, as iSulad assumes.
        """
        buffers = {"stdout": bytearray(), "stderr": bytearray()}
        names = {c.fds[n]: n for n in ("stdout", "stderr", "exit") if n in c.fds}
        poller = select.poll()
        for fd in names:
            poller.register(fd, select.POLLIN)
        status: int | None = None
        statusBytes = b""
        deadline = time.monotonic() + timeout
        while names:
            left = deadline - time.monotonic()
            if left <= 0:
                raise EngineError("timed out waiting for the container to finish")
            for fd, _ in poller.poll(min(left, 1.0) * 1000):
                name = names.get(fd)
                if name is None:
                    continue
                try:
                    data = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                if name == "exit":
                    statusBytes += data
                    if len(statusBytes) >= 4 or not data:
                        status = struct.unpack("=i", statusBytes[:4])[0] if len(statusBytes) >= 4 else 137
                        poller.unregister(fd)
                        del names[fd]
                        if onStatus is not None:
                            for other, otherName in names.items():
                                while True:
                                    try:
                                        more = os.read(other, 65536)
                                    except BlockingIOError:
                                        break
                                    if not more:
                                        break
                                    buffers[otherName] += more
                                    if onOutput is not None:
                                        onOutput(otherName, more)
                            onStatus(status, bytes(buffers["stdout"]), bytes(buffers["stderr"]))
                    continue
                if not data:
                    poller.unregister(fd)
                    del names[fd]
                    continue
                buffers[name] += data
                if onOutput is not None:
                    onOutput(name, data)
        return bytes(buffers["stdout"]), bytes(buffers["stderr"]), -1 if status is None else status

    def reapShim(self, c: Container, timeout: float = 60.0) -> int:
        """Wait for the shim to exit; keep its stdout (the status) and stderr."""
        assert c.shim is not None
        try:
            out, err = c.shim.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            c.shim.kill()
            out, err = c.shim.communicate()
        c.shimStatus = out or b""
        c.shimStderr = err or b""
        return c.shim.returncode

    def close(self, c: Container, remove: bool = True) -> None:
        """Close the engine's FIFO ends and remove the workdir, as iSulad's cleanup does."""
        for fd in c.fds.values():
            try:
                os.close(fd)
            except OSError as e:
                if e.errno != errno.EBADF:
                    raise
        c.fds.clear()
        if c.shim is not None and c.shim.poll() is None:
            try:
                os.killpg(c.shim.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            c.shim.wait()
        if remove:
            if not c.process.get("exec"):
                self.runtimeCall(c, "delete", "--force", c.id)
            shutil.rmtree(c.workdir, ignore_errors=True)

    def run(
        self,
        bundle: str,
        args: list[str] | None = None,
        onOutput: Callable[[str, bytes], object] | None = None,
        **prepare: Any,
    ) -> tuple[bytes, bytes, int]:
        """Prepare, create, start, collect, close: one container from start to end."""
        c = self.prepare(bundle, args, **prepare)
        try:
            self.create(c)
            self.start(c)
            return self.collect(c, onOutput=onOutput)
        finally:
            if c.shim is not None and c.shim.poll() is None:
                self.reapShim(c)
            self.close(c)

    # -- exec ------------------------------------------------------------------

    def prepareExec(
        self,
        c: Container,
        args: list[str],
        execId: str | None = None,
        stdin: bool = False,
        stdout: bool = True,
        stderr: bool = True,
        terminal: bool = False,
        extra: dict[str, Any] | None = None,
    ) -> Container:
        """
        An exec in the running container C{c}, laid out as iSulad does: the
        workdir C{<container workdir>/exec/<exec id>} (mode 0750), a
        process.json with C{exec: true}, the FIFOs and C{resize_fifo}.
        """
        workdir = c.path(os.path.join("exec", execId or secrets.token_hex(8)))
        os.makedirs(workdir, mode=0o750)
        os.chmod(workdir, 0o750)
        process: dict[str, Any] = {
            "args": list(args),
            "cwd": "/",
            "env": c.process.get("env", ["PATH=/bin:/usr/bin:/sbin:/usr/sbin"]),
            "exec": True,
        }
        if terminal:
            process["terminal"] = True
        e = Container(c.id, workdir, c.workdir, self.runtime, process, root=c.root)
        process["resizeFifo"] = _mkfifo(e.path("resize_fifo"))
        self._engineFifos(e, stdin, stdout, stderr)
        process.update(extra or {})
        self._writeProcess(e)
        return e

    def runExec(
        self,
        e: Container,
        execTimeout: int | None = None,
        timeout: float = 120.0,
        onOutput: Callable[[str, bytes], object] | None = None,
        stdinData: bytes | None = None,
    ) -> tuple[bytes, bytes, int | None, int]:
        """
        Run a prepared foreground exec to its end.

        @return: (stdout, stderr, status, shim exit code); the status is
            L{None} when the shim wrote none (an error, or a timeout: code 2).
        """
        self.spawnShim(e, execTimeout)
        feeder = None
        if stdinData is not None:
            # Only once the shim has the FIFO open (it opens it before the
            # runtime runs): a FIFO written and closed before anyone reads
            # it loses its data and never signals end of file.
            self.waitPid(e, timeout)
            feeder = threading.Thread(target=e.feedStdin, args=(stdinData,), daemon=True)
            feeder.start()
        out, err, _ = self.collect(e, timeout=timeout, onOutput=onOutput)
        if feeder is not None:
            feeder.join(timeout)
        code = self.reapShim(e, timeout=timeout)
        status = struct.unpack("=i", e.shimStatus)[0] if len(e.shimStatus) == 4 else None
        return out, err, status, code
