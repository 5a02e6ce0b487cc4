"""The results table (markdown) and the plot (matplotlib, Agg)."""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from profiling import ProfileSummary

Results = dict[str, dict[str, dict[str, list[float]]]]

# label, workload, figure, unit, target text, target check on (ratio, shimd median)
Check = Callable[[float | None, float], bool] | None
ROWS: list[tuple[str, str, str, str, str, Check]] = [
    ("1. Log throughput: start -> exit report", "throughput", "seconds", "s",
     "ratio <= 1.0", lambda r, v: r is not None and r <= 1.0),
    ("1. Workload 1 from the shim's launch -> exit report", "throughput", "launch s", "s", "", None),
    ("1. Log throughput", "throughput", "MB/s", "MB/s", "", None),
    ("1. Log throughput", "throughput", "lines/s", "lines/s", "", None),
    ("1. Shim CPU during workload 1 (sampled)", "throughput", "CPU s", "s", "", None),
    ("1. of it, user time (shimd: Python and its bytes methods)", "throughput", "CPU user s", "s", "", None),
    ("1. of it, system time (the kernel: reads, writes, wake-ups)", "throughput", "CPU system s", "s", "", None),
    ("1. start -> the container's init exits", "throughput", "exit s", "s", "", None),
    ("1. init exits -> exit report (drain, delete, report)", "throughput", "tail ms", "ms", "", None),
    ("1. start -> the log's first record (stamped at the shim's first read)", "throughput", "first record ms",
     "ms", "", None),
    ("1. the log's first record -> its last (the copying, once the shim reads)", "throughput", "record span s",
     "s", "", None),
    ("2. Start latency: launch -> pid file", "lifecycle", "start ms", "ms",
     "ratio <= 3", lambda r, v: r is not None and r <= 3.0),
    ("3. Idle RSS", "idle", "RSS MB", "MB", "shimd <= 25 MB", lambda r, v: v <= 25.0),
    ("3. Idle PSS", "idle", "PSS MB", "MB", "", None),
    ("3. Peak RSS during workload 1", "throughput", "peak RSS MB", "MB", "", None),
    ("4. Exit report latency: runc kill -> status", "lifecycle", "exit ms", "ms",
     "ratio <= 2", lambda r, v: r is not None and r <= 2.0),
    ("4. runc kill -> the container's init exits", "lifecycle", "kill->init ms", "ms", "", None),
    ("4. init exits -> status (shimd: its runc delete, then the report)", "lifecycle", "init->report ms",
     "ms", "", None),
    ("4. runc kill -> status and container deleted", "lifecycle", "exit+delete ms", "ms", "", None),
    ("6. Idle CPU over the window", "idle", "idle CPU s", "s", "shimd < 0.05 s",
     lambda r, v: v < 0.05),
]


def med(values: list[float] | None) -> float | None:
    return statistics.median(values) if values else None


def fmt(v: float | None) -> str:
    if v is None:
        return "n/a"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    if abs(v) >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def pairRatios(a: list[float] | None, b: list[float] | None) -> list[float]:
    if not a or not b:
        return []
    return [x / y for x, y in zip(a, b) if y]


def spread(ratios: list[float]) -> str:
    """The middle half of the per-round ratios, C{"q1-q3"}: how far a median is from noise."""
    if len(ratios) < 4:
        return ""
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return f"{fmt(q1)}-{fmt(q3)}"


