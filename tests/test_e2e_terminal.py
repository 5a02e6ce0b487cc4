"""
End to end: terminal containers (issue 4) with real runc through the real
isulad-shim, the test playing iSulad's part.  The pty, its initial size and
resizes, field case C8, bad resize messages, and no pty fd left behind.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from twisted.trial.unittest import SkipTest, TestCase

from shimd.bundle import writeBundleConfig
from shimd.engine import Container
from tests.e2e import (
    BIN,
    AttachClient,
    EngineMixin,
    RunningContainerMixin,
    isAlive,
    parallel,
    ptyFds,
    readRecords,
    reassemble,
    repeat,
)


@dataclass
class TtyResult:
    stdout: bytes
    stderr: bytes
    status: int
    shimCode: int
    eofAfterStatus: float
    shimAliveAtStatus: bool
    ptysAtStatus: list[str]
    workdir: str
    records: list[dict[str, Any]] = field(default_factory=list)


class TerminalMixin(EngineMixin):
    def setUpTerminal(self) -> None:
        self.setUpEngine()
        self.bundle = writeBundleConfig(
            os.path.join(self.stateRoot, "tty-bundle"), ["sh"], terminal=True, consoleSize=(40, 120)
        )

    @staticmethod
    def sendResize(c: Container, message: bytes) -> None:
        """Any message, as iSulad's exec resize sends one: open non-blocking, one write, close."""
        fd = os.open(c.process["resizeFifo"], os.O_WRONLY | os.O_NONBLOCK)
        try:
            os.write(fd, message)
        finally:
            os.close(fd)

    def runTty(
        self,
        args: list[str],
        during: Callable[[Container], object] | None = None,
        timeout: float = 60.0,
        **prepare: Any,
    ) -> TtyResult:
        """
        One terminal container from prepare to the shim's exit.

        @param during: called in a thread once the container started, while
            its output is collected.
        """
        c = self.engine.prepare(self.bundle, args, **prepare)
        try:
            self.engine.create(c)
            self.engine.start(c)
            worker = None
            if during is not None:
                worker = threading.Thread(target=during, args=(c,), daemon=True)
                worker.start()
            seen: dict[str, Any] = {}

            def onStatus(status: int, out: bytes, err: bytes) -> None:
                # Freeze the shim while its fds are looked at: it must
                # still be alive for the check to mean anything.
                assert c.shim is not None
                seen["at"] = time.monotonic()
                try:
                    os.kill(c.shim.pid, signal.SIGSTOP)
                except ProcessLookupError:
                    pass
                try:
                    seen["alive"] = isAlive(c.shim.pid)
                    seen["ptys"] = ptyFds(c.shim.pid) if seen["alive"] else []
                finally:
                    try:
                        os.kill(c.shim.pid, signal.SIGCONT)
                    except ProcessLookupError:
                        pass

            out, err, status = self.engine.collect(c, timeout=timeout, onStatus=onStatus)
            eofAfter = time.monotonic() - seen["at"]
            if worker is not None:
                worker.join(timeout)
            code = self.engine.reapShim(c)
            logs = [c.path("console.log")] if os.path.exists(c.path("console.log")) else []
            return TtyResult(out, err, status, code, eofAfter, seen["alive"], seen["ptys"], c.workdir,
                             readRecords(logs))
        finally:
            self.engine.close(c, remove=False)


