"""
The two shims under test, behind one small interface, and the measuring
tools the workloads share (waiting without polling, /proc readers).

Both shims run the same container: a private copy of the demo busybox
bundle's config.json with new process args and the demo rootfs (read-only)
as its root, on the same filesystem, with runc as the runtime.

 - L{ShimdRunner}: shimd's C{isulad-shim}, driven as iSulad drives it
   (L{shimd.engine.Engine}: workdir, process.json, exit_fifo), without the
   engine's stdout/stderr FIFOs, so that the shim's only output is its
   json-file log, as conmon's is its k8s-file log.
 - L{ConmonRunner}: Debian's C{conmon} with C{--sync} (it stays our child),
   a sync pipe, C{--exit-dir} and a k8s-file log; C{--no-sync-log}, because
   shimd does not fsync its log either (with the default, conmon would fsync
   a 300 MB file before writing the exit file and look slower than it is).
"""

from __future__ import annotations

import calendar
import ctypes
import errno
import os
import select
import shutil
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from shimd.bundle import writeBundleConfig  # noqa: E402
from shimd.engine import Container, Engine  # noqa: E402

RUNC = shutil.which("runc") or "/usr/sbin/runc"
_NULL_STDIO = [(os.POSIX_SPAWN_OPEN, fd, os.devnull, os.O_RDWR, 0) for fd in (0, 1, 2)]
CONMON = shutil.which("conmon") or "/usr/bin/conmon"
now = time.perf_counter


class BenchError(Exception):
    """A run went wrong; the message says how."""


# -- inotify, so that waiting for a file costs no CPU ----------------------

_libc = ctypes.CDLL(None, use_errno=True)
IN_CLOSE_WRITE = 0x08
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC


class DirWatch:
    """An inotify descriptor watching one directory for new files."""

    def __init__(self, path: str, mask: int = IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE) -> None:
        self.fd = _libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if self.fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        if _libc.inotify_add_watch(self.fd, os.fsencode(path), mask) < 0:
            e = ctypes.get_errno()
            os.close(self.fd)
            raise OSError(e, os.strerror(e), path)

    def drain(self) -> None:
        while True:
            try:
                if not os.read(self.fd, 65536):
                    return
            except BlockingIOError:
                return

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def waitUntil(
    check: Callable[[], Any],
    handlers: dict[int, Callable[[int], object]],
    timeout: float,
    tick: Callable[[], object] | None = None,
    tickEvery: float = 0.1,
    what: str = "something",
) -> tuple[Any, float]:
    """
    Sleep in poll() until C{check()} returns something other than L{None}.

    @param handlers: descriptor -> callback on readiness (drain it there).
    @param tick: called every C{tickEvery} seconds while waiting.
    @return: (what C{check} returned, the perf_counter time it did).
    """
    poller = select.poll()
    for fd in handlers:
        poller.register(fd, select.POLLIN)
    deadline = now() + timeout
    nextTick = now() + tickEvery
    while True:
        result = check()
        if result is not None:
            return result, now()
        t = now()
        if t > deadline:
            raise BenchError(f"timed out after {timeout:g}s waiting for {what}")
        wait = min(deadline, nextTick if tick else deadline) - t
        for fd, ev in poller.poll(max(wait, 0) * 1000):
            if ev & (select.POLLHUP | select.POLLERR | select.POLLNVAL) and not ev & select.POLLIN:
                handler = handlers.get(fd)
                if handler is not None:
                    handler(fd)
                poller.unregister(fd)
                continue
            handler = handlers.get(fd)
            if handler is not None:
                handler(fd)
        if tick and now() >= nextTick:
            tick()
            nextTick = now() + tickEvery


def rfc3339Ns(text: bytes) -> int:
    """C{2026-12-04T11:32:00.123456789Z} (or C{+HH:MM}) as ns since the epoch."""
    stamp = text.decode("ascii")
    offset = 0
    if stamp.endswith("Z"):
        stamp = stamp[:-1]
    else:
        sign = 1 if stamp[-6] == "+" else -1
        offset = sign * (int(stamp[-5:-3]) * 3600 + int(stamp[-2:]) * 60)
        stamp = stamp[:-6]
    whole, _, frac = stamp.partition(".")
    seconds = calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) - offset
    return seconds * 1_000_000_000 + int(frac.ljust(9, "0")[:9] or 0)


