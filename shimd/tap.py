# -*- test-case-name: tests.test_tap -*-
"""
C{twistd shimd}: options and the service maker behind the plugin.

Everything the isulad-shim argv carries is an option here, plus C{--start}
to start the container without an engine.  When the shim is done the
reactor is stopped (twistd then exits); the status is in the workdir's
C{exit} file and on the exit FIFO.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.python import usage

from shimd.attach import parseDetachKeys
from shimd.service import ShimConfig, ShimService


class Options(usage.Options):
    synopsis = "--workdir DIR --id ID --bundle DIR [options]"
    optParameters = [
        ["workdir", "w", None, "The shim's workdir (holds process.json)."],
        ["id", None, None, "Container id."],
        ["bundle", "b", None, "OCI bundle directory."],
        ["runtime", None, "runc", "OCI runtime command."],
        ["log-level", None, "info", "Shim log level (debug, info, warn, error)."],
        ["exec-timeout", None, 0, "Seconds before an exec is killed (0: none).", int],
        ["drain-timeout", None, 2.0, "Idle seconds to wait for output after exit.", float],
        ["stall-timeout", None, 10.0, "Drop a reader with no progress for this long.", float],
        ["start-timeout", None, 120.0, "Give up if the runtime has no process by then.", float],
        ["detach-keys", None, "ctrl-q", "Attach sessions' default detach keys ('' disables)."],
    ]
    optFlags = [
        ["start", None, "Start the container (runc start) once it is created."],
        ["no-shim-log", None, "Do not write shim-log.json in the workdir."],
    ]

    def postOptions(self) -> None:
        for required in ("workdir", "id", "bundle"):
            if not self[required]:
                raise usage.UsageError(f"--{required} is required")
        self["workdir"] = os.path.abspath(self["workdir"])
        try:
            parseDetachKeys(self["detach-keys"])
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        if not os.path.isfile(os.path.join(self["workdir"], "process.json")):
            raise usage.UsageError(f"no process.json in {self['workdir']}")


def configFromOptions(options: Options) -> ShimConfig:
    return ShimConfig(
        workdir=options["workdir"],
        containerId=options["id"],
        bundle=os.path.abspath(options["bundle"]),
        runtimeCommand=options["runtime"],
        execTimeout=options["exec-timeout"],
        start=bool(options["start"]),
        drainTimeout=options["drain-timeout"],
        stallTimeout=options["stall-timeout"],
        startTimeout=options["start-timeout"],
        detachKeys=options["detach-keys"],
    )


def makeService(options: Options) -> ShimService:
    """The service for twistd: stops the reactor when the shim is done."""
    from twisted.internet import reactor
    from twisted.logger import globalLogPublisher

    from shimd.lean import tuneMalloc
    from shimd.shimlog import SHIM_LOG_NAME, jsonLineObserver

    tuneMalloc()  # twistd's process is the shim's own
    shim = ShimService(configFromOptions(options), reactor)
    if not options["no-shim-log"]:
        observer = jsonLineObserver(
            os.path.join(options["workdir"], SHIM_LOG_NAME), options["log-level"]
        )
        globalLogPublisher.addObserver(observer)
    def stop(code: int) -> None:
        # The shim may be done before the reactor even runs (a bad
        # process.json): stop it once it runs, and only once.
        def stopNow() -> None:
            if reactor.running:
                reactor.stop()

        reactor.callWhenRunning(reactor.callLater, 0, stopNow)

    shim.done.addCallback(stop)
    return shim
