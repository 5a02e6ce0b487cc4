"""The twistd plugin: discoverable, valid IServiceMaker, options checked."""

from __future__ import annotations

import os
import tempfile

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin, getPlugins
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from shimd.tap import Options, configFromOptions


class PluginTests(SynchronousTestCase):
    def test_discovered(self) -> None:
        makers = [m for m in getPlugins(IServiceMaker) if getattr(m, "tapname", None) == "shimd"]
        self.assertEqual(len(makers), 1)
        verifyObject(IServiceMaker, makers[0])
        verifyObject(IPlugin, makers[0])
        self.assertIs(makers[0].options, Options)

    def test_requiredOptions(self) -> None:
        with self.assertRaises(usage.UsageError) as e:
            Options().parseOptions(["--id", "x", "--bundle", "/b"])
        self.assertIn("--workdir", str(e.exception))

    def test_config(self) -> None:
        wd = tempfile.mkdtemp()
        self.addCleanup(os.rmdir, wd)
        with open(os.path.join(wd, "process.json"), "w") as f:
            f.write('{"args":["true"],"cwd":"/"}')
        self.addCleanup(os.remove, os.path.join(wd, "process.json"))
        o = Options()
        o.parseOptions(["--workdir", wd, "--id", "c1", "--bundle", "/b", "--start", "--exec-timeout", "5",
                        "--stall-timeout", "1.5"])
        config = configFromOptions(o)
        self.assertEqual((config.workdir, config.containerId, config.bundle, config.start, config.execTimeout,
                          config.stallTimeout), (wd, "c1", "/b", True, 5, 1.5))


class StartGuardTests(SynchronousTestCase):
    def test_runtimeThatHangs(self) -> None:
        """The start-up guard: a runtime that never returns is killed and the shim fails."""
        import subprocess
        import sys
        import time

        wd = tempfile.mkdtemp(prefix="shimd-guard-", dir="/tmp")
        self.addCleanup(subprocess.run, ["rm", "-rf", wd])
        fake = os.path.join(wd, "fake-runc")
        with open(fake, "w") as f:
            f.write(f"#!/bin/sh\necho $$ > {wd}/fake.pid\nexec sleep 300\n")
        os.chmod(fake, 0o755)
        with open(os.path.join(wd, "process.json"), "w") as f:
            f.write('{"args":["true"],"cwd":"/"}')
        started = time.monotonic()
        p = subprocess.run(
            [os.path.join(os.path.dirname(sys.executable), "twistd"), "-n", "--pidfile=", "shimd",
             "--workdir", wd, "--id", "g1", "--bundle", wd, "--runtime", fake, "--start-timeout", "1"],
            capture_output=True, timeout=60, cwd="/",
        )
        self.assertLess(time.monotonic() - started, 20)
        with open(os.path.join(wd, "shim-log.json")) as f:
            self.assertIn("runtime timeout", f.read())
        with open(os.path.join(wd, "fake.pid")) as f:
            pid = int(f.read())
        time.sleep(0.2)
        self.assertFalse(os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().split()[2] != "Z",
                         "the hung runtime was not killed")
        self.assertFalse(os.path.exists(os.path.join(wd, "exit")))


class DetachKeysOptionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.wd = tempfile.mkdtemp()
        with open(os.path.join(self.wd, "process.json"), "w") as f:
            f.write('{"args":["true"],"cwd":"/"}')
        self.addCleanup(os.rmdir, self.wd)
        self.addCleanup(os.remove, os.path.join(self.wd, "process.json"))

    def options(self, *extra: str) -> Options:
        o = Options()
        o.parseOptions(["--workdir", self.wd, "--id", "c1", "--bundle", "/b", *extra])
        return o

    def test_default(self) -> None:
        self.assertEqual(configFromOptions(self.options()).detachKeys, "ctrl-q")

    def test_given(self) -> None:
        self.assertEqual(configFromOptions(self.options("--detach-keys", "ctrl-p,ctrl-q")).detachKeys, "ctrl-p,ctrl-q")
        self.assertEqual(configFromOptions(self.options("--detach-keys", "")).detachKeys, "")

    def test_invalid(self) -> None:
        with self.assertRaises(usage.UsageError) as e:
            self.options("--detach-keys", "ctrl-1")
        self.assertIn("invalid detach keys", str(e.exception))

    def test_badProcessJsonExits(self) -> None:
        """twistd shimd stops (it does not hang) when the shim fails before the reactor runs."""
        import subprocess
        import sys

        wd = tempfile.mkdtemp(prefix="shimd-bad-", dir="/tmp")
        self.addCleanup(subprocess.run, ["rm", "-rf", wd])
        with open(os.path.join(wd, "process.json"), "w") as f:
            f.write('{"cwd": "/"}')
        subprocess.run(
            [os.path.join(os.path.dirname(sys.executable), "twistd"), "-n", "--pidfile=", "shimd",
             "--workdir", wd, "--id", "b1", "--bundle", wd],
            capture_output=True, timeout=60, cwd="/",
        )
        with open(os.path.join(wd, "shim-log.json")) as f:
            self.assertIn('field \\"args\\" is required', f.read())
