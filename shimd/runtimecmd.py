# -*- test-case-name: tests.test_runtime -*-
"""
The OCI runtime's command lines, and starting one without a reactor.

The command lines are exactly isulad-shim's (spec section 4.2)::

    <cmd> [runtimeArgs] --log <wd>/log.json --log-format json --root <root>
        create --bundle B --pid-file <wd>/pid [--console-socket S] <id>

with C{--root} left out for kata-runtime, and C{--log} left out for
C{kill}.  L{spawnRuntime} starts C{runc create} (or C{exec}) before Twisted
is loaded (L{shimd.launch}); L{shimd.runtime.Runc} runs the rest through
the reactor.

Nothing here imports Twisted.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
from dataclasses import dataclass, field

TYPE_CHECKING = False  # not typing's: this runs before runc starts (shimd.launch)
if TYPE_CHECKING:
    from typing import Mapping, Sequence

MAXFD = 1 << 20
"""Above any descriptor number: C{closerange} uses C{close_range(2)}."""

_SBIN = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class RuntimeFailure(Exception):
    """runc exited non-zero (or could not run); C{str()} is runc's message."""

    def __init__(self, argv: Sequence[str], status: int | None, message: str) -> None:
        self.argv = list(argv)
        self.status = status
        self.message = message
        super().__init__(message)

    def __str__(self) -> str:
        prefix = f"{os.path.basename(self.argv[0])} {self._verb()} failed"
        # runc's own message often starts with the same words already.
        return self.message if self.message.startswith(prefix) else f"{prefix}: {self.message}"

    def _verb(self) -> str:
        for word in ("create", "exec", "start", "kill", "delete", "state"):
            if word in self.argv:
                return word
        return "call"


def runtimeEnvironment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for runc: ours, without C{NOTIFY_SOCKET}, with sbin on PATH."""
    env = dict(os.environ if base is None else base)
    env.pop("NOTIFY_SOCKET", None)
    path = env.get("PATH", "")
    if "/usr/sbin" not in path.split(":"):
        env["PATH"] = f"{path}:{_SBIN}" if path else _SBIN
    return env


@dataclass
class RuntimeCommand:
    """
    One runtime, bound to one shim workdir: its command lines.

    @ivar command: the runtime command (argv[3] of isulad-shim).
    @ivar root: the C{--root} state directory, or L{None} to leave it out.
    """

    command: str
    workdir: str
    root: str | None
    runtimeArgs: Sequence[str] = ()
    env: dict[str, str] = field(default_factory=runtimeEnvironment)

    @property
    def logPath(self) -> str:
        return os.path.join(self.workdir, "log.json")

    def logSize(self) -> int:
        """The size of runc's log now: its messages of a later call follow."""
        try:
            return os.stat(self.logPath).st_size
        except OSError:
            return 0

    def baseArgs(self, withLog: bool = True) -> list[str]:
        argv = [self.command, *self.runtimeArgs]
        if withLog:
            argv += ["--log", self.logPath, "--log-format", "json"]
        if self.root is not None:
            argv += ["--root", self.root]
        return argv

    def createArgs(
        self,
        containerId: str,
        bundle: str,
        pidFile: str,
        consoleSocket: str | None = None,
        systemdCgroup: bool = False,
        noPivot: bool = False,
    ) -> list[str]:
        argv = self.baseArgs()
        if systemdCgroup:
            argv.append("--systemd-cgroup")
        argv += ["create", "--bundle", bundle]
        if noPivot:
            argv.append("--no-pivot")
        argv += ["--pid-file", pidFile]
        if consoleSocket is not None:
            argv += ["--console-socket", consoleSocket]
        return argv + [containerId]

    def execArgs(
        self,
        containerId: str,
        processFile: str,
        pidFile: str,
        cwd: str | None = None,
        consoleSocket: str | None = None,
    ) -> list[str]:
        argv = self.baseArgs() + ["exec", "-d", "--process", processFile]
        if cwd:
            argv += ["--cwd", cwd]
        argv += ["--pid-file", pidFile]
        if consoleSocket is not None:
            argv += ["--console-socket", consoleSocket]
        return argv + [containerId]

    def spawn(self, argv: Sequence[str], fds: Mapping[int, int], output: int | None = None) -> RuntimeProcess:
        """
        Start C{argv} now (fork and exec, cwd the workdir) with C{fds}
        (child fd -> our fd) as its only descriptors.

        @param output: the read end of a pipe the runtime writes its
            messages to (it is one of C{fds}), kept in the result.
        @raise RuntimeFailure: the command could not be executed.
        """
        offset = self.logSize()
        try:
            pid = forkExec(list(argv), self.env, self.workdir, fds)
        except OSError as e:
            raise RuntimeFailure(argv, None, f"fork/exec error: {e.strerror}: {argv[0]}") from e
        return RuntimeProcess(pid, list(argv), offset, output)