class TerminalTests(TerminalMixin, TestCase):
    def setUp(self) -> None:
        self.setUpTerminal()

    def test_stdinIsAPty(self) -> None:
        r = self.runTty(["readlink", "/proc/self/fd/0"])
        self.assertRegex(r.stdout.decode(), r"^/dev/pts/\d+\r\n$")
        self.assertEqual((r.stderr, r.status, r.shimCode), (b"", 0, 0))

    def test_stderrOnTheTerminal(self) -> None:
        """A pty merges stdout and stderr: one stream, named stdout, in the FIFO and the log."""
        r = self.runTty(["sh", "-c", "echo out; echo err >&2; exit 4"])
        self.assertEqual((r.stdout, r.stderr, r.status), (b"out\r\nerr\r\n", b"", 4))
        self.assertEqual({rec["stream"] for rec in r.records}, {"stdout"})
        self.assertEqual(reassemble(r.records, "stdout"), "out\r\nerr\r\n")

    def test_foop(self) -> None:
        """C8: foop, exit 0, end of file within 1 s, no pty fd left in the shim."""
        r = self.runTty(["echo", "foop"])
        self.assertEqual((r.stdout, r.status, r.shimCode), (b"foop\r\n", 0, 0))
        self.assertLess(r.eofAfterStatus, 1.0)
        self.assertTrue(r.shimAliveAtStatus)
        self.assertEqual(r.ptysAtStatus, [])
        self.assertEqual([(rec["log"], rec["stream"]) for rec in r.records], [("foop\r\n", "stdout")])

    def test_seq(self) -> None:
        """C8: every seq output is complete: EIO is end of file only after the buffered output."""
        alive = []

        def one(i: int) -> None:
            r = self.runTty(["sh", "-c", 'seq -s " " 1000000'], log=False)
            self.assertTrue(r.stdout.endswith(b" 999999 1000000\r\n"), r.stdout[-60:])
            self.assertEqual(len(r.stdout), 6888897)
            self.assertEqual((r.status, r.shimCode), (0, 0))
            self.assertLess(r.eofAfterStatus, 1.0)
            self.assertEqual(r.ptysAtStatus, [])
            alive.append(r.shimAliveAtStatus)

        parallel(one, repeat(100), workers=4)
        self.assertGreater(sum(alive), len(alive) // 2, "the fd check must run while the shim lives")

    def test_initialSizeAndResize(self) -> None:
        """consoleSize 40x120, then a resize to 50x200 after 1 s: never 0 0."""

        def resizeLater(c: Container) -> None:
            time.sleep(1.0)
            # On a loaded machine the first stty may come late: resize only
            # after it (the log has it at once: a complete line).
            deadline = time.monotonic() + 0.9
            while time.monotonic() < deadline:
                with open(c.path("console.log")) as f:
                    if "40 120" in f.read():
                        break
                time.sleep(0.02)
            c.resize(200, 50)

        def one(i: int) -> None:
            r = self.runTty(["sh", "-c", "stty size; sleep 2; stty size"], during=resizeLater, resize=True)
            self.assertEqual((r.stdout, r.status), (b"40 120\r\n50 200\r\n", 0))

        parallel(one, repeat(50), workers=10)

    def test_badResizeMessagesKeepIO(self) -> None:
        """
        Garbage, coalesced and out-of-range resize messages are ignored (and
        logged); output, input and later resizes still work (B6).
        """
        script = "read a; stty size; read b; stty size; echo got $a $b"

        def drive(c: Container) -> None:
            time.sleep(0.3)
            # One read each (the protocol has no separator: messages sent
            # back to back would reach the shim as one).
            for message in (b"garbage", b"80 2490 30", b"70000 20", b"-1 5", b"\n", b"\xff\xfe", b"100 30\n"):
                self.sendResize(c, message)
                time.sleep(0.05)
            time.sleep(0.3)
            c.writeStdin(b"one\r")
            time.sleep(0.3)
            self.sendResize(c, b"81 2491 31")
            time.sleep(0.3)
            c.writeStdin(b"two\r")

        r = self.runTty(["sh", "-c", script], during=drive, resize=True, stdin=True, timeout=30)
        self.assertEqual(r.status, 0, r.stdout)
        out = r.stdout.decode()
        self.assertEqual(re.findall(r"^\d+ \d+\r$", out, re.M), ["30 100\r", "30 100\r"])
        self.assertTrue(out.endswith("got one two\r\n"), out)
        with open(os.path.join(r.workdir, "shim-log.json")) as f:
            log = f.read()
        for bad in ("garbage", "80 2490 30", "70000 20"):
            self.assertIn(f"ignored '{bad}'", log)


class TerminalAttachTests(TerminalMixin, TestCase):
    """Attach sessions on a terminal container share its pty."""

    def setUp(self) -> None:
        self.setUpTerminal()

    def test_sessionsShareTheTerminal(self) -> None:
        c = self.engine.prepare(self.bundle, ["sh"], stdin=True)
        try:
            self.engine.create(c)
            clients = [AttachClient(c.workdir), AttachClient(c.workdir)]
            for client in clients:
                self.addCleanup(client.close)
                self.assertEqual(client.attach(), 0)
            a, b = clients
            self.engine.start(c)
            a.readUntil(b"/ # ")
            a.write(b"echo one\r")
            for client in clients:
                client.readUntil(b"one\r\n")
            b.write(b"echo two; exit 7\r")
            at: list[float] = []
            out, err, status = self.engine.collect(c, timeout=30, onStatus=lambda *_: at.append(time.monotonic()))
            self.assertEqual((status, err), (7, b""))
            self.assertTrue(out.endswith(b"two\r\n"), out)
            for client in clients:
                stdout, stderr = client.readToEnd(timeout=5)
                self.assertLess(time.monotonic() - at[0], 1.0, "every reader sees end of file within 1 s")
                self.assertEqual(stdout, out, "sessions get what the engine gets")
                self.assertEqual(stderr, b"", "a terminal has no stderr")
            self.assertEqual(self.engine.reapShim(c), 0)
        finally:
            self.engine.close(c, remove=False)


class ExecResizeTests(RunningContainerMixin, TestCase):
    """The resize FIFO of an exec -t (the rest of exec -t: tests.test_e2e_exec)."""

    def setUp(self) -> None:
        self.setUpRunning()

    def test_execWithTerminal(self) -> None:
        e = self.engine.prepareExec(self.c, ["sh", "-c", "readlink /proc/self/fd/0; sleep 1; stty size; exit 3"],
                                    terminal=True)

        def resizeSoon() -> None:
            self.engine.waitPid(e, 30)  # the shim reads the resize FIFO by then
            e.resize(100, 30)

        threading.Thread(target=resizeSoon, daemon=True).start()
        try:
            out, err, status, code = self.engine.runExec(e, timeout=30)
        finally:
            self.engine.close(e)
        self.assertRegex(out.decode(), r"^/dev/pts/\d+\r\n30 100\r\n$")
        self.assertEqual((err, status, code), (b"", 3, 0))


class Tmux:
    """A tmux server of our own (its own socket), one window running bash."""

    def __init__(self, test: TestCase, width: int = 100, height: int = 30) -> None:
        if not shutil.which("tmux"):
            raise SkipTest("tmux is not installed")
        self.socket = f"shimd-test-{os.getpid()}-{os.urandom(3).hex()}"
        env = f"env -i PATH={BIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin TERM=xterm HOME=/root"
        self.tmux("new-session", "-d", "-s", "t", "-x", str(width), "-y", str(height),
                  f"{env} PS1='$ ' bash --norc --noprofile")
        socketPath = self.tmux("display-message", "-p", "#{socket_path}").strip()
        test.addCleanup(lambda: os.path.exists(socketPath) and os.unlink(socketPath))
        test.addCleanup(self.tmux, "kill-server")

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True,
                              check=True).stdout

    def line(self, text: str) -> None:
        """Type C{text} and Enter."""
        self.tmux("send-keys", "-t", "t", "-l", text)
        self.tmux("send-keys", "-t", "t", "Enter")

    def key(self, key: str) -> None:
        self.tmux("send-keys", "-t", "t", key)

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "t", "-S", "-100")

    def waitFor(self, pattern: str, after: int = 0, timeout: float = 20.0) -> int:
        """Wait until a line after line C{after} matches C{pattern}; return its number."""
        deadline = time.monotonic() + timeout
        while True:
            lines = self.screen().splitlines()
            for i in range(after, len(lines)):
                if re.search(pattern, lines[i]):
                    return i + 1
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} not on the screen:\n" + "\n".join(lines))
            time.sleep(0.05)