def markdown(results: Results, info: dict[str, str], notes: list[str], lines: int,
             profile: ProfileSummary | None = None, lineBytes: int = 0) -> str:
    out = ["# shimd vs conmon: benchmark results", ""]
    out.append("Produced by `make bench` (`bench/run.py`); rerun it to refresh this file.")
    out.append("")
    out.append("| | |")
    out.append("|---|---|")
    for key, value in info.items():
        out.append(f"| {key} | {value} |")
    out.append("")
    out.append("Medians of the counted runs. *ratio* is shimd/conmon, the median of the "
               "per-round ratios (runs alternate A B, B A, ...); *middle half* is the 25th to "
               "75th percentile of those per-round ratios.")
    out.append("")
    out.append("| figure | unit | shimd | conmon | ratio | middle half | target | met |")
    out.append("|---|---|---:|---:|---:|---:|---|---|")
    verdicts: list[tuple[str, bool]] = []
    for label, workload, figure, unit, target, check in ROWS:
        w = results.get(workload, {})
        a = w.get("shimd", {}).get(figure)
        b = w.get("conmon", {}).get(figure)
        if a is None and b is None:
            continue
        ratios = pairRatios(a, b)
        ratio = med(ratios)
        va = med(a)
        met = ""
        if check is not None and va is not None:
            ok = check(ratio, va)
            met = "yes" if ok else "**no**"
            verdicts.append((f"{label} ({target})", ok))
        out.append(f"| {label} | {unit} | {fmt(va)} | {fmt(med(b))} | "
                   f"{fmt(ratio) if ratio is not None else ''} | {spread(ratios)} | {target} | {met} |")
    out.append("")

    # The floor: the same container with its output to /dev/null.
    tp = results.get("throughput", {})
    alone = tp.get("container alone", {}).get("exit s")
    if alone:
        out.append("The container alone: workload 1 with its output to /dev/null (under shimd, which "
                   "then has nothing to copy), in the same rounds. *vs alone* is the median of the "
                   "per-round ratios to it: what each shim's copying costs the container's own run.")
        out.append("")
        out.append("| figure | unit | container alone | shimd vs alone | conmon vs alone |")
        out.append("|---|---|---:|---:|---:|")
        row = [fmt(med(pairRatios(tp.get(shim, {}).get("exit s"), alone))) for shim in ("shimd", "conmon")]
        out.append(f"| 1. start -> the container's init exits | s | {fmt(med(alone))} | {row[0]} | {row[1]} |")
        out.append("")

    # Attach: shimd only, compared with shimd's own non-attached run.
    at = results.get("attach", {}).get("shimd", {})
    if at or "shimd+1 attach" in tp:
        out.append("Attach (shimd only; conmon's attach is another protocol). Workload-1 times are "
                   "compared with shimd's non-attached runs of the same rounds.")
        out.append("")
        out.append("| figure | unit | shimd | vs no attach | target | met |")
        out.append("|---|---|---:|---:|---|---|")
        if at:
            out.append(f"| 5. attach connect -> reply, p50 | ms | {fmt(med(at.get('p50 ms')))} | | | |")
            out.append(f"| 5. attach connect -> reply, p99 | ms | {fmt(med(at.get('p99 ms')))} | | | |")
            refused = sum(at.get("refused", []))
            out.append(f"| 5. attaches refused | count | {refused:g} | | | |")
            if at.get("ready ms"):
                out.append(f"| 5. pid file -> first attach reply (service up) | ms | "
                           f"{fmt(med(at.get('ready ms')))} | | | |")
        # Sessions attach once the service is up, so runc start comes
        # later in an attached run than in a plain one: its start -> exit
        # window holds none of the start-up a plain run's does.  The
        # target is judged from the launch, where both hold all of it.
        for n in (1, 16):
            for figure, basis in (("seconds", "start"), ("launch s", "launch")):
                v = tp.get(f"shimd+{n} attach", {}).get(figure)
                if not v:
                    continue
                ratio = med(pairRatios(v, tp.get("shimd", {}).get(figure)))
                target, met = "", ""
                if n == 16 and basis == "launch" and ratio is not None:
                    target = "<= 1.5 (adds <= 50%)"
                    ok = ratio <= 1.5
                    met = "yes" if ok else "**no**"
                    verdicts.append(("5. 16 attach sessions add <= 50% to workload 1", ok))
                out.append(f"| 5. workload 1 with {n} session{'s' if n > 1 else ''} reading every byte, "
                           f"{basis} -> exit report | s | {fmt(med(v))} | {fmt(ratio)} | {target} | {met} |")
        out.append("")
    for note in notes:
        out.append(f"- {note}")
    if notes:
        out.append("")

    if verdicts:
        out.append("Targets: " + ", ".join(f"{'met' if ok else 'MISSED'}: {name}" for name, ok in verdicts))
        out.append("")

    out += whySection(results, profile, lines * lineBytes)

    out.append("## Every counted run")
    out.append("")
    for workload, variants in results.items():
        for variant, figures in variants.items():
            for figure, values in figures.items():
                out.append(f"- {workload} / {variant} / {figure}: " + ", ".join(fmt(v) for v in values))
    out.append("")
    out.append("## How it is measured")
    out.append("")
    out.append(f"""- Same busybox bundle (the demo rootfs, read-only; a private config.json per run), runc, same
  filesystem. shimd runs as iSulad runs it (`shimd.engine`: workdir, process.json, exit_fifo),
  without the engine's stdout/stderr FIFOs, so its only output is the json-file log; conmon runs
  with `--api-version 1 --sync --no-sync-log`, a sync pipe, `--exit-dir` and a k8s-file log
  (`--no-sync-log` because shimd does not fsync either).
- Workload 1: `sh -c 'yes <100 chars> | head -n {lines}'`; time from `runc start` to the exit
  report (shimd: 4 bytes on exit_fifo; conmon: the exit file, seen by inotify). Every run checks
  the container's status (0) and that the log holds {lines:,} complete stdout lines (json-file
  records ending in `\\n`; k8s-file `F` records), and with attach, that each session read every
  byte. Peak RSS is VmHWM sampled every 0.1 s up to the report.
  Also from launching the shim: shimd starts `runc create` before it loads Twisted (start
  latency), so the rest of its start-up (the "pid file -> first attach reply" figure) falls
  after the pid file, inside the `runc start` -> exit window if the container writes at once;
  conmon is fully up when its pid file appears. The launch -> exit figure holds every start-up.
  The run is split where the container's init exits (the bench polls a pidfd on it): before,
  the workload's own run beside the shim; after, the shim's tail (drain, delete, report).
  The container alone is `sh -c 'yes <100 chars> | head -n {lines} >/dev/null'` under shimd, in
  the same rounds: the container's own speed on this machine when no shim copies its output.
- Start latency: from launching the shim to runc's pid file appearing (inotify), `sleep` container.
- Exit report latency: from spawning `runc kill <id> KILL` to the status being readable. shimd
  reports after its own `runc delete --force` (iSulad's order: the container is gone from runc
  when the engine sees the status; `kill --all` is skipped for a container with its own pid
  namespace, whose processes the kernel has already killed); conmon writes the exit file right
  after the reap and leaves the delete to the engine. "runc kill -> status and container
  deleted" adds to conmon's figure the engine's `runc delete --force` spawned right after the
  report (posix_spawn, as the shims spawn runc); for shimd it is the exit report latency, and the
  bench checks that runc's state directory is gone by then. The figure is split where the
  container's init exits (the bench polls a pidfd on it), in rounds of their own (the bench's
  wake-up at the exit competes with the shim for a CPU, so the split rounds' sum is not the
  headline figure): "runc kill -> the container's init exits" is runc kill's start-up and the
  kernel's work, the same for both shims; "init exits -> status" is the shim's own part (for
  shimd almost all of it is its `runc delete`, most of which is runc's own start-up).
- Shim CPU during workload 1: utime+stime sampled every 0.1 s, so up to 0.1 s of work is missed;
  user and system time are also shown apart.
- Why: after the counted rounds, one more workload-1 run on shimd with the shim under cProfile
  (`python -m cProfile`, the wall clock; the profile is written under `bench/output/`, not kept in
  git). runc alone is `runc --version`, spawned as the shims spawn runc, in the split lifecycle
  rounds.
- Idle: both shims beside a `sleep` container in the same window, after 2 s of settling; CPU is
  utime+stime from /proc/<pid>/stat, memory Rss/Pss from /proc/<pid>/smaps_rollup.
- Attach: the wire protocol (FIFOs under the workdir, `"<in> <out> <err>"`, 4-byte reply),
  sessions attached before `runc start`; the bench process reads every session's FIFOs.
""")
    return "\n".join(out)


