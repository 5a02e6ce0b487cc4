# -*- test-case-name: tests.test_service -*-
"""
L{ShimService}: one container (or one exec) from start to exit report.

The lifecycle, in order::

    launch (L{shimd.launch}: process.json, the FIFOs, the sockets, the
    pipes, runc create or exec started) -> adopt every descriptor, open the
    log -> runc has exited -> read ./pid -> watch the pid (pidfd)
    -> [runc start] -> exit status -> drain output (bounded) -> flush log and
    FIFOs -> ./exit -> runc kill --all, delete --force (create only)
    -> report: exit FIFO, status fd -> done

(A container whose init was process 1 of its own pid namespace needs no
kill --all, and its delete begins at the exit status, while the output
drains.)

Each step that waits is a Deferred.  The service is embeddable: give it a
reactor and add it to any service parent; L{ShimService.done} fires with the
shim's exit code (0 ok, 1 error, 2 exec timeout).  C{isulad-shim} launches
before loading Twisted and hands the service its L{Launch}.
"""

from __future__ import annotations

import os
import signal
import struct
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.task import deferLater
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
from twisted.logger import Logger
from twisted.python.failure import Failure

from shimd.attach import AttachServer, startAttachServer
from shimd.config import ConfigError, ProcessState
from shimd.console import ConsoleError, Terminal
from shimd.earlycopy import EarlyCopy
from shimd.fdio import ReadPipe, WritePipe
from shimd.launch import Launch, ShimConfig, ShimError, describeFailure, launchShim, runtimeName, runtimeRoot
from shimd.logfile import JsonFileLog
from shimd.reaper import ExitWatcher, isNamespaceInit, reapStrays
from shimd.runtime import Runc, RuntimeFailure
from shimd.runtimecmd import RuntimeProcess
from shimd.streams import OutputStream, StdinPipe

__all__ = ["ShimService", "ShimConfig", "ShimError", "runtimeName", "runtimeRoot",
           "EXIT_OK", "EXIT_ERROR", "EXIT_TIMEOUT"]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_TIMEOUT = 2

CONTAINER_ACTIONS = {129: "reboot", 130: "shutdown"}
"""Statuses (SIGHUP, SIGINT) that isulad-shim passes on as C{CONTAINER_ACTION}."""