class InteractiveTests(TerminalMixin, TestCase):
    """A person at a terminal, played through tmux."""

    def setUp(self) -> None:
        self.setUpTerminal()

    def test_runDetachAttach(self) -> None:
        """
        shimd run -t: type, see the output, detach; shimd attach: type
        exit 5, it exits 5; the terminal is as it was after each.
        """
        t = Tmux(self)
        workdir = os.path.join(self.stateRoot, "runc", "tty1")
        modes = os.path.join(self.stateRoot, "stty")
        t.line(f"stty -a > {modes}.0")
        t.line(f"shimd run -t --state-root {self.stateRoot} --id tty1 -- sh; echo run-rc=$?")
        at = t.waitFor(r"^/ #\s*$")
        t.line("echo hi; stty size")
        at = t.waitFor(r"^hi\s*$", at)
        t.waitFor(r"^30 100\s*$", at)
        t.key("C-q")
        at = t.waitFor(r"^run-rc=0$", at)
        t.line(f"stty -a > {modes}.1")
        t.line(f"shimd attach {workdir}; echo attach-rc=$?")
        time.sleep(0.5)
        t.line("echo again")
        at = t.waitFor(r"^again\s*$", at)
        t.line("exit 5")
        t.waitFor(r"^attach-rc=5$", at)
        t.line(f"stty -a > {modes}.2; echo saved")
        t.waitFor(r"^saved$", at)
        with open(f"{modes}.0") as f:
            before = f.read()
        for n in (1, 2):
            with open(f"{modes}.{n}") as f:
                self.assertEqual(f.read(), before, f"terminal modes changed after step {n}")
        self.assertIn("icanon", before.split())
        self.assertIn("echo", before.split())