def whySection(results: Results, profile: ProfileSummary | None, volume: int) -> list[str]:
    """
    Why each figure is what it is: for the throughput, the profile of one
    more run; for the exit report latency, its parts from the split rounds
    and runc's own start-up.
    """
    parts: list[str] = []
    if profile is not None:
        parts += _throughputWhy(profile, results, volume)
    parts += _exitWhy(results)
    return ["## Why: where the time goes", ""] + parts if parts else []


def _verdict(results: Results, workload: str, figure: str) -> str:
    """
    "the target (...) is met/missed in this run", judged by the figure's
    row in L{ROWS}; empty if the figure has no target or no ratio.
    """
    for _, w, f, _, target, check in ROWS:
        if (w, f) == (workload, figure) and check is not None:
            byShim = results.get(workload, {})
            a, b = byShim.get("shimd", {}).get(figure), byShim.get("conmon", {}).get(figure)
            ratio, va = med(pairRatios(a, b)), med(a)
            if ratio is None or va is None:
                return ""
            return f"the target ({target}) is {'met' if check(ratio, va) else '**missed**'} in this run"
    return ""


def _throughputWhy(p: ProfileSummary, results: Results, volume: int) -> list[str]:
    """One uncounted workload-1 run with the shim under cProfile, and how the shim's time divides."""
    tp = results.get("throughput", {})
    ratios = pairRatios(tp.get("shimd", {}).get("seconds"), tp.get("conmon", {}).get("seconds"))
    ratio = med(ratios)
    out = ["### Log throughput: where shimd's time goes in workload 1", ""]
    verdict = _verdict(results, "throughput", "seconds")
    if verdict:
        verdict = (f" For throughput, {verdict}: {fmt(ratio)}, middle half of the rounds "
                   f"{spread(ratios) or 'n/a'}.")
    out.append("One more workload-1 run, not counted, with the shim under cProfile (its clock is the wall "
               "clock, so a function's own time holds the time the shim was off a CPU in it; "
               "`bench/run.py --profile` prints the whole profile). It took "
               f"{fmt(p.seconds)} s from `runc start` to the exit report ({p.records:,.0f} records); the "
               f"profile covers the shim's whole life, {fmt(p.total)} s.{verdict}")
    out.append("")
    out += _startupGap(tp)
    work = p.total - p.wait
    out.append(f"- In the reactor's loop: {fmt(p.loop)} s, of which {fmt(p.wait)} s "
               f"({p.wait / p.loop:.0%}) waiting in `epoll.poll` with nothing to do."
               if p.loop else f"- Waiting in `epoll.poll` with nothing to do: {fmt(p.wait)} s.")
    out.append(f"- Importing modules: {fmt(p.imports)} s (nearly all at start-up: Twisted loads while runc "
               "creates the container, and after).")
    if work > 0:
        out.append(f"- The shim's work, {fmt(work)} s of own time in {p.calls:,} calls (the wait excluded):")
        for group, own in p.groups.items():
            out.append(f"  - {group}: {fmt(own)} s ({own / work:.0%})")
        rest = work - sum(p.groups.values())
        out.append(f"  - the rest (imports, the standard library, start-up and exit): {fmt(rest)} s "
                   f"({rest / work:.0%})")
    if p.reads and volume:
        out.append(f"- {p.reads:,} `os.read` calls (nearly all on the container's pipes), "
                   f"{volume / p.reads / 1024:.0f} KiB of output per call on average.")
    out.append("")
    out.append("| function (own time, the wait excluded) | kind | calls | own s | share of the work |")
    out.append("|---|---|---:|---:|---:|")
    for row in p.top:
        name = row.where.replace("|", "\\|")
        share = f"{row.own / work:.0%}" if work > 0 else ""
        out.append(f"| `{name}` | {row.kind} | {row.calls:,} | {fmt(row.own)} | {share} |")
    out.append("")
    return out


