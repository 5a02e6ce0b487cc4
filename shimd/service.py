# -*- test-case-name: tests.test_service -*-
"""
L{ShimService}: one container (or one exec) from start to exit report.

The lifecycle, in order::

    load process.json -> open the log, the engine FIFOs and the exit FIFO
    -> runc create (or exec) -> read ./pid -> watch the pid (pidfd)
    -> [runc start] -> exit status -> drain output (bounded) -> flush log and
    FIFOs -> runc kill --all, delete --force (create only)
    -> report: exit FIFO, ./exit, status fd -> done

Each step that waits is a Deferred.  The service is embeddable: give it a
reactor and add it to any service parent; L{ShimService.done} fires with the
shim's exit code (0 ok, 1 error, 2 exec timeout).
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import struct
from dataclasses import dataclass
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.task import deferLater
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
from twisted.logger import Logger
from twisted.python.failure import Failure

from shimd.attach import AttachServer, startAttachServer
from shimd.config import ConfigError, ProcessState, loadProcessState
from shimd.console import ConsoleError, Terminal
from shimd.fdio import ReadPipe, WritePipe, openFifo
from shimd.logfile import JsonFileLog
from shimd.reaper import ExitWatcher, reapStrays, setChildSubreaper
from shimd.runtime import Runc, RuntimeFailure
from shimd.streams import OutputStream, StdinPipe

PIPE_SIZE = 1 << 20
"""Bytes the container's stdout and stderr pipes hold (F_SETPIPE_SZ)."""

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_TIMEOUT = 2

CONTAINER_ACTIONS = {129: "reboot", 130: "shutdown"}
"""Statuses (SIGHUP, SIGINT) that isulad-shim passes on as C{CONTAINER_ACTION}."""


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


