"""
Tests for L{shimd.bundle}.
"""

import json
import os
import shutil
import subprocess
import tempfile
import unittest

from twisted.trial.unittest import SynchronousTestCase

from shimd import bundle


def _runtime() -> str | None:
    return shutil.which("runc") or next(
        (p for p in ("/usr/sbin/runc", "/usr/local/sbin/runc") if os.access(p, os.X_OK)),
        None,
    )


def _skipUnlessAvailable() -> str:
    """
    Raise L{unittest.SkipTest} unless we are root and runc and a static
    busybox are installed; return runc's path.
    """
    if os.geteuid() != 0:
        raise unittest.SkipTest("needs root")
    runc = _runtime()
    if runc is None:
        raise unittest.SkipTest("runc not installed (make deps)")
    try:
        bundle.findBusybox()
    except bundle.BundleError as e:
        raise unittest.SkipTest(str(e))
    return runc


class DemoBundleTests(SynchronousTestCase):
    """
    L{bundle.ensureDemoBundle} and L{bundle.writeBundleConfig}.
    """

    def setUp(self) -> None:
        self.runc = _skipUnlessAvailable()
        # Not trial's mktemp: under pytest it writes into the current directory.
        self.tmp = tempfile.mkdtemp(prefix="shimd-test-bundle.")
        self.addCleanup(shutil.rmtree, self.tmp, ignore_errors=True)
        self.demo = os.path.join(self.tmp, "demo", "bundle")

    def newPath(self, name: str) -> str:
        return os.path.join(self.tmp, name)

    def readConfig(self, path: str) -> dict:
        with open(os.path.join(path, "config.json")) as f:
            return json.load(f)

    def test_builds(self) -> None:
        """
        The demo bundle has a busybox rootfs and a config that prints
        something without a terminal.
        """
        path = bundle.ensureDemoBundle(self.demo)
        self.assertEqual(path, self.demo)
        config = self.readConfig(path)
        self.assertEqual(config["process"]["args"], bundle.DEMO_ARGS)
        self.assertIs(config["process"]["terminal"], False)
        self.assertEqual(config["process"]["cwd"], "/")
        self.assertEqual(config["root"]["path"], "rootfs")
        tmpMounts = [m for m in config["mounts"] if m["destination"] == "/tmp"]
        self.assertEqual([m["type"] for m in tmpMounts], ["tmpfs"])
        rootfs = os.path.join(path, "rootfs")
        self.assertTrue(os.access(os.path.join(rootfs, "bin", "sh"), os.X_OK))
        self.assertTrue(bundle.isStaticELF(os.path.join(rootfs, "bin", "busybox")))
        self.assertEqual(os.stat(os.path.join(rootfs, "tmp")).st_mode & 0o7777, 0o1777)
        # Nothing is left behind next to it.
        self.assertEqual(os.listdir(os.path.dirname(path)), [os.path.basename(path)])

    def test_secondCallIsNoop(self) -> None:
        """
        A complete bundle is not rebuilt.
        """
        bundle.ensureDemoBundle(self.demo)
        config = os.path.join(self.demo, "config.json")
        before = (os.stat(self.demo).st_mtime_ns, os.stat(config).st_mtime_ns)
        self.assertEqual(bundle.ensureDemoBundle(self.demo), self.demo)
        after = (os.stat(self.demo).st_mtime_ns, os.stat(config).st_mtime_ns)
        self.assertEqual(before, after)

    def test_refusesForeignDirectory(self) -> None:
        """
        An existing directory that is not a demo bundle is left alone.
        """
        os.makedirs(self.demo)
        open(os.path.join(self.demo, "precious"), "w").close()
        self.assertRaises(bundle.BundleError, bundle.ensureDemoBundle, self.demo)
        self.assertEqual(os.listdir(self.demo), ["precious"])

    def test_writeBundleConfig(self) -> None:
        """
        writeBundleConfig writes a config with the given process settings
        that uses the demo rootfs by absolute path.
        """
        target = self.newPath("b1")
        path = bundle.writeBundleConfig(
            target, ["cat"], terminal=True, consoleSize=(40, 132), demoBundle=self.demo
        )
        self.assertEqual(path, target)
        config = self.readConfig(path)
        self.assertEqual(config["process"]["args"], ["cat"])
        self.assertIs(config["process"]["terminal"], True)
        self.assertEqual(config["process"]["consoleSize"], {"height": 40, "width": 132})
        self.assertEqual(config["root"]["path"], os.path.join(self.demo, "rootfs"))
        self.assertEqual(os.listdir(path), ["config.json"])

        path2 = bundle.writeBundleConfig(self.newPath("b2"), ["true"], demoBundle=self.demo)
        config2 = self.readConfig(path2)
        self.assertEqual(config2["process"]["args"], ["true"])
        self.assertIs(config2["process"]["terminal"], False)
        self.assertNotIn("consoleSize", config2["process"])

    def test_runcRun(self) -> None:
        """
        runc runs a container from a writeBundleConfig bundle: separate
        stdout and stderr, and its exit status.
        """
        path = bundle.writeBundleConfig(
            self.newPath("b3"),
            ["sh", "-c", "echo out; echo err >&2; exit 3"],
            demoBundle=self.demo,
        )
        state = self.newPath("runc-state")
        cid = f"shimd-test-bundle-{os.getpid()}"
        self.addCleanup(
            subprocess.run,
            [self.runc, "--root", state, "delete", "--force", cid],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        result = subprocess.run(
            [self.runc, "--root", state, "run", "--bundle", path, cid],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            timeout=60,
        )
        self.assertEqual(
            (result.stdout, result.stderr, result.returncode), (b"out\n", b"err\n", 3)
        )
