#!/usr/bin/env python3
"""
shimd against conmon, side by side, on this machine (issue 6).

Usage (as root; `make bench` installs conmon and matplotlib first):

    .venv/bin/python bench/run.py            # the full run (< 15 min), writes results
    .venv/bin/python bench/run.py --quick    # a short run, for development
    .venv/bin/python bench/run.py --only throughput,lifecycle
    .venv/bin/python bench/run.py --profile  # one shimd workload-1 run under cProfile

Workloads, each on both shims in alternating order (A B, B A, ...), one
warm-up round first, then the counted rounds; the median of each figure is
reported with the ratio shimd/conmon:

 1. throughput: `yes <100 chars> | head -n 2000000`, from `runc start` to the
    exit report (shimd: the status on exit_fifo; conmon: the exit file),
    MB/s, lines/s, the shim's peak RSS (VmHWM, sampled every 0.1 s up to the
    report); both logs must hold every line (records counted).  In the
    same rounds, the container alone: the same one with its output to
    /dev/null (under shimd, which then has nothing to copy), the floor.
 2. start latency (lifecycle): launching the shim -> the pid file exists
    (inotify), for a `sleep` container.
 3. memory (idle): RSS and PSS (smaps_rollup) beside an idle container.
 4. exit report latency (lifecycle): `runc kill` -> the status is readable;
    in rounds of their own, split where the container's init exits (a pidfd).
 5. attach (shimd only): connect-to-reply latency over 200 attaches, and
    workload 1 with 1 and 16 sessions reading every byte.
 6. idle CPU: utime+stime of the shim over 30 s beside an idle container
    (both shims in the same window).

Then one more workload-1 run on shimd, not counted, with the shim under
cProfile: the results say where its time goes (`profiling.py`), as well as
whether each target is met.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from profiling import ProfileSummary

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from attachclient import AttachUnavailable, Session  # noqa: E402
from shims import (  # noqa: E402
    CONMON, RUNC, BenchError, ConmonRunner, Run, Runner, ShimdRunner, cpuSeconds, cpuTimes,
    killStrays, now, rollupKB, spawnRunc, statusKB,
)

LINE = "0123456789" * 10
LINE_BYTES = len(LINE) + 1
STATE_ROOT = "/run/shimd-bench"

Results = dict[str, dict[str, dict[str, list[float]]]]


def log(msg: str) -> None:
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


def record(results: Results, workload: str, variant: str, figures: dict[str, float]) -> None:
    bucket = results.setdefault(workload, {}).setdefault(variant, {})
    for key, value in figures.items():
        bucket.setdefault(key, []).append(value)


# -- workloads ---------------------------------------------------------------


def watchExit(pid: int, exited: list[float]) -> dict[int, Callable[[int], object]]:
    """
    A handler for L{shims.waitUntil} that appends to C{exited} the time
    process C{pid} exits (a pidfd polls readable for a process that is not
    ours too).
    """
    def readable(fd: int) -> None:
        if not exited:
            exited.append(now())
            os.close(fd)  # poll() then says POLLNVAL and drops it

    return {os.pidfd_open(pid): readable}


def throughput(runner: Runner, lines: int, sessions: int = 0, alone: bool = False) -> dict[str, float]:
    """
    Workload 1 (and 5b with sessions).

    @param alone: the same container with its output to C{/dev/null}, so
        that the shim has nothing to copy: how fast the container runs on
        its own, the floor both shims are measured against.
    """
    sink = " >/dev/null" if alone else ""
    run = runner.prepare(["sh", "-c", f"yes {LINE} | head -n {lines}{sink}"], "tp")
    attached: list[Session] = []
    try:
        launched = now()
        runner.launch(run)
        runner.waitPid(run)
        readers: dict[int, Callable[[int], object]] = {}
        buf = bytearray(1 << 20)
        if sessions:
            sock = os.path.join(run.dir, "attach.sock")
            for i in range(sessions):
                s = Session(run.dir, f"s{i}")
                attached.append(s)
                status, _ = s.attach(sock)
                if status != 0:
                    raise BenchError(f"attach {i} was refused ({status})")
                for fd in (s.out, s.err):
                    readers[fd] = (lambda fd, s=s: s.readable(fd, buf))
        pid = run.shimPid
        hwm = [0]
        cpu = [0.0, 0.0]  # user, system

        def sample() -> None:
            v = statusKB(pid, "VmHWM")
            if v:
                hwm[0] = max(hwm[0], v)
            c = cpuTimes(pid)
            if c is not None:
                cpu[:] = c

        # When the container's init exits: splits the time into the
        # workload's own run and the shim's tail (drain, delete, report).
        exited: list[float] = []
        containerPid = run.extra.get("containerPid")
        if containerPid:
            readers.update(watchExit(containerPid, exited))
        wall0 = time.time_ns()  # the log's time stamps are wall-clock time
        t0 = now()
        runner.start(run)
        sample()
        t1 = runner.waitExit(run, more=readers, tick=sample, tickEvery=0.1)
        sample()
        elapsed = t1 - t0
        if attached:
            # Read what is left, up to end of file on every session.
            from shims import waitUntil

            left = {fd: h for fd, h in readers.items()}
            waitUntil(
                lambda: True if all(fd in s.ended for s in attached for fd in (s.out, s.err)) else None,
                left, 60, what="end of file on the attach FIFOs",
            )
        runner.reap(run)
        if run.status != 0:
            raise BenchError(f"{runner.name}: the container's status was {run.status}")
        records, complete = runner.countLines(run)
        if complete != (0 if alone else lines):
            raise BenchError(f"{runner.name}: the log holds {complete} of {lines} lines ({records} records)")
        # Only from a log that passed the check: a cut record has no stamp to parse.
        span = None if alone else runner.logSpan(run)
        for i, s in enumerate(attached):
            if s.outBytes != lines * LINE_BYTES:
                raise BenchError(f"attach session {i} got {s.outBytes} of {lines * LINE_BYTES} bytes")
        return {
            "seconds": elapsed,
            "launch s": t1 - launched,
            "MB/s": lines * LINE_BYTES / elapsed / 1e6,
            "lines/s": lines / elapsed,
            "peak RSS MB": hwm[0] / 1024,
            "CPU s": sum(cpu),
            "CPU user s": cpu[0],
            "CPU system s": cpu[1],
            **({"exit s": exited[0] - t0, "tail ms": (t1 - exited[0]) * 1000} if exited else {}),
            "records": records,
            **({"first record ms": (span[0] - wall0) / 1e6, "record span s": (span[1] - span[0]) / 1e9}
               if span else {}),
        }
    finally:
        for s in attached:
            s.close()
        runner.finish(run)


def lifecycle(runner: Runner, split: bool = False) -> dict[str, float]:
    """
    Workloads 2 and 4: start latency and exit report latency.

    @param split: instead, split the exit report latency where the
        container's init exits (a pidfd polled here, as in workload 1):
        the kill and the kernel's part, the same for both shims, and the
        shim's own part.  In rounds of their own: this process's wake-up
        on the init's exit competes with the shim for a CPU (in an A/B of
        3 x 16 rounds it took about 0.1 off the exit ratio).
    """
    run = runner.prepare(["sleep", "3600"], "lc")
    try:
        t0 = now()
        runner.launch(run)
        t1 = runner.waitPid(run)
        runner.start(run)
        time.sleep(0.3)
        exited: list[float] = []
        watch = watchExit(run.extra["containerPid"], exited) if split else {}
        t2 = now()
        kill = run.runc("kill", run.id, "KILL", wait=False)
        t3 = runner.waitExit(run, timeout=30, more=watch)
        deleting = runner.deleteAfterExit(run)
        kill.wait()
        if run.status != 137:
            raise BenchError(f"{runner.name}: status {run.status} after SIGKILL")
        if split:
            if not exited:
                raise BenchError(f"{runner.name}: the init's pidfd never polled readable")
            return {"kill->init ms": (exited[0] - t2) * 1000, "init->report ms": (t3 - exited[0]) * 1000}
        return {"start ms": (t1 - t0) * 1000, "exit ms": (t3 - t2) * 1000,
                "exit+delete ms": (t3 - t2 + deleting) * 1000}
    finally:
        runner.finish(run)


def runcAlone() -> dict[str, float]:
    """
    runc's own start-up and exit, with nothing to do: C{runc --version},
    spawned as the shims spawn runc.  The floor under every runc command a
    shim waits for (its C{runc delete} after the exit among them).
    """
    seconds, status = spawnRunc("--version")
    if status != 0:
        raise BenchError(f"runc --version failed ({status:#x})")
    return {"runc --version ms": seconds * 1000}


def idle(runners: list[Runner], window: float, settle: float = 2.0) -> dict[str, dict[str, float]]:
    """Workloads 3 and 6: memory and CPU beside an idle container, all shims at once."""
    runs: list[tuple[Runner, Run]] = []
    try:
        for runner in runners:
            run = runner.prepare(["sleep", "3600"], "idle")
            runs.append((runner, run))
            runner.launch(run)
            runner.waitPid(run)
            runner.start(run)
        time.sleep(settle)
        before = {r.name: cpuSeconds(run.shimPid) for r, run in runs}
        time.sleep(window)
        out: dict[str, dict[str, float]] = {}
        for runner, run in runs:
            after = cpuSeconds(run.shimPid)
            b = before[runner.name]
            if after is None or b is None or run.proc.poll() is not None:
                raise BenchError(f"{runner.name} is gone during the idle window")
            mem = rollupKB(run.shimPid)
            out[runner.name] = {
                "idle CPU s": after - b,
                "RSS MB": mem.get("Rss", 0) / 1024,
                "PSS MB": mem.get("Pss", 0) / 1024,
            }
        return out
    finally:
        for runner, run in runs:
            try:
                runner.finish(run)
            except Exception:
                traceback.print_exc()


def attachLatency(runner: ShimdRunner, count: int) -> dict[str, float] | None:
    """Workload 5a: connect-to-reply latency; None if attach is not there."""
    run = runner.prepare(["sleep", "3600"], "al")
    try:
        runner.launch(run)
        seen = runner.waitPid(run)
        sock = runner.attachSocket(run)
        # The first reply comes once the service is up: how long after the
        # pid file (the launch starts runc before Twisted is loaded).
        first = Session(run.dir, "first")
        try:
            firstStatus, _ = first.attach(sock)
        except AttachUnavailable:
            return None
        finally:
            first.close()
        ready = (now() - seen) * 1000
        runner.start(run)
        times = []
        failures = 0
        for i in range(count):
            s = Session(run.dir, f"l{i}")
            try:
                status, dt = s.attach(sock)
            except AttachUnavailable:
                return None
            finally:
                s.close()
            if status != 0:
                failures += 1
            times.append(dt * 1000)
        times.sort()
        return {
            "p50 ms": statistics.median(times),
            "p99 ms": times[min(len(times) - 1, int(round(0.99 * len(times))) - 1)],
            "refused": failures + (firstStatus != 0),
            "ready ms": ready,
        }
    finally:
        runner.finish(run)


def attachAvailable(runner: ShimdRunner) -> bool:
    run = runner.prepare(["sleep", "3600"], "probe")
    try:
        runner.launch(run)
        runner.waitPid(run)
        s = Session(run.dir, "probe")
        try:
            status, _ = s.attach(runner.attachSocket(run))
        except AttachUnavailable:
            return False
        finally:
            s.close()
        return status == 0
    finally:
        runner.finish(run)


# -- orchestration -------------------------------------------------------------


def rounds(count: int, warmup: int, variants: list[tuple[str, Callable[[], Any]]],
           results: Results, workload: str) -> None:
    """Run every variant per round, order reversed every other round."""
    for i in range(warmup + count):
        order = variants if i % 2 == 0 else variants[::-1]
        counted = i >= warmup
        for name, fn in order:
            t = now()
            figures = fn()
            if isinstance(figures, dict) and figures and isinstance(next(iter(figures.values())), dict):
                for sub, f in figures.items():
                    if counted:
                        record(results, workload, sub, f)
                shown = "; ".join(f"{k}: {fmtFigures(v)}" for k, v in figures.items())
            else:
                if counted and figures is not None:
                    record(results, workload, name, figures)
                shown = fmtFigures(figures) if figures else "n/a"
            log(f"{workload} {'run' if counted else 'warm-up'} {i - warmup + 1 if counted else 0} "
                f"{name}: {shown} ({now() - t:.1f}s)")


def fmtFigures(f: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in f.items())


def loadAverage() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def machineInfo() -> dict[str, str]:
    def first(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True).stdout.splitlines()[0]
        except (OSError, IndexError):
            return "?"

    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    import twisted

    mem = "?"
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) // 1024} MiB"
    return {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "memory": mem,
        "kernel": platform.release(),
        "runc": first([RUNC, "--version"]),
        "conmon": first([CONMON, "--version"]),
        "python": platform.python_version(),
        "twisted": twisted.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a short run: fewer lines, runs and seconds")
    parser.add_argument("--runs", type=int,
                        help="counted runs per workload (default 5; throughput 9, lifecycle 20 and 10 split)")
    parser.add_argument("--lines", type=int, help="lines for workload 1 (default 2,000,000)")
    parser.add_argument("--idle-window", type=float, help="seconds of the idle CPU window (default 30)")
    parser.add_argument("--only", help="comma-separated: throughput,lifecycle,idle,attach")
    parser.add_argument("--output", default=HERE, help="where results.md and results.png go")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    parser.add_argument("--shimd-tree", metavar="DIR",
                        help="run isulad-shim from this shimd checkout (before/after comparisons)")
    parser.add_argument("--profile", metavar="DIR", nargs="?", const=os.path.join(HERE, "output"),
                        help="run workload 1 once on shimd under cProfile and print the profile")
    parser.add_argument("--profile-sessions", type=int, default=0, metavar="N",
                        help="with --profile: N attach sessions reading every byte")
    opts = parser.parse_args(argv)

    if os.geteuid() != 0:
        sys.stderr.write("bench: runc needs root\n")
        return 2
    os.environ["PATH"] = os.environ.get("PATH", "") + ":/usr/local/sbin:/usr/sbin:/sbin"
    if not os.access(CONMON, os.X_OK):
        sys.stderr.write("bench: conmon is not installed (apt-get install conmon, or make bench)\n")
        return 2

    from shimd.bundle import ensureDemoBundle

    bundle = ensureDemoBundle()
    killStrays(STATE_ROOT)
    shutil.rmtree(STATE_ROOT, ignore_errors=True)
    os.makedirs(STATE_ROOT, mode=0o700)

    quick = opts.quick
    # Workload 1 and the lifecycle are short and their per-round ratios
    # vary by +-10% on a 2-core VM: more rounds for a steadier median.
    runs = opts.runs or (3 if quick else 5)
    tpRuns = opts.runs or (3 if quick else 9)
    lcRuns = opts.runs or (3 if quick else 20)
    splitRuns = opts.runs or (3 if quick else 10)
    lines = opts.lines or (200_000 if quick else 2_000_000)
    window = opts.idle_window or (5.0 if quick else 30.0)
    attaches = 50 if quick else 200
    only = set(opts.only.split(",")) if opts.only else {"throughput", "lifecycle", "idle", "attach"}

    if opts.profile:
        from profiling import profileThroughput

        return profileThroughput(STATE_ROOT, bundle, lines, opts.profile, opts.profile_sessions)

    shimArgv = None
    if opts.shimd_tree:
        tree = os.path.abspath(opts.shimd_tree)
        shimArgv = [sys.executable, "-c",
                    f"import sys; sys.path.insert(0, {tree!r}); "
                    "from shimd.cli import isuladShimMain; isuladShimMain()"]
        log(f"shimd from {tree}")
    shimd = ShimdRunner(STATE_ROOT, bundle, shimArgv=shimArgv)
    conmon = ConmonRunner(STATE_ROOT, bundle)
    results: Results = {}
    notes: list[str] = []
    started = now()
    info = machineInfo()
    loadStart = loadAverage()
    log("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))

    hasAttach = False
    if "attach" in only or "throughput" in only:
        hasAttach = attachAvailable(shimd)
        if not hasAttach:
            notes.append("attach: n/a (attach not available: nothing listens on attach.sock)")
        log(f"attach available: {hasAttach}")

    profile: ProfileSummary | None = None
    try:
        if "lifecycle" in only:
            rounds(lcRuns, 1, [("shimd", lambda: lifecycle(shimd)), ("conmon", lambda: lifecycle(conmon))],
                   results, "lifecycle")
            rounds(splitRuns, 0, [("shimd", lambda: lifecycle(shimd, split=True)),
                                  ("conmon", lambda: lifecycle(conmon, split=True)),
                                  ("runc alone", runcAlone)], results, "lifecycle")
        if "throughput" in only:
            variants: list[tuple[str, Callable[[], Any]]] = [
                ("shimd", lambda: throughput(shimd, lines)),
                ("conmon", lambda: throughput(conmon, lines)),
                ("container alone", lambda: throughput(shimd, lines, alone=True)),
            ]
            if hasAttach and "attach" in only:
                variants += [
                    ("shimd+1 attach", lambda: throughput(shimd, lines, 1)),
                    ("shimd+16 attach", lambda: throughput(shimd, lines, 16)),
                ]
            rounds(tpRuns, 1, variants, results, "throughput")
        if "attach" in only and hasAttach:
            rounds(runs, 1, [("shimd", lambda: attachLatency(shimd, attaches))], results, "attach")
        if "idle" in only:
            def both(i: list[int] = [0]) -> dict[str, dict[str, float]]:
                i[0] += 1
                order: list[Runner] = [shimd, conmon] if i[0] % 2 else [conmon, shimd]
                return idle(order, window if i[0] > 1 else min(window, 3.0))

            rounds(runs, 1, [("both", both)], results, "idle")
        if "throughput" in only:
            from profiling import profiledRun, summarize

            path, figures = profiledRun(STATE_ROOT, bundle, lines, os.path.join(HERE, "output"))
            profile = summarize(path, figures["seconds"], figures["records"])
            log(f"profiled run: {figures['seconds']:.2f} s, {path}")
    finally:
        killStrays(STATE_ROOT)

    info["wall time"] = f"{now() - started:.0f} s"
    info["load average (1, 5, 15 min)"] = f"{loadStart} at the start, {loadAverage()} at the end"
    info["settings"] = (f"{runs} counted runs + 1 warm-up per workload (throughput: {tpRuns}, "
                        f"lifecycle: {lcRuns}, and {splitRuns} split at the init's exit), {lines:,} lines, "
                        f"idle window {window:g} s, {attaches} attaches per run")
    from report import markdown, plot

    text = markdown(results, info, notes, lines, profile, LINE_BYTES)
    print(text)
    if not opts.no_write:
        os.makedirs(opts.output, exist_ok=True)
        with open(os.path.join(opts.output, "results.md"), "w") as f:
            f.write(text)
        plot(results, os.path.join(opts.output, "results.png"), info)
        log(f"wrote {opts.output}/results.md and results.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
