"""
Where shimd's time goes in workload 1: one run with the shim under cProfile
(`python -m cProfile -o DIR/shimd-<time>.prof isulad-shim ...`; cProfile
writes the file when the shim calls sys.exit).  No change to shimd is
needed: the engine takes the shim's argv.

`make bench` ends with one such run and puts its summary in results.md
(L{summarize}, rendered by L{report.markdown}), so that the table says why
as well as whether.  `bench/run.py --profile [DIR] [--profile-sessions N]`
makes one run and prints the top of the profile by own and by cumulative
time.

cProfile's clock is the wall clock: a function's own time holds the time the
shim was off a CPU while in it, and the wait in C{epoll.poll} is the time the
shim had nothing to do.
"""

from __future__ import annotations

import os
import pstats
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

from shims import ShimdRunner
from shimd.engine import shimCommand

_WAIT = "<method 'poll' of 'select.epoll' objects>"
_READ = "<built-in method posix.read>"
_WRITE = "<built-in method posix.write>"
_LOOP = "mainLoop"
_IMPORT = "_find_and_load"

GROUPS: list[tuple[str, Callable[[str, str], bool]]] = [
    ("reading the container's pipes (`os.read`)", lambda kind, name: name == _READ),
    ("writing the log and the FIFOs (`os.write`)", lambda kind, name: name == _WRITE),
    ("escaping and building records (methods of bytes)",
     lambda kind, name: kind == "C built-in" and "of 'bytes' objects" in name),
    ("shimd's Python", lambda kind, name: kind == "shimd"),
    ("Twisted's Python", lambda kind, name: kind == "Twisted"),
]
"""Named parts of the shim's own time, by a function's kind (L{_kind}) and name."""


@dataclass
class ProfileRow:
    """One function: where it is, what kind of code, its calls and own time."""

    where: str
    kind: str
    calls: int
    own: float


@dataclass
class ProfileSummary:
    """
    One profiled shim, from its start to its exit.

    @ivar seconds: the run's C{runc start} -> exit report.
    @ivar total: seconds of the profiled shim, start-up included.
    @ivar loop: seconds in the reactor's main loop (cumulative).
    @ivar wait: seconds waiting in C{epoll.poll}: the shim had nothing to do.
    @ivar imports: seconds importing modules (cumulative, at start-up and
        any later import).
    @ivar groups: own seconds of each of L{GROUPS}, in order.
    @ivar top: the functions with the most own time, the wait excluded.
    """

    seconds: float
    records: float
    total: float = 0.0
    loop: float = 0.0
    wait: float = 0.0
    imports: float = 0.0
    calls: int = 0
    reads: int = 0
    groups: dict[str, float] = field(default_factory=dict)
    top: list[ProfileRow] = field(default_factory=list)


def _kind(filename: str) -> str:
    if filename == "~":
        return "C built-in"
    if f"{os.sep}shimd{os.sep}" in filename:
        return "shimd"
    if f"{os.sep}twisted{os.sep}" in filename:
        return "Twisted"
    return "stdlib and the rest"


def _where(filename: str, line: int, name: str) -> str:
    if filename == "~":
        return name
    for marker, keep in ((f"{os.sep}site-packages{os.sep}", ""), (f"{os.sep}shimd{os.sep}", "shimd" + os.sep),
                         (f"{os.sep}lib{os.sep}python{sys.version_info[0]}.{sys.version_info[1]}{os.sep}", "")):
        if marker in filename:
            filename = keep + filename.rsplit(marker, 1)[1]
            break
    else:
        filename = os.path.basename(filename)
    return f"{filename}:{line}({name})"


def summarize(path: str, seconds: float, records: float, top: int = 12) -> ProfileSummary:
    """Read a profile written by L{profiledRun}."""
    stats = pstats.Stats(path)
    entries = stats.stats  # type: ignore[attr-defined]
    summary = ProfileSummary(seconds=seconds, records=records, groups={name: 0.0 for name, _ in GROUPS})
    rows: list[ProfileRow] = []
    for (filename, line, name), (_, calls, own, cumulative, _) in entries.items():
        summary.total += own
        summary.calls += calls
        if name == _WAIT:
            summary.wait += own
            continue
        kind = _kind(filename)
        if name == _LOOP and kind == "Twisted":
            summary.loop = max(summary.loop, cumulative)
        if name == _IMPORT and filename.startswith("<frozen importlib"):
            summary.imports = max(summary.imports, cumulative)
        if name == _READ:
            summary.reads = calls
        for group, matches in GROUPS:
            if matches(kind, name):
                summary.groups[group] += own
                break
        rows.append(ProfileRow(_where(filename, line, name), kind, calls, own))
    rows.sort(key=lambda r: r.own, reverse=True)
    summary.top = rows[:top]
    return summary


def profiledRun(stateRoot: str, bundle: str, lines: int, outdir: str,
                sessions: int = 0) -> tuple[str, dict[str, float]]:
    """
    Workload 1 once on shimd with the shim under cProfile.

    @return: the profile's path and the run's figures.
    """
    from run import throughput

    os.makedirs(outdir, exist_ok=True)
    path = os.path.join(outdir, f"shimd-{time.strftime('%Y%m%d-%H%M%S')}.prof")
    shim = shimCommand()
    argv = [sys.executable, "-m", "cProfile", "-o", path, *shim[-1:]]
    runner = ShimdRunner(stateRoot, bundle, shimArgv=argv)
    return path, throughput(runner, lines, sessions)


def profileThroughput(stateRoot: str, bundle: str, lines: int, outdir: str, sessions: int = 0) -> int:
    path, figures = profiledRun(stateRoot, bundle, lines, outdir, sessions)
    print(f"workload 1 with {sessions} attach sessions under cProfile: {figures['seconds']:.2f} s, "
          f"{figures['records']:.0f} records")
    print(f"profile: {path}")
    stats = pstats.Stats(path)
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(25)
    return 0
