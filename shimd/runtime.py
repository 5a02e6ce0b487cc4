# -*- test-case-name: tests.test_runtime -*-
"""
The OCI runtime (runc) command lines, run through a ProcessProtocol.

The command lines are exactly isulad-shim's (spec section 4.2)::

    <cmd> [runtimeArgs] --log <wd>/log.json --log-format json --root <root>
        create --bundle B --pid-file <wd>/pid [--console-socket S] <id>

with C{--root} left out for kata-runtime, and C{--log} left out for
C{kill}.  Every invocation returns a Deferred; a failing runc fails it with
L{RuntimeFailure} carrying runc's own error text (from its JSON log, else
its output).
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IReactorProcess
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from shimd.shimlog import errorMessages

_OUTPUT_LIMIT = 64 * 1024
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


def runtimeEnvironment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for runc: ours, without C{NOTIFY_SOCKET}, with sbin on PATH."""
    env = dict(os.environ if base is None else base)
    env.pop("NOTIFY_SOCKET", None)
    path = env.get("PATH", "")
    if "/usr/sbin" not in path.split(":"):
        env["PATH"] = f"{path}:{_SBIN}" if path else _SBIN
    return env


@dataclass
class Runc:
    """
    One runtime, bound to one shim workdir.

    @ivar command: the runtime command (argv[3] of isulad-shim).
    @ivar root: the C{--root} state directory, or L{None} to leave it out.
    """

    reactor: IReactorProcess
    command: str
    workdir: str
    root: str | None
    runtimeArgs: Sequence[str] = ()
    env: dict[str, str] = field(default_factory=runtimeEnvironment)

    _log = Logger()

    @property
    def logPath(self) -> str:
        return os.path.join(self.workdir, "log.json")

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

    def run(self, argv: Sequence[str], childFDs: Mapping[int, int | str] | None = None) -> Deferred[None]:
        """
        Run one runtime command; fire when it has ended.

        @param childFDs: as for C{spawnProcess}; by default runc's stdout
            and stderr are collected for the error message.
        @raise RuntimeFailure: (in the Deferred) on a non-zero exit.
        """
        offset = self._logSize()
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

        def ended(status: int | None) -> None:
            if result.called:
                return
            if status == 0:
                result.callback(None)
                return
            message = self.errorText(offset) or proto.output.decode("utf-8", "replace").strip()
            result.errback(RuntimeFailure(argv, status, message or f"exit status {status}"))

        proto.ended.addCallback(ended)
        return result

    def _logSize(self) -> int:
        try:
            return os.stat(self.logPath).st_size
        except OSError:
            return 0

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
