"""
Helpers for end-to-end tests: real runc containers through the real shim,
with the test playing iSulad's part through L{shimd.engine.Engine}.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, TypeVar

from twisted.trial.unittest import SkipTest

from shimd.engine import Container, Engine

T = TypeVar("T")
BIN = os.path.dirname(sys.executable)


def requireRunc() -> str:
    """Skip unless we are root with runc and the demo bundle; return the bundle."""
    if os.geteuid() != 0:
        raise SkipTest("end-to-end tests need root")
    if not shutil.which("runc"):
        raise SkipTest("runc is not installed (make deps)")
    from shimd.bundle import ensureDemoBundle

    return ensureDemoBundle()


def repeat(default: int) -> int:
    """How many times a repeated field case runs (SHIMD_E2E_SCALE scales it)."""
    scale = float(os.environ.get("SHIMD_E2E_SCALE", "1"))
    return max(1, int(default * scale))


def parallel(fn: Callable[[int], T], count: int, workers: int = 4) -> list[T]:
    """Run C{fn(i)} for i in range(count), a few at a time; re-raise the first failure."""
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, range(count)))


def readRecords(paths: Iterable[str]) -> list[dict[str, Any]]:
    """Every json-file record of C{paths}, in order; every line must be JSON."""
    records = []
    for path in paths:
        with open(path, "rb") as f:
            for line in f.read().splitlines():
                records.append(json.loads(line))
    return records


def reassemble(records: list[dict[str, Any]], stream: str) -> str:
    return "".join(r["log"] for r in records if r["stream"] == stream)


@dataclass
class Result:
    stdout: bytes
    stderr: bytes
    status: int
    shimCode: int
    shimStdout: bytes
    shimStderr: bytes
    workdir: str
    records: list[dict[str, Any]] = field(default_factory=list)
    atStatus: tuple[bytes, bytes, str] | None = None


class EngineMixin:
    """For trial TestCases: an engine on a private state root."""

    def setUpEngine(self) -> None:
        self.bundle = requireRunc()
        self.stateRoot = tempfile.mkdtemp(prefix="shimd-e2e-", dir="/tmp")
        self.addCleanup(shutil.rmtree, self.stateRoot, True)  # type: ignore[attr-defined]
        self.engine = Engine(stateRoot=self.stateRoot)

    def runContainer(
        self,
        args: list[str],
        stdinData: bytes | None = None,
        closeStdinBeforeStart: bool = False,
        timeout: float = 60.0,
        between: Callable[[Container], object] | None = None,
        **prepare: Any,
    ) -> Result:
        """
        One container from prepare to the shim's exit, as iSulad would run it.

        @param stdinData: written to the stdin FIFO after start, then closed.
        @param between: called after start, before collecting.
        """
        stdin = stdinData is not None or closeStdinBeforeStart
        c = self.engine.prepare(self.bundle, args, stdin=stdin, **prepare)
        try:
            self.engine.create(c)
            if closeStdinBeforeStart:
                c.closeStdin()
            self.engine.start(c)
            feeder = None
            if stdinData is not None:
                # From a thread, as an engine would: the output must be read
                # while the input is written, or both ends block.
                feeder = threading.Thread(target=c.feedStdin, args=(stdinData,), daemon=True)
                feeder.start()
            if between is not None:
                between(c)
            seen: list[tuple[bytes, bytes, str]] = []

            def onStatus(status: int, out: bytes, err: bytes) -> None:
                log = c.path("console.log")
                text = open(log).read() if os.path.exists(log) else ""
                seen.append((out, err, text))

            out, err, status = self.engine.collect(c, timeout=timeout, onStatus=onStatus)
            if feeder is not None:
                feeder.join(timeout)
            code = self.engine.reapShim(c)
            logs = [c.path("console.log")] if os.path.exists(c.path("console.log")) else []
            return Result(out, err, status, code, c.shimStatus, c.shimStderr, c.workdir,
                          readRecords(logs), seen[0] if seen else None)
        finally:
            self.engine.close(c, remove=False)


def runShimIn(workdir: str, argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    """Run isulad-shim by hand in C{workdir}."""
    return subprocess.run(
        [os.path.join(BIN, "isulad-shim"), *argv], cwd=workdir, capture_output=True, timeout=timeout
    )
