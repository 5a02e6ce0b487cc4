"""
The runc command lines are isulad-shim's (spec section 4.2), byte for byte;
the root path follows the runtime *name* (B14); errors carry runc's text.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Generator

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from shimd.config import parseProcessState
from shimd.runtime import Runc, RuntimeFailure, runtimeEnvironment
from shimd.service import ShimConfig, runtimeRoot

WD = "/run/isulad/runc/abc"


def runc(root: str | None = WD + "/runc", args: tuple[str, ...] = ()) -> Runc:
    return Runc("runc", WD, root, args, reactor=MemoryReactor())


class CommandLineTests(SynchronousTestCase):
    def test_create(self) -> None:
        self.assertEqual(
            runc().createArgs("abc", "/b", WD + "/pid"),
            ["runc", "--log", WD + "/log.json", "--log-format", "json", "--root", WD + "/runc",
             "create", "--bundle", "/b", "--pid-file", WD + "/pid", "abc"],
        )

    def test_createWithEverything(self) -> None:
        argv = runc(args=("--debug",)).createArgs(
            "abc", "/b", WD + "/pid", consoleSocket="/run/x.sock", systemdCgroup=True, noPivot=True
        )
        self.assertEqual(
            argv,
            ["runc", "--debug", "--log", WD + "/log.json", "--log-format", "json", "--root", WD + "/runc",
             "--systemd-cgroup", "create", "--bundle", "/b", "--no-pivot", "--pid-file", WD + "/pid",
             "--console-socket", "/run/x.sock", "abc"],
        )

    def test_exec(self) -> None:
        self.assertEqual(
            runc().execArgs("abc", WD + "/exec/e1/process.json", WD + "/exec/e1/pid", cwd="/tmp"),
            ["runc", "--log", WD + "/log.json", "--log-format", "json", "--root", WD + "/runc",
             "exec", "-d", "--process", WD + "/exec/e1/process.json", "--cwd", "/tmp",
             "--pid-file", WD + "/exec/e1/pid", "abc"],
        )

    def test_killHasNoLog(self) -> None:
        r = runc()
        self.assertEqual(r.baseArgs(withLog=False) + ["kill", "--all", "abc", "SIGKILL"],
                         ["runc", "--root", WD + "/runc", "kill", "--all", "abc", "SIGKILL"])

    def test_kataHasNoRoot(self) -> None:
        state = parseProcessState('{"args":["sh"],"cwd":"/"}')
        self.assertIsNone(runtimeRoot(ShimConfig(WD, "abc", "/b", "/usr/bin/kata-runtime"), state))

    def test_rootUsesRuntimeName(self) -> None:
        """B14: an absolute runtime command still gives <wd>/<name>."""
        state = parseProcessState('{"args":["sh"],"cwd":"/"}')
        self.assertEqual(runtimeRoot(ShimConfig(WD, "abc", "/b", "/usr/sbin/runc"), state), WD + "/runc")
        named = parseProcessState('{"args":["sh"],"cwd":"/","runtime":"crun"}')
        self.assertEqual(runtimeRoot(ShimConfig(WD, "abc", "/b", "/opt/x/crun-1.0"), named), WD + "/crun")

    def test_execRootIsTheContainers(self) -> None:
        state = parseProcessState('{"args":["sh"],"cwd":"/","exec":true}')
        self.assertEqual(runtimeRoot(ShimConfig(WD + "/exec/e1", "abc", "/b", "runc"), state), WD + "/runc")

    def test_environment(self) -> None:
        env = runtimeEnvironment({"PATH": "/bin", "NOTIFY_SOCKET": "/x", "A": "b"})
        self.assertNotIn("NOTIFY_SOCKET", env)
        self.assertIn("/usr/sbin", env["PATH"].split(":"))
        self.assertEqual(env["A"], "b")


class ErrorTextTests(SynchronousTestCase):
    def test_errorsFromTheLogAfterOffset(self) -> None:
        wd = tempfile.mkdtemp()
        self.addCleanup(lambda: [os.remove(os.path.join(wd, f)) for f in os.listdir(wd)] and os.rmdir(wd))
        r = Runc("runc", wd, None, reactor=MemoryReactor())
        with open(r.logPath, "w") as f:
            f.write(json.dumps({"level": "error", "msg": "old"}) + "\n")
        offset = os.path.getsize(r.logPath)
        with open(r.logPath, "a") as f:
            f.write(json.dumps({"level": "info", "msg": "noise"}) + "\n")
            f.write("not json\n")
            f.write(json.dumps({"level": "error", "msg": 'exec: "x": not found'}) + "\n")
        self.assertEqual(r.errorText(offset), 'exec: "x": not found')
        failure = RuntimeFailure(["runc", "create", "abc"], 1, r.errorText(offset))
        self.assertEqual(str(failure), 'runc create failed: exec: "x": not found')


class RunTests(TestCase):
    """Runc.run on the real reactor: a spawned command, reaped through its pidfd."""

    def runc(self, script: str) -> Runc:
        wd = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, wd)
        path = os.path.join(wd, "fake-runc")
        with open(path, "w") as f:
            f.write("#!/bin/sh\n" + script + "\n")
        os.chmod(path, 0o755)
        return Runc(path, wd, None, reactor=reactor)

    @inlineCallbacks
    def test_success(self) -> Generator[Deferred[None], None, None]:
        r = self.runc('echo "$@" > "$(dirname "$0")/argv"')
        yield r.delete("abc")
        with open(os.path.join(r.workdir, "argv")) as f:
            self.assertEqual(f.read().split()[-3:], ["delete", "--force", "abc"])

    @inlineCallbacks
    def test_failureCarriesItsOutput(self) -> Generator[Deferred[None], None, None]:
        """Without a JSON log, the runtime's stdout and stderr are the message."""
        r = self.runc("echo container is gone >&2; exit 3")
        try:
            yield r.kill("abc", all=True)
        except RuntimeFailure as e:
            self.assertEqual((e.status, str(e)), (3, "fake-runc kill failed: container is gone"))
        else:
            self.fail("no failure")

    @inlineCallbacks
    def test_missingCommand(self) -> Generator[Deferred[None], None, None]:
        r = Runc("/nonexistent/runc", tempfile.gettempdir(), None, reactor=reactor)
        try:
            yield r.start("abc")
        except RuntimeFailure as e:
            self.assertIsNone(e.status)
            self.assertIn("/nonexistent/runc", str(e))
        else:
            self.fail("no failure")