# -- /proc ---------------------------------------------------------------

_TICKS = os.sysconf("SC_CLK_TCK")


def cpuTimes(pid: int) -> tuple[float, float] | None:
    """utime and stime of C{pid} (not its children), in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[11]) / _TICKS, int(fields[12]) / _TICKS


def cpuSeconds(pid: int) -> float | None:
    """utime + stime of C{pid} (not its children)."""
    times = cpuTimes(pid)
    return None if times is None else sum(times)


def statusKB(pid: int, key: str) -> int | None:
    """A C{kB} field of /proc/<pid>/status (VmRSS, VmHWM...)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rollupKB(pid: int) -> dict[str, int]:
    """Rss and Pss (kB) from /proc/<pid>/smaps_rollup."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("Rss", "Pss"):
                    out[key] = int(rest.split()[0])
    except OSError:
        pass
    return out


# -- the runs --------------------------------------------------------------


@dataclass
class Run:
    """One container under one shim."""

    shim: str
    id: str
    dir: str
    pidFile: str
    logPath: str
    runcRoot: str
    proc: subprocess.Popen[bytes] | None = None
    watch: DirWatch | None = None
    status: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def shimPid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def runc(self, *args: str, wait: bool = True) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(
            [RUNC, "--root", self.runcRoot, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        if wait:
            _, err = p.communicate()
            if p.returncode != 0 and args[0] not in ("delete", "kill"):
                raise BenchError(f"runc {' '.join(args)} failed: {err.decode(errors='replace').strip()}")
        return p


def spawnRunc(*args: str) -> tuple[float, int]:
    """
    Run runc as the shims run it (posix_spawn, stdio on /dev/null) and wait.

    @return: the seconds from the spawn to the reap, and the wait status.
    """
    t = now()
    pid = os.posix_spawn(RUNC, [RUNC, *args], dict(os.environ), file_actions=_NULL_STDIO)
    _, status = os.waitpid(pid, 0)
    return now() - t, status


class Runner:
    """What a workload needs of a shim."""

    name = "?"

    def prepare(self, args: list[str], tag: str) -> Run:
        raise NotImplementedError

    def launch(self, run: Run) -> None:
        raise NotImplementedError

    def exitHandlers(self, run: Run) -> dict[int, Callable[[int], object]]:
        raise NotImplementedError

    def exitStatus(self, run: Run) -> int | None:
        raise NotImplementedError

    def countLines(self, run: Run) -> tuple[int, int]:
        """(records in the log, complete stdout lines the log holds)."""
        raise NotImplementedError

    def recordTime(self, record: bytes) -> int:
        """The time stamp of one log record, in ns since the epoch."""
        raise NotImplementedError

    def logSpan(self, run: Run) -> tuple[int, int] | None:
        """
        The time stamps of the log's first and last records (both shims
        stamp a record when they read it), or L{None} for an empty log.
        """
        with open(run.logPath, "rb") as f:
            first = f.readline()
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - 65536))
            tail = f.read().rstrip(b"\n")
        if not first.endswith(b"\n"):
            return None
        return self.recordTime(first), self.recordTime(tail[tail.rfind(b"\n") + 1 :])

    def finish(self, run: Run) -> None:
        raise NotImplementedError

    def deleteAfterExit(self, run: Run) -> float:
        """
        After the exit report: what the engine still has to do before the
        container is gone from runc, in seconds.  Here (conmon): the
        engine's own C{runc delete --force}, spawned as a shim spawns it.
        """
        seconds, status = spawnRunc("--root", run.runcRoot, "delete", "--force", run.id)
        if status != 0:
            raise BenchError(f"{self.name}: runc delete after the exit report failed ({status:#x})")
        return seconds

    # -- shared steps --------------------------------------------------------

    def stopIfRunning(self, run: Run) -> None:
        """Kill a container that is still running and wait (bounded) for its exit."""
        if run.proc is not None and run.proc.poll() is None and run.status is None:
            run.runc("kill", run.id, "KILL")
            try:
                self.waitExit(run, timeout=30)
            except BenchError:
                pass

    def waitPid(self, run: Run, timeout: float = 60.0) -> float:
        """Wait for the pid file; return the time it was seen."""
        assert run.watch is not None

        def check() -> int | None:
            try:
                with open(run.pidFile) as f:
                    text = f.read().strip()
                if text:
                    return int(text)
            except (OSError, ValueError):
                pass
            if run.proc is not None and run.proc.poll() is not None:
                raise BenchError(f"{self.name} exited with {run.proc.returncode} before the pid file")
            return None

        pid, t = waitUntil(check, {run.watch.fd: lambda fd: run.watch.drain()}, timeout,
                           tick=lambda: None, what=f"{self.name} pid file")
        run.extra["containerPid"] = pid
        return t

    def start(self, run: Run) -> None:
        run.runc("start", run.id)

    def waitExit(
        self,
        run: Run,
        timeout: float = 300.0,
        more: dict[int, Callable[[int], object]] | None = None,
        tick: Callable[[], object] | None = None,
        tickEvery: float = 0.1,
    ) -> float:
        """Wait for the exit report; return the time it was readable."""
        handlers = self.exitHandlers(run)
        if more:
            handlers.update(more)
        status, t = waitUntil(lambda: self.exitStatus(run), handlers, timeout, tick=tick,
                              tickEvery=tickEvery, what=f"{self.name} exit report")
        run.status = status
        return t

    def reap(self, run: Run, timeout: float = 30.0) -> int | None:
        if run.proc is None:
            return None
        try:
            return run.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            run.proc.kill()
            return run.proc.wait()


class ShimdRunner(Runner):
    name = "shimd"

    def __init__(self, root: str, bundle: str, shimArgv: list[str] | None = None) -> None:
        self.root = os.path.join(root, "shimd")
        os.makedirs(self.root, exist_ok=True)
        self.bundle = bundle
        self.engine = Engine(stateRoot=self.root, runtime="runc", shim=shimArgv)

    def prepare(self, args: list[str], tag: str = "") -> Run:
        c = self.engine.prepare(self.bundle, args, stdout=False, stderr=False, attach=True)
        run = Run(self.name, c.id, c.workdir, c.path("pid"), c.path("console.log"), c.root)
        run.extra["container"] = c
        run.extra["statusBytes"] = b""
        run.watch = DirWatch(c.workdir)
        return run

    def launch(self, run: Run) -> None:
        c: Container = run.extra["container"]
        self.engine.spawnShim(c, detach=True)
        run.proc = c.shim

    def attachSocket(self, run: Run) -> str:
        return os.path.join(run.dir, "attach.sock")

    def _exitFd(self, run: Run) -> int:
        return run.extra["container"].fds["exit"]

    def exitHandlers(self, run: Run) -> dict[int, Callable[[int], object]]:
        def readable(fd: int) -> None:
            try:
                data = os.read(fd, 4)
            except BlockingIOError:
                return
            if not data:
                run.extra["exitEOF"] = True
            run.extra["statusBytes"] += data

        return {self._exitFd(run): readable}

    def exitStatus(self, run: Run) -> int | None:
        got = run.extra["statusBytes"]
        if len(got) >= 4:
            return struct.unpack("=i", got[:4])[0]
        if run.extra.get("exitEOF"):
            return 137
        return None

    def countLines(self, run: Run) -> tuple[int, int]:
        with open(run.logPath, "rb") as f:
            data = f.read()
        return data.count(b"\n"), data.count(b'\\n","stream":"stdout"')

    def recordTime(self, record: bytes) -> int:
        # {"log":"...","stream":"stdout","time":"2026-12-04T11:32:00.123456789Z"}
        start = record.rindex(b'"time":"') + 8
        return rfc3339Ns(record[start : record.index(b'"', start)])

    def deleteAfterExit(self, run: Run) -> float:
        """Nothing: shimd deleted the container before it reported (checked here)."""
        if os.path.exists(os.path.join(run.runcRoot, run.id)):
            raise BenchError("shimd: the container is still in runc's state after the exit report")
        return 0.0

    def finish(self, run: Run) -> None:
        c: Container = run.extra["container"]
        self.stopIfRunning(run)
        self.reap(run)
        if run.watch is not None:
            run.watch.close()
        self.engine.close(c, remove=True)


class ConmonRunner(Runner):
    name = "conmon"

    def __init__(self, root: str, bundle: str) -> None:
        self.root = os.path.join(root, "conmon")
        os.makedirs(self.root, exist_ok=True)
        self.bundle = bundle
        self.count = 0

    def prepare(self, args: list[str], tag: str = "") -> Run:
        self.count += 1
        cid = "c%d%s" % (os.getpid(), os.urandom(4).hex())
        d = os.path.join(self.root, cid)
        os.makedirs(d, mode=0o700)
        for sub in ("exit", "sock", "runc"):
            os.mkdir(os.path.join(d, sub))
        bundle = writeBundleConfig(os.path.join(d, "bundle"), args, demoBundle=self.bundle)
        run = Run(self.name, cid, d, os.path.join(d, "pid"), os.path.join(d, "ctr.log"),
                  os.path.join(d, "runc"))
        run.extra["bundle"] = bundle
        run.extra["exitFile"] = os.path.join(d, "exit", cid)
        run.watch = DirWatch(d)
        run.extra["exitWatch"] = DirWatch(os.path.join(d, "exit"))
        return run

    def launch(self, run: Run) -> None:
        r, w = os.pipe2(os.O_CLOEXEC)
        argv = [
            CONMON, "--api-version", "1", "-c", run.id, "-u", run.id, "-n", run.id,
            "-r", RUNC, "-b", run.extra["bundle"], "-p", run.pidFile,
            "-l", "k8s-file:" + run.logPath,
            "--exit-dir", os.path.join(run.dir, "exit"),
            "--socket-dir-path", os.path.join(run.dir, "sock"),
            "--runtime-arg", "--root=" + run.runcRoot,
            "--sync", "--no-sync-log", "--log-level", "error",
        ]
        env = dict(os.environ, _OCI_SYNCPIPE=str(w))
        run.proc = subprocess.Popen(argv, pass_fds=(w,), env=env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    cwd=run.dir)
        os.close(w)
        # Keep the read end open for the whole run: conmon writes to it.
        run.extra["syncPipe"] = r

    def exitHandlers(self, run: Run) -> dict[int, Callable[[int], object]]:
        watch: DirWatch = run.extra["exitWatch"]
        return {watch.fd: lambda fd: watch.drain()}

    def exitStatus(self, run: Run) -> int | None:
        try:
            with open(run.extra["exitFile"]) as f:
                text = f.read().strip()
        except FileNotFoundError:
            if run.proc is not None and run.proc.poll() is not None:
                raise BenchError(f"conmon exited with {run.proc.returncode} and no exit file")
            return None
        return int(text) if text else None

    def countLines(self, run: Run) -> tuple[int, int]:
        with open(run.logPath, "rb") as f:
            data = f.read()
        return data.count(b"\n"), data.count(b" stdout F ")

    def recordTime(self, record: bytes) -> int:
        # 2026-12-04T11:32:00.123456789+00:00 stdout F ...
        return rfc3339Ns(record.split(b" ", 1)[0])

    def finish(self, run: Run) -> None:
        self.stopIfRunning(run)
        if run.proc is not None and run.proc.poll() is None:
            try:
                run.proc.wait(10)
            except subprocess.TimeoutExpired:
                run.proc.kill()
        self.reap(run)
        run.runc("delete", "--force", run.id)
        for key in ("syncPipe",):
            fd = run.extra.pop(key, None)
            if fd is not None:
                os.close(fd)
        for w in (run.watch, run.extra.get("exitWatch")):
            if w is not None:
                w.close()
        shutil.rmtree(run.dir, ignore_errors=True)


def killStrays(root: str) -> None:
    """After an interrupted bench: delete containers left under C{root}."""
    for dirpath, dirnames, _ in os.walk(root):
        for d in dirnames:
            state = os.path.join(dirpath, d)
            if os.path.basename(state) == "runc" or d == "runc":
                try:
                    names = os.listdir(state)
                except OSError:
                    continue
                for cid in names:
                    subprocess.run([RUNC, "--root", state, "delete", "--force", cid],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