def _startupGap(tp: dict[str, dict[str, list[float]]]) -> list[str]:
    """Where the counted runs lose time: before the shim's first read, or while it copies."""
    a, b = tp.get("shimd", {}), tp.get("conmon", {})
    firstA, firstB = med(a.get("first record ms")), med(b.get("first record ms"))
    spans = pairRatios(a.get("record span s"), b.get("record span s"))
    spanA, spanB, ratio = med(a.get("record span s")), med(b.get("record span s")), med(spans)
    if firstA is None or firstB is None or spanA is None or spanB is None or ratio is None:
        return []
    pace = "as fast as conmon or faster" if ratio <= 1.0 else f"{ratio - 1:.0%} slower than conmon"
    return [
        f"- Before the first read: the log's first record is stamped {fmt(firstA)} ms after `runc start` "
        f"under shimd, {fmt(firstB)} ms under conmon (the counted runs). While shimd loads Twisted "
        "(the imports below), its copier copies (`shimd/earlycopy.py`: a process of its own, not in this "
        "profile); without it the container filled its 1 MiB pipe and waited for the imports.",
        f"- Once it reads: from the first record to the last, shimd {fmt(spanA)} s, conmon {fmt(spanB)} s, "
        f"ratio {fmt(ratio)} (middle half {spread(spans) or 'n/a'}): shimd copies {pace}.",
    ]


