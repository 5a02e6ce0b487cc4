# -*- test-case-name: tests.test_launch -*-
"""
A shim's first steps, before Twisted is loaded.

What the engine waits for is the container's pid file, written by
C{runc create}.  Loading Twisted takes a Python shim about 150 ms, runc
about 30 ms to create a container; so L{launchShim} opens everything runc
needs with plain system calls and starts it at once, and Twisted loads
while runc works.  In isulad-shim's order (spec 4.1 and 9):

 1. C{process.json}; the child subreaper (orphans, the container's init
    among them, re-parent to the shim);
 2. the engine's FIFOs and the exit FIFO (a writer without a reader is an
    error: iSulad's C{ENXIO});
 3. the attach socket, listening (clients that come before the reactor
    runs wait in the backlog); failing, attach is off and the container
    runs on (B17);
 4. the console socket (tty) or the stdio pipes;
 5. C{runc create} (or C{exec}).

L{Launch} holds every descriptor until L{shimd.service.ShimService}
adopts it; on a failure everything is closed again and the error raised
(L{ShimError}, L{shimd.config.ConfigError}, L{RuntimeFailure},
C{OSError}).  C{isulad-shim} calls L{launchShim} before importing
Twisted, and then L{Launch.copyEarly}: the container's output is copied
while Twisted loads (L{shimd.earlycopy}), until the service adopts the
launch.  The service calls L{launchShim} itself when it is not given a
launch (C{twistd shimd}, an embedding daemon, the tests).

Nothing here imports Twisted.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
from dataclasses import dataclass

from shimd.config import ProcessState, loadProcessState
from shimd.runtimecmd import RuntimeCommand, RuntimeFailure, RuntimeProcess
from shimd.sockets import UnixSocket, listenPrivate, listenUnix, removeStaleSocket

TYPE_CHECKING = False  # not typing's: this runs before runc starts
if TYPE_CHECKING:
    from shimd.earlycopy import EarlyCopy

__all__ = ["ShimConfig", "ShimError", "Launch", "launchShim", "runtimeName", "runtimeRoot", "RuntimeFailure",
           "listenAttach", "openFifo", "setChildSubreaper",
           "describeFailure", "shimLogWritable", "SHIM_LOG_NAME"]

PIPE_SIZE = 1 << 20
"""Bytes the container's stdout and stderr pipes hold (F_SETPIPE_SZ)."""

READ_CHUNK = 64 * 1024
"""Bytes read from a pipe per C{read()} (the service's L{shimd.fdio.ReadPipe}
and L{shimd.earlycopy}): large chunks keep the per-byte cost low."""

ATTACH_BACKLOG = 16
"""Connections the attach socket queues (isulad-shim: 16)."""

PR_SET_CHILD_SUBREAPER = 36

LOG_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
LOG_MODE = 0o600
"""How the container's json-file log is opened (L{shimd.logfile.JsonFileLog})."""

SHIM_LOG_NAME = "shim-log.json"
"""File name of the shim log in the workdir."""


class ShimError(Exception):
    """A failure that ends the shim with exit code 1; C{str()} says why."""


@dataclass
class ShimConfig:
    """
    Everything one shim needs besides process.json.

    @ivar workdir: the shim's working directory (process.json, pid, log.json,
        exit_fifo, attach socket live here).
    @ivar runtimeCommand: argv[3] of isulad-shim: the runtime executable.
    @ivar execTimeout: seconds before an exec is SIGKILLed (0: none).
    @ivar start: run C{runc start} ourselves (iSulad's engine does it).
    @ivar drainTimeout: after the process exits, stop waiting for end of
        file on its output after this many idle seconds.
    @ivar stallTimeout: drop an output reader that made no progress for
        this many seconds with data queued for it.
    @ivar startTimeout: the start-up guard: runc create/exec must have
        produced a pid within this many seconds.
    @ivar statusFd: where to write the 4-byte status besides the exit FIFO
        (isulad-shim: 1, its stdout), or L{None}.
    @ivar detachKeys: attach sessions' default detach keys (Docker syntax;
        C{""} disables detaching).
    """

    workdir: str
    containerId: str
    bundle: str
    runtimeCommand: str = "runc"
    execTimeout: int = 0
    start: bool = False
    drainTimeout: float = 2.0
    stallTimeout: float = 10.0
    startTimeout: float = 120.0
    statusFd: int | None = None
    detachKeys: str = "ctrl-q"

    def path(self, name: str) -> str:
        """C{name} in the workdir (an absolute C{name} as it is)."""
        return os.path.join(self.workdir, name)