@dataclass
class RuntimeProcess:
    """
    A runtime command started by L{RuntimeCommand.spawn}; the caller reaps
    it (L{shimd.runtime.Runc.wait}).

    @ivar logOffset: the size of runc's log before it started.
    @ivar output: the read end of its message pipe, or L{None}.
    """

    pid: int
    argv: list[str]
    logOffset: int
    output: int | None = None


def forkExec(argv: list[str], env: Mapping[str, str], cwd: str, fds: Mapping[int, int]) -> int:
    """
    Start C{argv} (searched on C{env}'s C{PATH}) in C{cwd}, with C{fds}
    dup'ed to the child's descriptors; no other descriptor above them
    reaches it, and signals we ignore are back to their defaults.

    In our own directory (isulad-shim runs in the workdir) this is
    C{posix_spawn}: a vfork, ten to twenty times quicker than a Python
    C{fork} of the shim (0.15 ms against 3.4 ms measured beside Twisted,
    and Twisted's C{spawnProcess} takes 1.5 ms); elsewhere (C{posix_spawn}
    cannot change directory), a fork.

    @return: the child's pid, once it has executed the command.
    @raise OSError: the child could not change directory or execute.
    """
    try:
        here = os.path.samestat(os.stat(cwd), os.stat("."))
    except OSError:
        here = False
    if here:
        return _spawn(argv, env, fds)
    return _fork(argv, env, cwd, fds)


def _spawn(argv: list[str], env: Mapping[str, str], fds: Mapping[int, int]) -> int:
    executable = _which(argv[0], env.get("PATH", ""))
    top = max(fds, default=2) + 1
    actions: list[tuple[int, ...]] = []
    moved: list[int] = []
    try:
        # Each source goes through a duplicate above every target, so that
        # no dup2 overwrites a source still to be used, and a source that
        # already has its target's number still loses close-on-exec.
        for target, source in fds.items():
            moved.append(fcntl.fcntl(source, fcntl.F_DUPFD_CLOEXEC, top))
            actions.append((os.POSIX_SPAWN_DUP2, moved[-1], target))
        for fd in _inheritable(top):
            actions.append((os.POSIX_SPAWN_CLOSE, fd))
        try:
            return os.posix_spawn(executable, argv, dict(env), file_actions=actions, setsigdef=_ignoredSignals())
        except OSError as e:
            raise OSError(e.errno, os.strerror(e.errno or errno.EIO), argv[0]) from None
    finally:
        for fd in moved:
            os.close(fd)


def _ignoredSignals() -> list[int]:
    """The signals we ignore (SIGPIPE): a child gets them back at their defaults."""
    return [n for n in range(1, signal.NSIG) if signal.getsignal(n) == signal.SIG_IGN]


def _which(command: str, path: str) -> str:
    """C{command} as C{execvp} would find it on C{path}."""
    if "/" in command:
        return command
    for directory in path.split(":"):
        candidate = os.path.join(directory or ".", command)
        if os.access(candidate, os.X_OK) and not os.path.isdir(candidate):
            return candidate
    raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), command)


def _inheritable(lowest: int) -> list[int]:
    """Our descriptors from C{lowest} up that an exec would pass on."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd < lowest:
            continue
        try:
            if not fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC:
                found.append(fd)
        except OSError:  # listdir's own descriptor, closed by now
            continue
    return found


def _fork(argv: list[str], env: Mapping[str, str], cwd: str, fds: Mapping[int, int]) -> int:
    ignored = _ignoredSignals()
    report, reportW = os.pipe2(os.O_CLOEXEC)
    try:
        pid = os.fork()
    except BaseException:
        os.close(report)
        os.close(reportW)
        raise
    if pid == 0:  # pragma: no cover (the child)
        try:
            os.close(report)
            for n in ignored:
                signal.signal(n, signal.SIG_DFL)
            os.chdir(cwd)
            # Move every source that is also a target out of the way first,
            # so that no dup2 overwrites a source still to be used.
            moved = {target: os.dup(source) if source in fds else source for target, source in fds.items()}
            for target, source in moved.items():
                os.dup2(source, target, inheritable=True)
            # Nothing else reaches the runtime (as Twisted's spawnProcess).
            top = max(fds, default=2) + 1
            os.closerange(top, reportW)
            os.closerange(reportW + 1, MAXFD)
            os.execvpe(argv[0], argv, dict(env))
        except OSError as e:
            os.write(reportW, str(e.errno or errno.EIO).encode())
        finally:
            os._exit(127)
    os.close(reportW)
    try:
        chunks = []
        while True:
            try:
                chunk = os.read(report, 64)
            except InterruptedError:
                continue
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(report)
    if chunks:
        os.waitpid(pid, 0)
        code = int(b"".join(chunks) or b"0") or errno.EIO
        raise OSError(code, os.strerror(code), argv[0])
    return pid
