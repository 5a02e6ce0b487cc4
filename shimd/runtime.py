# -*- test-case-name: tests.test_runtime -*-
"""
The OCI runtime (runc), run through the reactor.

L{Runc} adds to the command lines of L{shimd.runtimecmd.RuntimeCommand}
(isulad-shim's, byte for byte): running a command (C{start}, C{kill},
C{delete}: started as the launch starts C{create}, by C{posix_spawn}) and
waiting for it through a pidfd on the reactor, as for one that was started
before the reactor (C{create}, C{exec}: L{shimd.launch}).
Every one returns a Deferred; a failing runc fails it with
L{RuntimeFailure} carrying runc's own error text (from its JSON log, else
its output).
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from typing import Sequence

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorFDSet
from twisted.logger import Logger

from shimd.fdio import ReadPipe
from shimd.reaper import ExitWatcher
from shimd.runtimecmd import RuntimeCommand, RuntimeFailure, RuntimeProcess, runtimeEnvironment
from shimd.shimlog import errorMessages

__all__ = ["Runc", "RuntimeFailure", "RuntimeProcess", "runtimeEnvironment"]

_OUTPUT_LIMIT = 64 * 1024


@dataclass
class Runc(RuntimeCommand):
    """One runtime, bound to one shim workdir, run through C{reactor}."""

    reactor: IReactorFDSet = field(kw_only=True)

    _log = Logger()

    def run(self, argv: Sequence[str]) -> Deferred[None]:
        """
        Run one runtime command, its stdin on /dev/null and its stdout and
        stderr on one pipe (for the error message); fire when it has ended.

        @raise RuntimeFailure: (in the Deferred) on a non-zero exit.
        """
        null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        messages, messagesW = os.pipe2(os.O_CLOEXEC)
        try:
            process = self.spawn(argv, {0: null, 1: messagesW, 2: messagesW}, output=messages)
        except RuntimeFailure as e:
            os.close(messages)
            return fail(e)
        finally:
            os.close(null)
            os.close(messagesW)
        return self.wait(process)

    def wait(self, process: RuntimeProcess) -> Deferred[None]:
        """
        Wait for a command started by L{spawn} (our child) and reap it;
        its message pipe, if any, is read meanwhile and closed.

        @raise RuntimeFailure: (in the Deferred) on a non-zero exit.
        """
        watcher = ExitWatcher(self.reactor, process.pid)
        output: list[bytes] = []
        kept = [0]

        def collect(data: bytes) -> None:
            if kept[0] < _OUTPUT_LIMIT:
                output.append(data[: _OUTPUT_LIMIT - kept[0]])
                kept[0] += len(output[-1])

        reader = None
        if process.output is not None:
            fd, process.output = process.output, None
            reader = ReadPipe(self.reactor, fd, collect)
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
