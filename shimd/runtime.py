# -*- test-case-name: tests.test_runtime -*-
"""
The OCI runtime (runc), run through the reactor.

L{Runc} adds to the command lines of L{shimd.runtimecmd.RuntimeCommand}
(isulad-shim's, byte for byte): running a command through a
ProcessProtocol (C{start}, C{kill}, C{delete}), and waiting for one that
was started before the reactor (C{create}, C{exec}: L{shimd.launch}).
Every one returns a Deferred; a failing runc fails it with
L{RuntimeFailure} carrying runc's own error text (from its JSON log, else
its output).
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from typing import Mapping, Sequence, cast

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IReactorFDSet, IReactorProcess
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from shimd.fdio import ReadPipe
from shimd.reaper import ExitWatcher
from shimd.runtimecmd import RuntimeCommand, RuntimeFailure, RuntimeProcess, runtimeEnvironment
from shimd.shimlog import errorMessages

__all__ = ["Runc", "RuntimeFailure", "RuntimeProcess", "runtimeEnvironment"]

_OUTPUT_LIMIT = 64 * 1024


class _RuncProtocol(ProcessProtocol):
    def __init__(self) -> None:
        self.output = b""
        self.ended: Deferred[int | None] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.closeStdin()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if len(self.output) < _OUTPUT_LIMIT:
            self.output += data[: _OUTPUT_LIMIT - len(self.output)]

    def processEnded(self, reason: Failure) -> None:
        value = reason.value
        status: int | None
        if isinstance(value, ProcessDone):
            status = 0
        elif isinstance(value, ProcessTerminated):
            status = value.exitCode if value.exitCode is not None else 128 + (value.signal or 0)
        else:
            status = None
        self.ended.callback(status)


@dataclass
class Runc(RuntimeCommand):
    """One runtime, bound to one shim workdir, run through C{reactor}."""

    reactor: IReactorProcess = field(kw_only=True)

    _log = Logger()

    def run(self, argv: Sequence[str], childFDs: Mapping[int, int | str] | None = None) -> Deferred[None]:
        """
        Run one runtime command; fire when it has ended.

        @param childFDs: as for C{spawnProcess}; by default runc's stdout
            and stderr are collected for the error message.
        @raise RuntimeFailure: (in the Deferred) on a non-zero exit.
        """
        offset = self.logSize()
        proto = _RuncProtocol()
        fds = dict(childFDs) if childFDs is not None else {0: "w", 1: "r", 2: "r"}
        try:
            process = self.reactor.spawnProcess(
                proto, self.command, list(argv), env=self.env, path=self.workdir, childFDs=fds
            )
        except OSError as e:
            raise RuntimeFailure(argv, None, str(e))

        def cancel(d: Deferred[None]) -> None:
            try:
                process.signalProcess(signal.SIGKILL)
            except Exception:
                pass

        result: Deferred[None] = Deferred(cancel)
        proto.ended.addCallback(lambda status: self._ended(result, argv, offset, status, proto.output))
        return result

    def wait(self, process: RuntimeProcess) -> Deferred[None]:
        """
        Wait for a command started by L{spawn} (our child) and reap it;
        its message pipe, if any, is read meanwhile and closed.

        @raise RuntimeFailure: (in the Deferred) on a non-zero exit.
        """
        fdset = cast(IReactorFDSet, self.reactor)  # a whole reactor
        watcher = ExitWatcher(fdset, process.pid)
        output: list[bytes] = []
        kept = [0]

        def collect(data: bytes) -> None:
            if kept[0] < _OUTPUT_LIMIT:
                output.append(data[: _OUTPUT_LIMIT - kept[0]])
                kept[0] += len(output[-1])

        reader = None
        if process.output is not None:
            fd, process.output = process.output, None
            reader = ReadPipe(fdset, fd, collect)
            reader.startReading()

        def cancel(d: Deferred[None]) -> None:
            watcher.kill(signal.SIGKILL)

        result: Deferred[None] = Deferred(cancel)

        def exited(status: int | None) -> None:
            if reader is not None:
                if reader.fd >= 0:
                    reader.doRead()  # what it wrote last
                reader.close()
            watcher.close()
            self._ended(result, process.argv, process.logOffset, status, b"".join(output))

        watcher.exited.addCallback(exited)
        return result

    def _ended(self, result: Deferred[None], argv: Sequence[str], offset: int, status: int | None,
               output: bytes) -> None:
        if result.called:
            return
        if status == 0:
            result.callback(None)
            return
        message = self.errorText(offset) or output.decode("utf-8", "replace").strip()
        result.errback(RuntimeFailure(argv, status, message or f"exit status {status}"))

    def errorText(self, offset: int = 0) -> str:
        """The C{error}/C{fatal} messages runc logged after C{offset}."""
        return "; ".join(errorMessages(self.logPath, offset))

    def start(self, containerId: str) -> Deferred[None]:
        return self.run(self.baseArgs(withLog=False) + ["start", containerId])

    def kill(self, containerId: str, sig: str = "SIGKILL", all: bool = False) -> Deferred[None]:
        argv = self.baseArgs(withLog=False) + ["kill"]
        if all:
            argv.append("--all")
        return self.run(argv + [containerId, sig])

    def delete(self, containerId: str, force: bool = True) -> Deferred[None]:
        argv = self.baseArgs() + ["delete"]
        if force:
            argv.append("--force")
        return self.run(argv + [containerId])