def describeFailure(error: BaseException) -> str | None:
    """
    The one-line message for a failure that ends the shim with exit code 1
    (a bad process.json, a FIFO without a reader, runc failing, a file
    that cannot be opened), or L{None} for anything else (a bug).
    """
    from shimd.config import ConfigError

    if isinstance(error, (ConfigError, ShimError, RuntimeFailure)):
        return str(error)
    if isinstance(error, OSError):
        return f"{error.strerror}: {error.filename}" if error.filename else str(error)
    return None


def shimLogWritable(workdir: str) -> bool:
    """Whether the shim log can be opened (iSulad starts nothing otherwise)."""
    try:
        fd = os.open(os.path.join(workdir, SHIM_LOG_NAME), os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    except OSError:
        return False
    os.close(fd)
    return True


def runtimeName(command: str, state: ProcessState) -> str:
    """The runtime *name*: process.json's C{runtime}, else the command's basename (B14)."""
    return state.runtime or os.path.basename(command)


def runtimeRoot(config: ShimConfig, state: ProcessState) -> str | None:
    """
    runc's C{--root}: C{<container workdir>/<runtime name>}; for an exec the
    container workdir is two levels above the exec workdir; none for kata.
    """
    name = runtimeName(config.runtimeCommand, state)
    if name.lower() == "kata-runtime":
        return None
    base = os.path.abspath(config.workdir)
    if state.exec:
        base = os.path.dirname(os.path.dirname(base))
    return os.path.join(base, name)


def runtimeCommand(config: ShimConfig, state: ProcessState) -> RuntimeCommand:
    """The runtime's command lines for this shim."""
    return RuntimeCommand(
        config.runtimeCommand, os.path.abspath(config.workdir), runtimeRoot(config, state), state.runtime_args
    )


def setChildSubreaper() -> None:
    """
    Make this process a child subreaper (C{prctl(PR_SET_CHILD_SUBREAPER)}).

    Not inherited across C{fork()}: call it in the process that waits.
    """
    # dlopen(NULL): the symbols already loaded, libc among them.
    # (ctypes.util.find_library forks "ldconfig -p" on every call.)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def openFifo(path: str, flags: int) -> int:
    """
    Open an existing FIFO without ever blocking.

    @param flags: C{os.O_RDONLY}, C{os.O_WRONLY} or C{os.O_RDWR}.
    @raise OSError: C{ENXIO} for a write-only open with no reader yet;
        C{EINVAL} if C{path} is not a FIFO.
    """
    import stat

    fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a FIFO", path)
    except BaseException:
        os.close(fd)
        raise
    return fd


@dataclass
class Launch:
    """
    What L{launchShim} opened and started; the service takes each
    descriptor (L{take}) and L{close} closes whatever is left.

    @ivar log: the container's log file (C{logPath}), open for appending.
    @ivar engineOut: the engine's stdout FIFO, open for writing (or L{None}).
    @ivar engineErr: its stderr FIFO.
    @ivar engineIn: its stdin FIFO, open for reading.
    @ivar exitFifo: the exit FIFO, open for writing.
    @ivar stdin: the write end of the container's stdin pipe (pipes mode).
    @ivar stdout: the read end of the container's stdout pipe.
    @ivar stderr: the read end of its stderr pipe.
    @ivar resize: the resize FIFO, open for reading and writing (tty
        mode): the engine can open it for writing from the start.
    @ivar console: runc's console socket, listening (tty mode).
    @ivar attach: the attach socket, listening.
    @ivar attachError: why there is no attach socket though process.json
        names one.
    @ivar runtime: the runtime process (create or exec), running.
    @ivar early: the copier of the container's output while Twisted loads
        (L{copyEarly}), running.
    """

    state: ProcessState
    log: int | None = None
    engineOut: int | None = None
    engineErr: int | None = None
    engineIn: int | None = None
    exitFifo: int | None = None
    stdin: int | None = None
    stdout: int | None = None
    stderr: int | None = None
    resize: int | None = None
    console: UnixSocket | None = None
    attach: UnixSocket | None = None
    attachError: str | None = None
    runtime: RuntimeProcess | None = None
    early: EarlyCopy | None = None

    _FDS = ("log", "engineOut", "engineErr", "engineIn", "exitFifo", "stdin", "stdout", "stderr", "resize")

    def take(self, name: str) -> int | None:
        """The descriptor C{name}, which the caller owns from now on."""
        assert name in self._FDS
        fd: int | None = getattr(self, name)
        setattr(self, name, None)
        return fd

    def copyEarly(self) -> None:
        """
        Copy the container's output to the log and the engine's FIFOs until
        the service adopts the launch (L{shimd.earlycopy}): for pipes (a
        terminal comes later, over the console socket), and only where the
        log, if process.json names one, is open.
        """
        state = self.state
        if state.terminal or self.stdout is None or (state.log_path and self.log is None):
            return
        if self.log is None and self.engineOut is None and self.engineErr is None:
            return
        from shimd.earlycopy import startEarlyCopy  # it imports this module's constants

        try:
            self.early = startEarlyCopy(
                self.stdout, self.stderr, self.engineOut, self.engineErr, self.log, state.log_maxsize,
                self.attach.socket.fileno() if self.attach is not None else None,
            )
        except OSError:
            pass  # no fork: the service copies it all, a little later

    def stopEarlyCopy(self) -> EarlyCopy | None:
        """Stop the copier, if it runs; its leftovers are then in C{early.leftovers}."""
        early, self.early = self.early, None
        if early is not None:
            early.stop()
        return early

    def close(self) -> None:
        """Close every descriptor and socket not taken."""
        self.stopEarlyCopy()
        for name in self._FDS:
            fd = self.take(name)
            if fd is not None:
                os.close(fd)
        for sock in (self.console, self.attach):
            if sock is not None:
                sock.close()
        self.console = self.attach = None
        if self.runtime is not None and self.runtime.output is not None:
            os.close(self.runtime.output)
            self.runtime.output = None


def launchShim(config: ShimConfig, state: ProcessState | None = None) -> Launch:
    """
    Open everything and start the runtime (see the module docstring).

    @raise ShimError: a FIFO without a reader, no console socket.
    @raise ConfigError: a bad process.json.
    @raise RuntimeFailure: the runtime could not be executed.
    @raise OSError: a file could not be opened.
    """
    if state is None:
        state = loadProcessState(config.path("process.json"))
    setChildSubreaper()
    launch = Launch(state)
    containerSide: list[int] = []
    try:
        if state.log_path:
            try:
                launch.log = os.open(state.log_path, LOG_OPEN_FLAGS, LOG_MODE)
            except OSError:
                pass  # the log says why, and tries again on each write
        _openEngineFifos(launch, config)
        if state.attach_socket:
            launch.attach, launch.attachError = listenAttach(config.workdir, state.attach_socket)
        if state.terminal:
            try:
                launch.console = listenPrivate(None, "pty.sock", backlog=2)
            except OSError as e:
                raise ShimError(f"cannot listen on a console socket: {e.strerror}: {e.filename}") from e
            if state.resize_fifo:
                try:
                    # Read and write: no hang-up when an engine's writer closes.
                    launch.resize = openFifo(config.path(state.resize_fifo), os.O_RDWR)
                except OSError:
                    pass  # the terminal tries again, and says why
            # B12: runc never gets the shim's stdio; its stderr is kept for
            # error messages (runc init does not inherit it in tty mode).
            devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            containerSide.append(devnull)
            messages, messagesW = os.pipe2(os.O_CLOEXEC)
            containerSide.append(messagesW)
            fds = {0: devnull, 1: devnull, 2: messagesW}
        else:
            messages = None
            fds = _makePipes(launch, state, containerSide)
        runtime = runtimeCommand(config, state)
        pidFile = config.path("pid")
        console = launch.console.path if launch.console is not None else None
        if state.exec:
            argv = runtime.execArgs(
                config.containerId, config.path("process.json"), pidFile, cwd=state.cwd, consoleSocket=console
            )
        else:
            argv = runtime.createArgs(
                config.containerId, config.bundle, pidFile, consoleSocket=console,
                systemdCgroup=state.systemd_cgroup, noPivot=state.no_pivot_root,
            )
        try:
            launch.runtime = runtime.spawn(argv, fds, output=messages)
        except BaseException:
            if messages is not None:
                os.close(messages)
            raise
    except BaseException:
        launch.close()
        raise
    finally:
        for fd in containerSide:
            os.close(fd)
    return launch


def _openEngineFifos(launch: Launch, config: ShimConfig) -> None:
    state = launch.state
    launch.engineOut = _openEngineWriter(state.isulad_stdout, "stdout")
    launch.engineErr = _openEngineWriter(state.isulad_stderr, "stderr")
    if state.isulad_stdin and os.path.exists(state.isulad_stdin):
        launch.engineIn = openFifo(state.isulad_stdin, os.O_RDONLY)
    if state.exit_fifo and not state.exec:
        path = config.path(state.exit_fifo)
        try:
            launch.exitFifo = openFifo(path, os.O_WRONLY)
        except OSError as e:
            if e.errno == errno.ENXIO:
                raise ShimError(f"exit FIFO {path} has no reader") from e
            raise


def _openEngineWriter(path: str | None, name: str) -> int | None:
    if not path or not os.path.exists(path):
        return None
    try:
        return openFifo(path, os.O_WRONLY)
    except OSError as e:
        if e.errno == errno.ENXIO:
            raise ShimError(f"engine {name} FIFO {path} has no reader") from e
        raise


def listenAttach(workdir: str, name: str) -> tuple[UnixSocket | None, str | None]:
    """
    Listen on the attach socket C{name} (relative to C{workdir}), mode
    0600, replacing a stale socket but not a live one.

    @return: the socket, or L{None} and why not (attach is then off, the
        container runs on: B17).
    """
    path = os.path.join(os.path.realpath(workdir), name)
    try:
        removeStaleSocket(path)
        return listenUnix(path, ATTACH_BACKLOG, 0o600), None
    except OSError as e:
        return None, f"cannot listen on the attach socket {path}: {e.strerror or e}"


def _makePipes(launch: Launch, state: ProcessState, containerSide: list[int]) -> dict[int, int]:
    """The container's stdio pipes; returns runc's descriptors."""
    inR, inW = os.pipe2(os.O_CLOEXEC)
    containerSide.append(inR)
    launch.stdin = inW
    outR, outW = os.pipe2(os.O_CLOEXEC)
    containerSide.append(outW)
    launch.stdout = outR
    errR, errW = os.pipe2(os.O_CLOEXEC)
    containerSide.append(errW)
    launch.stderr = errR
    for fd in (outR, errR):
        # Room for bursts: the container blocks (and we wake) less often.
        try:
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass  # above /proc/sys/fs/pipe-max-size: keep the default
    if state.root_uid or state.root_gid:
        for fd in (inR, inW, outR, outW, errR, errW):
            os.fchown(fd, state.root_uid, state.root_gid)
    return {0: inR, 1: outW, 2: errW}