def _exitWhy(results: Results) -> list[str]:
    """The exit report latency in parts: the kill, the shim's part, runc's floor."""
    lc = results.get("lifecycle", {})
    a, b = lc.get("shimd", {}), lc.get("conmon", {})
    runc = med(lc.get("runc alone", {}).get("runc --version ms"))
    exitA, exitB = med(a.get("exit ms")), med(b.get("exit ms"))
    if exitA is None or exitB is None:
        return []
    ratios = pairRatios(a.get("exit ms"), b.get("exit ms"))
    ratio = med(ratios)
    out = ["### Exit report latency: its parts", ""]
    if ratio is not None:
        out.append(f"`runc kill` -> status: shimd {fmt(exitA)} ms, conmon {fmt(exitB)} ms, ratio {fmt(ratio)} "
                   f"(middle half {spread(ratios) or 'n/a'}); {_verdict(results, 'lifecycle', 'exit ms')}.")
        out.append("")
    killA, killB = med(a.get("kill->init ms")), med(b.get("kill->init ms"))
    tailA, tailB = med(a.get("init->report ms")), med(b.get("init->report ms"))
    if killA is not None and killB is not None and tailA is not None and tailB is not None:
        out.append(f"- `runc kill` -> the container's init exits: shimd {fmt(killA)} ms, conmon {fmt(killB)} ms: "
                   "runc kill's start-up and the kernel's work, the same work for both shims.")
        out.append(f"- The init exits -> status: shimd {fmt(tailA)} ms, conmon {fmt(tailB)} ms. shimd reports "
                   "after its own `runc delete --force` (isulad-shim's order: the container is gone from "
                   "runc when the engine sees the status); conmon reports at the reap and leaves the "
                   "delete to the engine.")
    deletes = [x - y for x, y in zip(b.get("exit+delete ms", []), b.get("exit ms", []))]
    delete = med(deletes)
    if delete is not None:
        floor = (f", of which runc's own start-up (`runc --version`, in the split rounds) {fmt(runc)} ms"
                 if runc else "")
        out.append(f"- The engine's `runc delete --force` after conmon's report (spawned as the shims spawn "
                   f"runc): {fmt(delete)} ms{floor}. shimd's report waits for the same delete, so its ratio is "
                   f"near (conmon's {fmt(exitB)} ms + the delete's {fmt(delete)} ms) / {fmt(exitB)} ms = "
                   f"{fmt((exitB + delete) / exitB)}.")
    both = pairRatios(a.get("exit+delete ms"), b.get("exit+delete ms"))
    if both:
        out.append(f"- With the engine's `runc delete --force` counted for conmon (\"runc kill -> status and "
                   f"container deleted\"), the same end state for both: ratio {fmt(med(both))}.")
    out.append("")
    return out


def plot(results: Results, path: str, info: dict[str, str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: list[tuple[str, str, str, list[str]]] = [
        ("Workload 1: start -> exit report (s)", "throughput", "seconds",
         ["shimd", "conmon", "shimd+1 attach", "shimd+16 attach", "container alone"]),
        ("Log throughput (MB/s)", "throughput", "MB/s", ["shimd", "conmon"]),
        ("Start latency (ms)", "lifecycle", "start ms", ["shimd", "conmon"]),
        ("Exit report latency (ms)", "lifecycle", "exit ms", ["shimd", "conmon"]),
        ("runc kill -> status and container deleted (ms)", "lifecycle", "exit+delete ms", ["shimd", "conmon"]),
        ("Idle RSS (MB)", "idle", "RSS MB", ["shimd", "conmon"]),
        ("Idle PSS (MB)", "idle", "PSS MB", ["shimd", "conmon"]),
        ("Peak RSS in workload 1 (MB)", "throughput", "peak RSS MB", ["shimd", "conmon"]),
        ("Idle CPU over the window (s)", "idle", "idle CPU s", ["shimd", "conmon"]),
    ]
    colors = {"shimd": "#1f77b4", "conmon": "#ff7f0e", "shimd+1 attach": "#6baed6",
              "shimd+16 attach": "#08519c", "container alone": "#7f7f7f"}
    fig, axes = plt.subplots(3, 3, figsize=(16, 12))
    for ax, (title, workload, figure, variants) in zip(axes.flat, panels):
        names, medians, points = [], [], []
        for v in variants:
            values = results.get(workload, {}).get(v, {}).get(figure)
            if not values:
                continue
            names.append(v.replace(" attach", "\nattach"))
            medians.append(statistics.median(values))
            points.append(values)
        ax.set_title(title, fontsize=10)
        if not names:
            ax.text(0.5, 0.5, "n/a", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            continue
        xs = range(len(names))
        ax.bar(xs, medians, color=[colors.get(v, "grey") for v in variants if
                                   results.get(workload, {}).get(v, {}).get(figure)])
        for x, values in zip(xs, points):
            ax.scatter([x] * len(values), values, color="black", s=8, zorder=3)
        for x, m in zip(xs, medians):
            ax.annotate(f"{m:.3g}", (x, m), ha="center", va="bottom", fontsize=8,
                        xytext=(0, 2), textcoords="offset points")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(names, fontsize=8)
    fig.suptitle(f"shimd vs conmon - {info.get('date', '')} - {info.get('nproc')} CPU "
                 f"{info.get('cpu', '')}, kernel {info.get('kernel', '')} (bars: median; dots: runs)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
