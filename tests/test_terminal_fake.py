"""
The shim in terminal mode against fake runtimes (no runc, no root needed):
one that sends a pty master over the console socket as runc does, and the
ways a runtime can fail to: exit without connecting, connect without an fd,
hang (the start-up guard).  Each fails with a clear message and exit 1,
and the console socket is removed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

from twisted.trial.unittest import TestCase

from shimd.engine import Engine

FAKE_RUNC = """\
#!{python}
# A fake runc: records its argv, then acts as FAKE_MODE says for create.
import os, pty, socket, sys, time
args = sys.argv[1:]
with open(os.path.join({record!r}, "argv-" + str(os.getpid())), "w") as f:
    f.write("\\0".join(args))
if "create" not in args:
    sys.exit(0)  # start, kill, delete
mode = {mode!r}
sock = args[args.index("--console-socket") + 1]
pidFile = args[args.index("--pid-file") + 1]
if mode == "hang":
    time.sleep(300)
if mode == "silent":
    sys.exit(0)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sock)
if mode == "nofd":
    s.close()
    sys.exit(0)
master, slave = pty.openpty()
pid = os.fork()
if pid == 0:
    os.setsid()
    for fd in (0, 1, 2):
        os.dup2(slave, fd)
    os.execvp("sh", ["sh", "-c", "sleep 0.3; printf foop; exit 3"])
socket.send_fds(s, [b"/dev/ptmx"], [master])
s.close()
with open(pidFile + ".tmp", "w") as f:
    f.write(str(pid))
os.rename(pidFile + ".tmp", pidFile)
"""


class FakeRuntimeTests(TestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="shimd-fake-", dir="/tmp")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.bundle = os.path.join(self.dir, "bundle")
        os.mkdir(self.bundle)
        with open(os.path.join(self.bundle, "config.json"), "w") as f:
            json.dump({"process": {"terminal": True, "args": ["sh"], "cwd": "/"}, "root": {"path": "/"}}, f)

    def fakeRunc(self, mode: str) -> str:
        os.makedirs(os.path.join(self.dir, "bin"), exist_ok=True)
        path = os.path.join(self.dir, "bin", f"fake-runc-{mode}")
        with open(path, "w") as f:
            f.write(FAKE_RUNC.format(python=sys.executable, record=self.dir, mode=mode))
        os.chmod(path, 0o755)
        return path

    def consoleSockets(self) -> list[str]:
        found = []
        for name in os.listdir(self.dir):
            if name.startswith("argv-"):
                with open(os.path.join(self.dir, name)) as f:
                    args = f.read().split("\0")
                if "--console-socket" in args:
                    found.append(args[args.index("--console-socket") + 1])
        return found

    def shimErrors(self, workdir: str) -> str:
        with open(os.path.join(workdir, "shim-log.json")) as f:
            return " ".join(json.loads(line)["msg"] for line in f if '"error"' in line)

    def failingShim(self, mode: str, expected: str, within: float) -> None:
        engine = Engine(stateRoot=self.dir, runtime=self.fakeRunc(mode))
        c = engine.prepare(self.bundle)
        try:
            started = time.monotonic()
            engine.spawnShim(c)
            code = engine.reapShim(c)
            self.assertLess(time.monotonic() - started, within)
            self.assertEqual((code, c.shimStatus), (1, b""))
            self.assertIn(expected, self.shimErrors(c.workdir))
        finally:
            engine.close(c, remove=False)
        [sock] = self.consoleSockets()
        self.assertFalse(os.path.exists(os.path.dirname(sock)), "the console socket must be removed")

    def test_worksWithoutRunc(self) -> None:
        """A runtime that sends the master as runc does: output, status, cleanup."""
        engine = Engine(stateRoot=self.dir, runtime=self.fakeRunc("ok"))
        c = engine.prepare(self.bundle)
        try:
            engine.create(c)
            engine.start(c)
            out, err, status = engine.collect(c, timeout=20)
            self.assertEqual((out, err, status), (b"foop", b"", 3))
            self.assertEqual(engine.reapShim(c), 0)
        finally:
            engine.close(c, remove=False)
        [sock] = self.consoleSockets()
        self.assertLess(len(sock), 108)
        self.assertFalse(os.path.exists(os.path.dirname(sock)))

    def test_exitsWithoutConnecting(self) -> None:
        self.failingShim("silent", "without sending a terminal over the console socket", 10)

    def test_connectsWithoutFd(self) -> None:
        self.failingShim("nofd", "closed the console socket without sending a terminal", 10)

    def test_hangs(self) -> None:
        """The start-up guard ends a runtime that never connects (nor exits)."""
        workdir = os.path.join(self.dir, "wd")
        os.mkdir(workdir)
        with open(os.path.join(workdir, "process.json"), "w") as f:
            json.dump({"args": ["sh"], "cwd": "/", "terminal": True}, f)
        code = textwrap.dedent(f"""
            import sys
            from twisted.internet import reactor
            from shimd.cli import runShim
            from shimd.service import ShimConfig
            from shimd.shimlog import startShimLogging
            startShimLogging({workdir!r}, "info")
            config = ShimConfig(workdir={workdir!r}, containerId="c1", bundle={self.bundle!r},
                                runtimeCommand={self.fakeRunc("hang")!r}, startTimeout=1.0)
            sys.exit(runShim(reactor, config))
        """)
        started = time.monotonic()
        p = subprocess.run([sys.executable, "-c", code], cwd=workdir, capture_output=True, timeout=60)
        self.assertLess(time.monotonic() - started, 15)
        self.assertEqual(p.returncode, 1, p.stderr)
        self.assertIn("runtime timeout", self.shimErrors(workdir))
        self.assertIn("no terminal on the console socket", self.shimErrors(workdir))
        [sock] = self.consoleSockets()
        self.assertFalse(os.path.exists(os.path.dirname(sock)))
