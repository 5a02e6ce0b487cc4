"""
Tests for L{shimd.earlycopy}: a real forked copier between real pipes, a
FIFO and a log file.
"""

from __future__ import annotations

import errno
import json
import os
import select
import socket
import subprocess
import sys
import time

from twisted.trial.unittest import SynchronousTestCase

from shimd.earlycopy import EarlyCopy, startEarlyCopy
from shimd.records import PARTIAL_MAX
from tests.e2e import isAlive


class EarlyCopyTests(SynchronousTestCase):
    """
    The container's stdout and stderr pipes, the engine's stdout FIFO (its
    read end is the test's) and a log file; the copier runs between them.
    """

    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.logPath = os.path.join(self.dir, "console.log")
        self.outR, self.outW = self.pipe()
        self.errR, self.errW = self.pipe()
        fifo = os.path.join(self.dir, "engine-stdout")
        os.mkfifo(fifo, 0o600)
        self.engine = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        self.addCleanup(self.closeQuietly, self.engine)
        self.engineOut = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        self.addCleanup(self.closeQuietly, self.engineOut)
        self.log = os.open(self.logPath, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.addCleanup(os.close, self.log)
        self.received = bytearray()

    def pipe(self) -> tuple[int, int]:
        r, w = os.pipe()
        self.addCleanup(self.closeQuietly, r)
        self.addCleanup(self.closeQuietly, w)
        return r, w

    def closeQuietly(self, fd: int) -> None:
        try:
            os.close(fd)
        except OSError:
            pass

    def start(self, maxSize: int = 0, attach: int | None = None, engineOut: bool = True) -> EarlyCopy:
        early = startEarlyCopy(self.outR, self.errR, self.engineOut if engineOut else None, None, self.log,
                               maxSize, attach)
        self.addCleanup(early.stop)
        return early

    def drainEngine(self) -> bytes:
        """Everything the engine's FIFO holds now."""
        while True:
            try:
                chunk = os.read(self.engine, 1 << 20)
            except BlockingIOError:
                break
            if not chunk:
                break
            self.received += chunk
        return bytes(self.received)

    def waitStopped(self, early: EarlyCopy, timeout: float = 10.0) -> None:
        """Wait until the copier has stopped by itself (its report is readable)."""
        self.assertTrue(select.select([early._result], [], [], timeout)[0], "the copier did not stop")

    def readEngine(self, until: int, timeout: float = 10.0) -> bytes:
        """Read the engine's FIFO until it has given C{until} bytes in all."""
        deadline = time.monotonic() + timeout
        while len(self.received) < until:
            self.assertLess(time.monotonic(), deadline, f"only {len(self.received)} of {until} bytes arrived")
            if select.select([self.engine], [], [], 0.1)[0]:
                self.received += os.read(self.engine, 1 << 20)
        return bytes(self.received)

    def waitForLog(self, size: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while os.path.getsize(self.logPath) < size:
            self.assertLess(time.monotonic(), deadline, "the log did not grow")
            time.sleep(0.01)

    def records(self) -> list[dict[str, str]]:
        with open(self.logPath, "rb") as f:
            return [json.loads(line) for line in f.read().splitlines()]

    def test_linesLoggedOutputSent(self) -> None:
        """
        Complete lines are logged, every byte reaches the engine's FIFO at
        once, and the line without its end is handed back, unlogged.
        """
        early = self.start()
        os.write(self.outW, b"one\ntwo\nprom")
        self.assertEqual(self.readEngine(12), b"one\ntwo\nprom")
        os.write(self.errW, b"oops\n")
        self.waitForLog(1)
        while len(self.records()) < 3:
            time.sleep(0.01)
        left = early.stop()
        self.assertEqual(early.why, "the shim took over")
        self.assertEqual(early.copied, 17)
        self.assertIsNone(early.error)
        self.assertEqual(left["stdout"].unlogged, b"prom")
        self.assertEqual(left["stdout"].unsent, b"")
        self.assertLessEqual(left["stdout"].since, time.time())
        self.assertEqual(left["stderr"].unlogged, b"")
        self.assertEqual([(r["log"], r["stream"]) for r in self.records()],
                         [("one\n", "stdout"), ("two\n", "stdout"), ("oops\n", "stderr")])

    def test_escapedAsTheLogDoes(self) -> None:
        """Records are built by the log's own code: escapes and invalid UTF-8 included."""
        early = self.start()
        data = b'say "hi"\\\t\xff\n'
        os.write(self.outW, data)
        self.assertEqual(self.readEngine(len(data)), data)
        self.waitForLog(1)
        early.stop()
        self.assertEqual([r["log"] for r in self.records()], ['say "hi"\\\t\ufffd\n'])

    def test_slowReaderGetsEveryByte(self) -> None:
        """
        A full FIFO is waited for, not given up on: the copier stops reading
        the container (whose pipe then fills up too), and what the FIFO has
        not taken is handed back, to follow what it took.
        """
        early = self.start()
        os.set_blocking(self.outW, False)
        data = b"".join(b"%07d\n" % i for i in range(200_000))  # 1.6 MB: more than both pipes hold
        written = 0
        blocked = 0
        while written < len(data) and blocked < 3:
            try:
                written += os.write(self.outW, data[written:written + 65536])
                blocked = 0
            except BlockingIOError:
                blocked += 1
                time.sleep(0.1)
        self.assertLess(written, len(data), "nothing waited for the FIFO's reader")
        left = early.stop()
        self.assertEqual(early.why, "the shim took over")
        unsent = left["stdout"].unsent
        self.assertTrue(unsent)
        inFifo = self.drainEngine()
        rest = b""
        while len(inFifo) + len(unsent) + len(rest) < written:
            rest += os.read(self.outR, written)
        self.assertEqual(inFifo + unsent + rest, data[:written])
        self.assertEqual(early.copied, len(inFifo) + len(unsent))

    def test_goneReader(self) -> None:
        """A FIFO without a reader stops the copier; the chunk goes back, for the service to drop the FIFO."""
        os.close(self.engine)
        early = self.start()
        os.write(self.outW, b"lost reader\n")
        self.waitStopped(early)
        left = early.stop()
        self.assertEqual(early.why, "the engine's stdout FIFO: Broken pipe")
        self.assertEqual(left["stdout"].unsent, b"lost reader\n")
        self.assertEqual([r["log"] for r in self.records()], ["lost reader\n"])

    def test_logCannotBeWritten(self) -> None:
        """
        A failed log write stops the copier with the error for the service's
        log to report; the records are dropped (as the log drops them), the
        FIFO still gets the bytes.
        """
        self.log = os.open(self.logPath, os.O_RDONLY)  # every write fails: EBADF
        self.addCleanup(os.close, self.log)
        early = self.start()
        os.write(self.outW, b"nowhere\n")
        self.waitStopped(early)
        left = early.stop()
        self.assertEqual(early.why, "the log cannot be written")
        self.assertEqual(early.error, (errno.EBADF, os.strerror(errno.EBADF)))
        self.assertEqual(left["stdout"].unlogged + left["stdout"].unsent, b"")
        self.assertEqual(self.drainEngine(), b"nowhere\n")
        self.assertEqual(os.path.getsize(self.logPath), 0)

    def test_attachClientWaiting(self) -> None:
        """
        An attach client in the backlog stops the copier before it reads
        anything more: the session gets the output from its reply on.
        """
        path = os.path.join(self.dir, "attach.sock")
        listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(listening.close)
        listening.bind(path)
        listening.listen(16)
        early = self.start(attach=listening.fileno())
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(client.close)
        client.connect(path)
        self.waitStopped(early)
        os.write(self.outW, b"for the session\n")
        left = early.stop()
        self.assertEqual(early.why, "an attach client is waiting")
        self.assertEqual(early.copied, 0)
        self.assertEqual(left["stdout"].unlogged + left["stdout"].unsent, b"")
        self.assertEqual(os.read(self.outR, 100), b"for the session\n")

    def test_rotationIsTheService(self) -> None:
        """
        When the records would take the log past its size, the copier stops
        before writing them: the whole chunk goes back, unlogged and unsent.
        """
        os.write(self.log, b"x" * 4050 + b"\n")
        early = self.start(maxSize=4096)
        os.write(self.outW, b"a line\n")
        self.waitStopped(early)
        left = early.stop()
        self.assertEqual(early.why, "the log is due to rotate")
        self.assertEqual(left["stdout"].unlogged, b"a line\n")
        self.assertEqual(left["stdout"].unsent, b"a line\n")
        self.assertEqual(os.path.getsize(self.logPath), 4051)
        self.assertEqual(self.drainEngine(), b"")

    def test_endOfFile(self) -> None:
        """
        A pipe at end of file is left for the service to see again; the
        copier goes on with the other, and stops when both have ended.
        """
        early = self.start()
        os.write(self.outW, b"last words")
        os.close(self.outW)
        self.assertEqual(self.readEngine(10), b"last words")
        os.write(self.errW, b"an error\n")
        self.waitForLog(1)
        os.close(self.errW)
        self.waitStopped(early)
        left = early.stop()
        self.assertEqual(early.why, "end of file on every pipe")
        self.assertEqual(left["stdout"].unlogged, b"last words")
        self.assertEqual([r["log"] for r in self.records()], ["an error\n"])
        self.assertEqual(os.read(self.outR, 10), b"")
        self.assertEqual(os.read(self.errR, 10), b"")

    def test_longLineWithoutEnd(self) -> None:
        """A line without C{\\n} as long as the log writes in pieces goes back to the service."""
        early = self.start(engineOut=False)
        view = memoryview(b"z" * PARTIAL_MAX)
        while view:
            view = view[os.write(self.outW, view):]
        self.waitStopped(early)
        left = early.stop()
        self.assertEqual(early.why, "a long line without end on stdout")
        self.assertEqual(left["stdout"].unlogged, b"z" * PARTIAL_MAX)
        self.assertEqual(os.path.getsize(self.logPath), 0)

    def test_shimGone(self) -> None:
        """
        The copier ends with the shim, which never stopped it (the control
        pipe's end of file), though the container's pipe is still open.
        """
        script = (
            "import os, sys\n"
            "from shimd.earlycopy import startEarlyCopy\n"
            f"early = startEarlyCopy({self.outR}, None, None, None, None, 0, None)\n"
            "print(early.pid, flush=True)\n"
            "os._exit(0)\n"
        )
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, check=True, timeout=30,
                             pass_fds=(self.outR,)).stdout
        pid = int(out)
        deadline = time.monotonic() + 10
        while isAlive(pid):
            self.assertLess(time.monotonic(), deadline, f"the copier {pid} outlived its shim")
            time.sleep(0.01)
        os.write(self.outW, b"still open")  # the write end was open all along
        self.assertEqual(os.read(self.outR, 100), b"still open")
