"""
End to end: execs in a running runc container through the real isulad-shim,
laid out and spawned as iSulad does (exec workdir, process.json with
``exec: true``, FIFOs, the timeout as argv 5).
"""

from __future__ import annotations

import os
import struct
import subprocess
import time

from twisted.trial.unittest import TestCase

from shimd.engine import Container
from tests.e2e import BIN, EngineMixin, RunningContainerMixin, parallel, ptyFds, repeat


class ExecTests(RunningContainerMixin, TestCase):
    def setUp(self) -> None:
        self.setUpRunning()

    def execIn(
        self, args: list[str], stdinData: bytes | None = None, execTimeout: int | None = None, **kw: object
    ) -> tuple[bytes, bytes, int | None, int, Container]:
        e = self.engine.prepareExec(self.c, args, stdin=stdinData is not None, **kw)  # type: ignore[arg-type]
        try:
            out, err, status, code = self.engine.runExec(e, execTimeout, stdinData=stdinData)
            return out, err, status, code, e
        finally:
            self.engine.close(e)

    def test_exitCodes(self) -> None:
        """C5 for execs: 0, 1, 42, 137, 143."""
        cases = [(["true"], 0), (["false"], 1), (["sh", "-c", "exit 42"], 42),
                 (["sh", "-c", "kill -9 $$"], 137), (["sh", "-c", "kill -15 $$"], 143)]
        for args, expected in cases:
            _, _, status, code, e = self.execIn(args)
            self.assertEqual((status, code), (expected, 0), args)
            self.assertFalse(os.path.exists(e.workdir))

    def test_output(self) -> None:
        out, err, status, code, _ = self.execIn(["sh", "-c", "echo out; echo err >&2; exit 3"])
        self.assertEqual((out, err, status, code), (b"out\n", b"err\n", 3, 0))

    def test_missingBinary(self) -> None:
        """A missing binary: shim exit 1, runc's message in the shim log, no fake status."""
        e = self.engine.prepareExec(self.c, ["/no/such/binary"])
        try:
            self.engine.spawnShim(e)
            out, err, _ = self.engine.collect(e, timeout=30)
            code = self.engine.reapShim(e)
            self.assertEqual((code, e.shimStatus), (1, b""))
            self.assertIn("/no/such/binary", self.engine.shimErrors(e))
        finally:
            self.engine.close(e)

    def test_stdinEOF(self) -> None:
        """C6 for an exec of cat."""

        def one(i: int) -> None:
            out, _, status, code, _ = self.execIn(["cat"], stdinData=b"hello\n")
            self.assertEqual((out, status, code), (b"hello\n", 0, 0))

        parallel(one, repeat(20))
        out, _, status, _, _ = self.execIn(["cat"], stdinData=b"")
        self.assertEqual((out, status), (b"", 0))

    def test_timeout(self) -> None:
        """The exec timeout: SIGKILL, exit 2, nothing on stdout."""
        started = time.monotonic()
        _, _, status, code, e = self.execIn(["sleep", "300"], execTimeout=1)
        self.assertEqual((status, code), (None, 2))
        self.assertLess(time.monotonic() - started, 10)
        ps = self.engine.runtimeCall(self.c, "ps", self.c.id)
        self.assertNotIn(b"sleep 300", ps.stdout)

    def test_backgroundChildHoldsStdout(self) -> None:
        """A background child keeping stdout open does not hold the report past the drain."""
        started = time.monotonic()
        out, _, status, code, _ = self.execIn(["sh", "-c", "sleep 300 & echo started"])
        self.assertEqual((out, status, code), (b"started\n", 0, 0))
        self.assertLess(time.monotonic() - started, 8)

    def test_backgroundChildWithTimeout(self) -> None:
        started = time.monotonic()
        out, _, status, code, _ = self.execIn(["sh", "-c", "sleep 300 & echo started; sleep 300"], execTimeout=1)
        self.assertEqual((out, status, code), (b"started\n", None, 2))
        self.assertLess(time.monotonic() - started, 8)

    def test_detachedExec(self) -> None:
        """A background exec (no FIFOs): started, then reaped, status in ./exit."""
        e = self.engine.prepareExec(self.c, ["sh", "-c", "sleep 1; exit 6"], stdout=False, stderr=False)
        try:
            self.engine.spawnShim(e, detach=True)
            pid = self.engine.waitPid(e)
            self.assertGreater(pid, 0)
            assert e.shim is not None
            self.assertEqual(e.shim.wait(timeout=30), 0)
            with open(e.path("exit")) as f:
                self.assertEqual(f.read(), "6")
        finally:
            self.engine.close(e)

    def test_concurrent(self) -> None:
        """20 execs of date and 20 of a missing binary at once."""

        def one(i: int) -> tuple[int | None, int, bytes]:
            args = ["date"] if i % 2 == 0 else ["/no/such/binary"]
            out, _, status, code, _ = self.execIn(args)
            return status, code, out

        results = parallel(one, 40, workers=8)
        for i, (status, code, out) in enumerate(results):
            if i % 2 == 0:
                self.assertEqual((status, code), (0, 0))
                self.assertTrue(out.strip())
            else:
                self.assertEqual((status, code), (None, 1))
        self.assertEqual(os.listdir(self.c.path("exec")), [])
        ps = self.engine.runtimeCall(self.c, "ps", self.c.id)
        self.assertEqual(len(ps.stdout.splitlines()), 2, ps.stdout)  # header + sleep

    def test_bigOutputPausedReader(self) -> None:
        """~500 MB through a foreground exec, the reader stopped for 5 s midway: byte-exact."""
        # seq is deterministic: hash it inside the container, then stream it.
        # 57,000,000 numbers are about 500 MB.
        count = int(57_000_000 * float(os.environ.get("SHIMD_BIG_MB", "500")) / 500)
        out, _, status, _, _ = self.execIn(["sh", "-c", f"seq 1 {count} | sha256sum"])
        self.assertEqual(status, 0)
        expected = out.split()[0].decode()
        size = 9 * count  # roughly; only used to pause midway
        e = self.engine.prepareExec(self.c, ["seq", "1", str(count)], stderr=False)
        try:
            reader = subprocess.Popen(["sha256sum"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            self.engine.spawnShim(e)
            self.engine.waitPid(e)  # before that, a FIFO with no writer reads as EOF
            fd = e.fds["stdout"]
            os.set_blocking(fd, True)
            got = 0
            stopped = False
            assert reader.stdin is not None
            while True:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    break
                reader.stdin.write(chunk)
                got += len(chunk)
                if not stopped and got > size // 2:
                    stopped = True
                    time.sleep(5)  # this reader is paused; the shim must hold on
            reader.stdin.close()
            digest = reader.stdout.read().split()[0].decode()  # type: ignore[union-attr]
            reader.wait()
            code = self.engine.reapShim(e)
            self.assertEqual(code, 0)
            self.assertGreater(got, count * 2)  # each number and its newline; the digest checks the rest
            self.assertEqual(digest, expected)
            self.assertTrue(stopped)
        finally:
            self.engine.close(e)


class ExecCommandTests(EngineMixin, TestCase):
    def setUp(self) -> None:
        self.setUpEngine()

    def test_shimdExec(self) -> None:
        c = self.engine.prepare(self.bundle, ["sleep", "1000"], stdout=False, stderr=False)
        try:
            self.engine.create(c, detach=True)
            self.engine.start(c)
            p = subprocess.run([os.path.join(BIN, "shimd"), "exec", c.workdir, "--", "sh", "-c", "echo hi; echo e >&2; exit 4"],
                               capture_output=True, timeout=60, cwd="/")
            self.assertEqual((p.stdout, p.stderr, p.returncode), (b"hi\n", b"e\n", 4))
            p = subprocess.run([os.path.join(BIN, "shimd"), "exec", "-i", c.workdir, "--", "cat"],
                               input=b"piped\n", capture_output=True, timeout=60, cwd="/")
            self.assertEqual((p.stdout, p.returncode), (b"piped\n", 0))
            # Input streams: the first line is answered before the second is written.
            p = subprocess.Popen([os.path.join(BIN, "shimd"), "exec", c.workdir, "-i", "--", "cat"],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd="/")
            assert p.stdin is not None and p.stdout is not None
            p.stdin.write(b"first\n")
            p.stdin.flush()
            self.assertEqual(p.stdout.readline(), b"first\n")
            p.stdin.write(b"second\n")
            p.stdin.close()
            self.assertEqual(p.stdout.read(), b"second\n")
            self.assertEqual(p.wait(timeout=30), 0)
            p = subprocess.run([os.path.join(BIN, "shimd"), "exec", c.workdir, "-t", "--", "tty"],
                               capture_output=True, timeout=60, cwd="/")
            self.assertRegex(p.stdout.decode(), r"^/dev/pts/\d+\r\n$")
        finally:
            self.engine.runtimeCall(c, "kill", c.id, "KILL")
            self.engine.collect(c, timeout=30)
            self.engine.close(c)


class TerminalExecTests(RunningContainerMixin, TestCase):
    """Issue 5 point 4: terminal execs use the console socket and resize_fifo; C8 for execs."""

    def setUp(self) -> None:
        self.setUpRunning()

    def ttyExec(self, args: list[str], check: bool = False) -> tuple[bytes, int | None, int]:
        e = self.engine.prepareExec(self.c, args, terminal=True, stderr=False)
        try:
            self.engine.spawnShim(e)
            self.engine.waitPid(e)
            out, _, _ = self.engine.collect(e, timeout=60)
            if check:
                # The process is gone and its output ended: the shim must hold no pty.
                assert e.shim is not None
                self.assertEqual(ptyFds(e.shim.pid), [])
            code = self.engine.reapShim(e)
            status = struct.unpack("=i", e.shimStatus)[0] if len(e.shimStatus) == 4 else None
            return out, status, code
        finally:
            self.engine.close(e)

    def test_foop(self) -> None:
        out, status, code = self.ttyExec(["echo", "foop"], check=True)
        self.assertEqual((out, status, code), (b"foop\r\n", 0, 0))

    def test_isATerminal(self) -> None:
        out, status, _ = self.ttyExec(["readlink", "/proc/self/fd/0"])
        self.assertRegex(out.decode(), r"^/dev/pts/\d+\r\n$")
        self.assertEqual(status, 0)

    def test_largeOutput(self) -> None:
        def one(i: int) -> None:
            out, status, code = self.ttyExec(["sh", "-c", 'seq -s " " 1000000'])
            self.assertEqual((status, code), (0, 0))
            self.assertTrue(out.rstrip().endswith(b"999999 1000000"), out[-50:])

        parallel(one, repeat(20))