class ShimService(service.MultiService):
    """
    Runs one container or exec through the OCI runtime and owns its IO.

    @ivar done: fires with the shim's exit code once everything is reported.
    @ivar status: the process's status once known (exit code or 128+signal).
    """

    _log = Logger()

    def __init__(
        self, config: ShimConfig, reactor: Any, state: ProcessState | None = None, launch: Launch | None = None
    ) -> None:
        """
        @param launch: what L{launchShim} already opened and started; by
            default the service launches when it starts.
        """
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.state = launch.state if launch is not None else state
        self._launch = launch
        self.done: Deferred[int] = Deferred()
        self.status: int | None = None
        self.pid: int | None = None
        self.containerLog: JsonFileLog | None = None
        self.streams: list[OutputStream] = []
        self.stdin: StdinPipe | None = None
        self.runc: Runc | None = None
        self._engineStdin: ReadPipe | None = None
        self._exitFifo: int | None = None
        self._attach: AttachServer | None = None
        self._watcher: ExitWatcher | None = None
        self._timedOut = False
        self._ownPidNamespace = False
        self.terminal: Terminal | None = None

    def path(self, name: str) -> str:
        return os.path.join(self.config.workdir, name)

    # -- service -----------------------------------------------------------

    def startService(self) -> None:
        super().startService()
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
            if self._launch is None:
                # Here, not at construction: after twistd's daemonizing fork
                # (the subreaper is not inherited).
                self._launch = launchShim(self.config, self.state)
            launch = self._launch
            state = self.state = launch.state
            self._adopt(launch)
            self.runc = Runc(
                self.config.runtimeCommand,
                os.path.abspath(self.config.workdir),
                runtimeRoot(self.config, state),
                state.runtime_args,
                reactor=self.reactor,
            )
            assert launch.runtime is not None
            guard = ensureDeferred(self._createProcess(launch.runtime)).addTimeout(
                self.config.startTimeout, self.reactor
            )
            try:
                self.pid = await guard
            except defer.TimeoutError:
                waiting = " (no terminal on the console socket)" if self.terminal is not None else ""
                raise ShimError(f"runtime timeout: no process after {self.config.startTimeout:g}s{waiting}")
        except (ConfigError, ShimError, RuntimeFailure, OSError) as e:
            self._log.error("{msg}", msg=describeFailure(e))
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
        action = CONTAINER_ACTIONS.get(status)
        if action is not None:
            # As isulad-shim: runc kill/delete (and their hooks) see why it ended.
            self.runc.env["CONTAINER_ACTION"] = action
        cleanup = None
        if not state.exec and self._ownPidNamespace:
            # Nothing of the container is left (its init was process 1 of
            # its own pid namespace) and its output waits in our pipes:
            # delete it now, while the output is drained, not after.
            cleanup = ensureDeferred(self._cleanupContainer())
        self._log.info("process {pid} exited with status {status}", pid=self.pid, status=status)

        await self._drainOutput()
        self._stopAttach()
        # ./exit now, while runc delete runs: the report after it is then
        # only two pipe writes (the file costs 0.15 ms on ext4).
        self._writeExitFile(status)
        if not state.exec:
            await (cleanup if cleanup is not None else self._cleanupContainer())
        if not self._timedOut:
            self._report(status)
        # After the report, not before: nobody waits for strays' zombies.
        reapStrays(())
        return EXIT_TIMEOUT if self._timedOut else EXIT_OK

    def _execTimedOut(self) -> None:
        self._log.warn("exec timeout ({t}s): killing pid {pid}", t=self.config.execTimeout, pid=self.pid)
        self._timedOut = True
        if self._watcher is not None:
            self._watcher.kill(signal.SIGKILL)

    def _adopt(self, launch: Launch) -> None:
        """Wrap the launch's descriptors: the log, the FIFOs, the streams, the sockets."""
        state = launch.state
        clock = self.reactor
        early = launch.stopEarlyCopy()  # before anything of its descriptors is used
        if state.log_path:
            self.containerLog = JsonFileLog(
                state.log_path, maxSize=state.log_maxsize, maxFiles=state.log_maxfile, clock=clock,
                fd=launch.take("log"),
            )
        engineOut = self._engineWriter(launch.take("engineOut"))
        engineErr = self._engineWriter(launch.take("engineErr"))
        engineIn = launch.take("engineIn")
        self._exitFifo = launch.take("exitFifo")
        if state.terminal:
            self._openTerminal(state, launch, engineOut, engineErr, engineIn)
        else:
            for name in ("stdout", "stderr"):
                fd = launch.take(name)
                assert fd is not None
                stream = OutputStream(self.reactor, clock, name, fd, self.containerLog, self.config.stallTimeout)
                sink = engineOut if name == "stdout" else engineErr
                if sink is not None:
                    stream.addSink(sink, f"engine {name} FIFO")
                self.streams.append(stream)
            self.stdin = StdinPipe(self.reactor, clock, launch.take("stdin"))
            if engineIn is not None:
                self._engineStdin = ReadPipe(self.reactor, engineIn, self.stdin.write, self._engineStdinEnded)
                self.stdin.addSource(self._engineStdin)
        if early is not None:
            self._resumeEarlyCopy(early, {"stdout": engineOut, "stderr": engineErr})
        self._startAttach(launch)

    def _resumeEarlyCopy(self, early: EarlyCopy, sinks: dict[str, WritePipe | None]) -> None:
        """
        Go on from where L{shimd.earlycopy} stopped, before anything more is
        read: the lines it holds to the log, what the engine's FIFOs have not
        had to them.
        """
        self._log.info("copied {copied} bytes of output while loading; the copier stopped: {why}",
                       copied=early.copied, why=early.why)
        if early.error is not None and self.containerLog is not None:
            self.containerLog.writeFailed(OSError(*early.error))
        for name, left in early.leftovers.items():
            if left.unlogged and self.containerLog is not None:
                self.containerLog.write(name, left.unlogged, since=left.since)
            sink = sinks.get(name)
            if left.unsent and sink is not None:
                sink.write(left.unsent)

    def _engineWriter(self, fd: int | None) -> WritePipe | None:
        return None if fd is None else WritePipe(self.reactor, fd, self.reactor)

    def _openTerminal(
        self, state: ProcessState, launch: Launch,
        engineOut: WritePipe | None, engineErr: WritePipe | None, engineIn: int | None,
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
        console, launch.console = launch.console, None
        self.terminal = Terminal(
            self.reactor, self.reactor, stream, self.stdin, resizeFifo,
            console=console, resizeFd=launch.take("resize") if resizeFifo else None,
        )

    def _startAttach(self, launch: Launch) -> None:
        """Accept attach requests, if process.json names an attach socket (attach issue)."""
        if launch.state.attach_socket:
            listening, launch.attach = launch.attach, None
            self._attach = startAttachServer(
                self.reactor, self.config.workdir, listening, launch.attachError,
                {s.name: s for s in self.streams}, self.stdin,
                detachKeys=self.config.detachKeys, stallTimeout=self.config.stallTimeout,
            )

    def _stopAttach(self) -> None:
        """Stop listening and end every attach session (after the output is flushed)."""
        if self._attach is not None:
            self._attach.stop()

    def _engineStdinEnded(self, reason: object) -> None:
        # The engine closed its stdin FIFO: end of input for the container (C6).
        self._log.debug("engine stdin closed; closing the container's stdin")
        if self.stdin is not None:
            self.stdin.close()

    async def _createProcess(self, runtime: RuntimeProcess) -> int:
        """Wait for runc create/exec, then for the terminal; read the pid and watch it."""
        assert self.runc is not None and self.state is not None
        await self.runc.wait(runtime)
        if self.terminal is not None:
            try:
                await self.terminal.receive()
            except ConsoleError as e:
                raise ShimError(str(e)) from e
        pid = self._readPid(self.path("pid"))
        self._watcher = ExitWatcher(self.reactor, pid)
        self._ownPidNamespace = not self.state.exec and isNamespaceInit(pid)
        if not self.state.open_stdin and self._engineStdin is None and self.stdin is not None:
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
        steps = [lambda: self.runc.kill(cid, "SIGKILL", all=True), lambda: self.runc.delete(cid, force=True)]
        if self._ownPidNamespace:
            # Its init has exited: the kernel killed and reaped the rest of
            # its pid namespace already; kill --all would find nothing.
            del steps[0]
        # One after the other: building both Deferreds first ran them at once.
        for step in steps:
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
        """
        Write the status to the exit FIFO and the status fd (./exit holds
        it already); then give the CPU to whoever reads it.

        A write to a pipe wakes its reader as a "sync" wake-up: Linux
        queues the reader on the writer's CPU, expecting the writer to
        sleep.  The shim goes on instead (it tears down for 3-4 ms), and the
        engine's read of the status waited behind it with the other CPU
        idle (C{perf sched timehist}: 3.6 ms; in half of the bench's
        lifecycle runs).  C{sched_yield} lets the reader run first.
        """
        packed = struct.pack("=i", status)
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
        os.sched_yield()

    def _closeEverything(self) -> None:
        self._stopAttach()
        if self._launch is not None:
            self._launch.close()  # what was not adopted
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
