"""
`bench/run.py --profile [DIR] [--profile-sessions N]`: one workload-1 run
on shimd (with N attach sessions) with the shim under cProfile
(`python -m cProfile -o DIR/shimd-<time>.prof isulad-shim ...`; cProfile
writes the file when the shim calls sys.exit), then the top of the profile
by own time and by cumulative time.  No change to shimd is needed:
the engine takes the shim's argv.
"""

from __future__ import annotations

import os
import pstats
import sys
import time

from shims import ShimdRunner
from shimd.engine import shimCommand


def profileThroughput(stateRoot: str, bundle: str, lines: int, outdir: str, sessions: int = 0) -> int:
    from run import throughput

    os.makedirs(outdir, exist_ok=True)
    path = os.path.join(outdir, f"shimd-{time.strftime('%Y%m%d-%H%M%S')}.prof")
    shim = shimCommand()
    argv = [sys.executable, "-m", "cProfile", "-o", path, *shim[-1:]]
    runner = ShimdRunner(stateRoot, bundle, shimArgv=argv)
    figures = throughput(runner, lines, sessions)
    print(f"workload 1 with {sessions} attach sessions under cProfile: {figures['seconds']:.2f} s, "
          f"{figures['records']:.0f} records")
    print(f"profile: {path}")
    stats = pstats.Stats(path)
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(25)
    return 0