class ShimService(service.MultiService):
    """
    Runs one container or exec through the OCI runtime and owns its IO.

    @ivar done: fires with the shim's exit code once everything is reported.
    @ivar status: the process's status once known (exit code or 128+signal).
    """

    _log = Logger()

    def __init__(self, config: ShimConfig, reactor: Any, state: ProcessState | None = None) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.state = state
        self.done: Deferred[int] = Deferred()
        self.status: int | None = None
        self.pid: int | None = None
        self.containerLog: JsonFileLog | None = None
        self.streams: list[OutputStream] = []
        self.stdin: StdinPipe | None = None
        self.runc: Runc | None = None
        self._engineStdin: ReadPipe | None = None
        self._exitFifo: int | None = None
        self._containerSide: list[int] = []
        self._attach: AttachServer | None = None
        self._watcher: ExitWatcher | None = None
        self._timedOut = False
        self.terminal: Terminal | None = None

    def path(self, name: str) -> str:
        return os.path.join(self.config.workdir, name)

    # -- service -----------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        # Not inherited across twistd's daemonizing fork: set it here.
        setChildSubreaper()
        ensureDeferred(self._run()).addBoth(self._finish)

    def _finish(self, result: int | Failure) -> None:
        if isinstance(result, int):
            code = result
        else:
            self._log.failure("shim failed", result)
            code = EXIT_ERROR
        self._closeEverything()
        if not self.done.called:
            self.done.callback(code)

    # -- lifecycle -----------------------------------------------------------

    async def _run(self) -> int:
        try:
            if self.state is None:
                self.state = loadProcessState(self.path("process.json"))
            state = self.state
            self._openIO(state)
            self._startAttach(state)
            self.runc = Runc(
                self.reactor,
                self.config.runtimeCommand,
                os.path.abspath(self.config.workdir),
                runtimeRoot(self.config, state),
                state.runtime_args,
            )
            guard = ensureDeferred(self._createProcess(state)).addTimeout(
                self.config.startTimeout, self.reactor
            )
            try:
                self.pid = await guard
            except defer.TimeoutError:
                waiting = " (no terminal on the console socket)" if self.terminal is not None else ""
                raise ShimError(f"runtime timeout: no process after {self.config.startTimeout:g}s{waiting}")
        except (ConfigError, ShimError, RuntimeFailure) as e:
            self._log.error("{msg}", msg=str(e))
            return EXIT_ERROR
        except OSError as e:
            self._log.error("{msg}", msg=f"{e.strerror}: {e.filename}" if e.filename else str(e))
            return EXIT_ERROR

        self._log.info("{what} {id} has pid {pid}", what="exec in" if state.exec else "container",
                       id=self.config.containerId, pid=self.pid)
        if self.config.start and not state.exec:
            try:
                await self.runc.start(self.config.containerId)
            except RuntimeFailure as e:
                self._log.error("{msg}", msg=str(e))
                assert self._watcher is not None
                self._watcher.kill(signal.SIGKILL)
        timeoutCall = None
        if self.config.execTimeout > 0:
            timeoutCall = self.reactor.callLater(self.config.execTimeout, self._execTimedOut)
        assert self._watcher is not None
        status = await self._watcher.exited
        if timeoutCall is not None and timeoutCall.active():
            timeoutCall.cancel()
        if status is None:
            self._log.warn("pid {pid} was not our child; its status is unknown", pid=self.pid)
            status = 137
        self.status = status
        self._log.info("process {pid} exited with status {status}", pid=self.pid, status=status)

        await self._drainOutput()
        self._stopAttach()
        action = CONTAINER_ACTIONS.get(status)
        if action is not None:
            # As isulad-shim: runc kill/delete (and their hooks) see why it ended.
            self.runc.env["CONTAINER_ACTION"] = action
        if not state.exec:
            await self._cleanupContainer()
        reapStrays(())
        if self._timedOut:
            self._writeExitFile(status)
            return EXIT_TIMEOUT
        self._report(status)
        return EXIT_OK

    def _execTimedOut(self) -> None:
        self._log.warn("exec timeout ({t}s): killing pid {pid}", t=self.config.execTimeout, pid=self.pid)
        self._timedOut = True
        if self._watcher is not None:
            self._watcher.kill(signal.SIGKILL)

    def _openIO(self, state: ProcessState) -> None:
        """Open the log, the engine's FIFOs, the exit FIFO and the stdio pipes."""
        clock = self.reactor
        if state.log_path:
            self.containerLog = JsonFileLog(
                state.log_path, maxSize=state.log_maxsize, maxFiles=state.log_maxfile, clock=clock
            )
        engineOut = self._openEngineWriter(state.isulad_stdout, "stdout")
        engineErr = self._openEngineWriter(state.isulad_stderr, "stderr")
        engineIn = None
        if state.isulad_stdin and os.path.exists(state.isulad_stdin):
            engineIn = openFifo(state.isulad_stdin, os.O_RDONLY)
        if state.exit_fifo and not state.exec:
            path = state.exit_fifo if os.path.isabs(state.exit_fifo) else self.path(state.exit_fifo)
            try:
                self._exitFifo = openFifo(path, os.O_WRONLY)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    raise ShimError(f"exit FIFO {path} has no reader") from e
                raise

        if state.terminal:
            self._openTerminal(state, engineOut, engineErr, engineIn)
            return
        inR, inW = os.pipe2(os.O_CLOEXEC)
        outR, outW = os.pipe2(os.O_CLOEXEC)
        errR, errW = os.pipe2(os.O_CLOEXEC)
        for fd in (outR, errR):
            # Room for bursts: the container blocks (and we wake) less often.
            try:
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
            except OSError:
                pass  # above /proc/sys/fs/pipe-max-size: keep the default
        for fd in (inR, inW, outR, outW, errR, errW):
            if state.root_uid or state.root_gid:
                os.fchown(fd, state.root_uid, state.root_gid)
        self._containerSide = [inR, outW, errW]
        for name, fd, sink in (("stdout", outR, engineOut), ("stderr", errR, engineErr)):
            stream = OutputStream(
                self.reactor, clock, name, fd, self.containerLog, self.config.stallTimeout
            )
            if sink is not None:
                stream.addSink(sink, f"engine {name} FIFO")
            self.streams.append(stream)
        self.stdin = StdinPipe(self.reactor, clock, inW)
        if engineIn is not None:
            self._engineStdin = ReadPipe(self.reactor, engineIn, self.stdin.write, self._engineStdinEnded)
            self.stdin.addSource(self._engineStdin)

    def _openTerminal(
        self, state: ProcessState, engineOut: WritePipe | None, engineErr: WritePipe | None, engineIn: int | None
    ) -> None:
        """
        tty mode: the pty master, once runc sends it over the console
        socket, is the only output stream (C{stdout}) and the stdin.
        """
        stream = OutputStream(
            self.reactor, self.reactor, "stdout", -1, self.containerLog, self.config.stallTimeout, eioIsEOF=True
        )
        if engineOut is not None:
            stream.addSink(engineOut, "engine stdout FIFO")
        if engineErr is not None:
            engineErr.loseConnection()  # no stderr stream in tty mode: end of file now
        self.streams.append(stream)
        self.stdin = StdinPipe(self.reactor, self.reactor, None, waitForTarget=True)
        if engineIn is not None:
            # A terminal has no end of file (^D is data): the engine closing
            # its FIFO (a detached client) leaves the input open for attach.
            stdin = self.stdin
            reader = ReadPipe(self.reactor, engineIn, stdin.write, lambda reason: stdin.removeSource(reader))
            self._engineStdin = reader
            stdin.addSource(reader)
        resizeFifo = state.resize_fifo
        if resizeFifo and not os.path.isabs(resizeFifo):
            resizeFifo = self.path(resizeFifo)
        try:
            self.terminal = Terminal(self.reactor, self.reactor, stream, self.stdin, resizeFifo)
        except ConsoleError as e:
            raise ShimError(str(e)) from e

    def _startAttach(self, state: ProcessState) -> None:
        """Listen on the attach socket, if process.json names one (attach issue)."""
        if state.attach_socket:
            self._attach = startAttachServer(
                self.reactor, self.config.workdir, state.attach_socket,
                {s.name: s for s in self.streams}, self.stdin,
                detachKeys=self.config.detachKeys, stallTimeout=self.config.stallTimeout,
            )

    def _stopAttach(self) -> None:
        """Stop listening and end every attach session (after the output is flushed)."""
        if self._attach is not None:
            self._attach.stop()

    def _openEngineWriter(self, path: str | None, name: str) -> WritePipe | None:
        if not path or not os.path.exists(path):
            return None
        try:
            fd = openFifo(path, os.O_WRONLY)
        except OSError as e:
            if e.errno == errno.ENXIO:
                raise ShimError(f"engine {name} FIFO {path} has no reader") from e
            raise
        return WritePipe(self.reactor, fd, self.reactor)

    def _engineStdinEnded(self, reason: object) -> None:
        # The engine closed its stdin FIFO: end of input for the container (C6).
        self._log.debug("engine stdin closed; closing the container's stdin")
        if self.stdin is not None:
            self.stdin.close()

    async def _createProcess(self, state: ProcessState) -> int:
        assert self.runc is not None
        pidFile = self.path("pid")
        console = None
        fds: dict[int, int | str]
        if self.terminal is not None:
            # B12: runc never gets the shim's stdio; its stderr is kept for
            # error messages (runc init does not inherit it in tty mode).
            console = self.terminal.socketPath
            devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            self._containerSide = [devnull]
            fds = {0: devnull, 1: devnull, 2: "r"}
        else:
            inR, outW, errW = self._containerSide
            fds = {0: inR, 1: outW, 2: errW}
        if state.exec:
            argv = self.runc.execArgs(
                self.config.containerId, self.path("process.json"), pidFile, cwd=state.cwd,
                consoleSocket=console,
            )
        else:
            argv = self.runc.createArgs(
                self.config.containerId,
                self.config.bundle,
                pidFile,
                consoleSocket=console,
                systemdCgroup=state.systemd_cgroup,
                noPivot=state.no_pivot_root,
            )
        try:
            await self.runc.run(argv, childFDs=fds)
        finally:
            for fd in self._containerSide:
                os.close(fd)
            self._containerSide = []
        if self.terminal is not None:
            try:
                await self.terminal.receive()
            except ConsoleError as e:
                raise ShimError(str(e)) from e
        pid = self._readPid(pidFile)
        self._watcher = ExitWatcher(self.reactor, pid)
        if not state.open_stdin and self._engineStdin is None and self.stdin is not None:
            # Nobody can ever write to it: the container sees end of file.
            self.stdin.close()
        return pid

    def _readPid(self, pidFile: str) -> int:
        try:
            with open(pidFile) as f:
                text = f.read().strip()
        except OSError as e:
            raise ShimError(f"cannot read the pid file {pidFile}: {e.strerror}") from e
        try:
            pid = int(text)
        except ValueError:
            pid = 0
        if pid <= 0:
            raise ShimError(f"bad pid in {pidFile}: {text!r}")
        return pid

    async def _drainOutput(self) -> None:
        """Drain (bounded), then flush the log and every FIFO."""
        await gatherResults([s.drain(self.config.drainTimeout) for s in self.streams])
        if self.containerLog is not None:
            self.containerLog.close()
        await gatherResults([s.finish() for s in self.streams])

    async def _waitForStartToFinish(self, bound: float = 1.0) -> None:
        """
        A process that exits at once can be reaped while the engine's
        C{runc start} is still finishing: it removes C{exec.fifo} from the
        state directory after the process began.  Deleting the container
        under it makes C{runc start} fail for a container that ran.  So wait
        (bounded: a container killed before it was ever started keeps its
        fifo) until the fifo is gone.
        """
        assert self.runc is not None
        if self.runc.root is None:
            return
        fifo = os.path.join(self.runc.root, self.config.containerId, "exec.fifo")
        deadline = self.reactor.seconds() + bound
        while os.path.exists(fifo) and self.reactor.seconds() < deadline:
            await deferLater(self.reactor, 0.005)

    async def _cleanupContainer(self) -> None:
        assert self.runc is not None
        cid = self.config.containerId
        await self._waitForStartToFinish()
        # One after the other: building both Deferreds first ran them at once.
        for step in (lambda: self.runc.kill(cid, "SIGKILL", all=True), lambda: self.runc.delete(cid, force=True)):
            try:
                await step()
            except RuntimeFailure as e:
                self._log.debug("{msg}", msg=str(e))

    def _writeExitFile(self, status: int) -> None:
        tmp = self.path(".exit.tmp")
        try:
            with open(tmp, "w") as f:
                f.write(str(status))
            os.rename(tmp, self.path("exit"))
        except OSError as e:
            self._log.warn("cannot write the exit file: {e}", e=e)

    def _report(self, status: int) -> None:
        """Write the status: exit FIFO, ./exit, and the status fd."""
        packed = struct.pack("=i", status)
        self._writeExitFile(status)
        if self._exitFifo is not None:
            try:
                os.write(self._exitFifo, packed)
            except BrokenPipeError:
                # The engine went away (e.g. a detached shimd run): the
                # status is still in ./exit.
                self._log.warn("nobody reads the exit FIFO any more; the status is in ./exit")
            except OSError as e:
                self._log.error("cannot write the exit FIFO: {e}", e=e)
        if self.config.statusFd is not None:
            try:
                os.write(self.config.statusFd, packed)
            except OSError as e:
                self._log.error("cannot write the status: {e}", e=e)

    def _closeEverything(self) -> None:
        self._stopAttach()
        for fd in self._containerSide:
            os.close(fd)
        self._containerSide = []
        for stream in self.streams:
            stream.reader.close()
        if self.terminal is not None:
            self.terminal.close()
        if self._engineStdin is not None:
            self._engineStdin.close()
        if self.containerLog is not None:
            self.containerLog.close()
        if self._watcher is not None:
            self._watcher.close()
        if self._exitFifo is not None:
            os.close(self._exitFifo)
            self._exitFifo = None
