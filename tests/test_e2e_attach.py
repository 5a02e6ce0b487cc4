"""
End to end: attach sessions to real runc containers through the real
isulad-shim.  Field cases C1 (slow reader) and C2 (several clients), every
kind of invalid request, the session limit, detach, a client killed
mid-stream, the socket's life cycle, and C{shimd attach}.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time

from twisted.trial.unittest import TestCase

from shimd.attach import DETACH_MESSAGE
from shimd.engine import Container
from tests.e2e import BIN, AttachClient, EngineMixin, parallel, readRecords, reassemble, repeat, sendAttachRequest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ = "".join(f"{i}\n" for i in range(1, 200001)).encode()


class AttachMixin(EngineMixin):
    def container(self, args: list[str], start: bool = True, **prepare: object) -> Container:
        """Create (and start) a container; it is killed and removed at cleanup."""
        prepare.setdefault("stdout", False)
        prepare.setdefault("stderr", False)
        c = self.engine.prepare(self.bundle, args, **prepare)  # type: ignore[arg-type]
        self.addCleanup(self.finish, c)  # type: ignore[attr-defined]
        self.engine.create(c)
        if start:
            self.engine.start(c)
        return c

    def finish(self, c: Container) -> None:
        if c.shim is not None and c.shim.poll() is None:
            self.engine.runtimeCall(c, "kill", c.id, "KILL")
            self.engine.collect(c, timeout=30)
            self.engine.reapShim(c, timeout=30)
        self.engine.close(c)

    def client(self, c: Container, **kw: bool) -> AttachClient:
        a = AttachClient(c.workdir, **kw)
        self.addCleanup(a.close)  # type: ignore[attr-defined]
        return a

    def running(self, c: Container) -> bool:
        result = self.engine.runtimeCall(c, "state", c.id)
        return result.returncode == 0 and json.loads(result.stdout)["status"] == "running"

    def attachLog(self, c: Container) -> list[dict]:
        """Every line of attach-log.json (none yet: the shim is still starting); each must be valid JSON (B9)."""
        try:
            with open(c.path("attach-log.json"), "rb") as f:
                return [json.loads(line) for line in f.read().splitlines()]
        except FileNotFoundError:
            return []


class FieldCaseTests(AttachMixin, TestCase):
    def setUp(self) -> None:
        self.setUpEngine()

    def test_C1_slowReader(self) -> None:
        """C1: a slow reader gets every byte, then EOF; 20 runs."""
        expected = b"\0" * 500000 + SEQ + b"END\n"

        def one(i: int) -> None:
            c = self.engine.prepare(
                self.bundle, ["sh", "-c", "dd if=/dev/zero bs=1 count=500000 2>/dev/null; seq 1 200000; echo END"],
                stdout=False, stderr=False,
            )
            try:
                self.engine.create(c)
                a = AttachClient(c.workdir)
                try:
                    self.assertEqual(a.attach(), 0)
                    self.engine.start(c)
                    fd, got, reads = a.fds["stdout"], bytearray(), 0
                    deadline = time.monotonic() + 60
                    while time.monotonic() < deadline:
                        select.select([fd], [], [], 1.0)
                        try:
                            chunk = os.read(fd, 4096)
                        except BlockingIOError:
                            continue
                        if not chunk:
                            break
                        got += chunk
                        reads += 1
                        if reads % 50 == 0:
                            time.sleep(0.02)
                    self.assertEqual(len(got), len(expected))
                    self.assertTrue(got == expected, "the slow reader's bytes differ")
                finally:
                    a.close()
                _, _, status = self.engine.collect(c, timeout=60)
                self.assertEqual(status, 0)
                self.assertEqual(self.engine.reapShim(c), 0)
                log = reassemble(readRecords([c.path("console.log")]), "stdout")
                self.assertTrue(log.encode() == expected, "the log differs")
            finally:
                self.engine.close(c)

        parallel(one, repeat(20))

    def test_C2_severalClients(self) -> None:
        """C2: two clients see each other's input; one leaves, the other carries on."""
        c = self.container(["cat"], stdin=True)
        a, b = self.client(c), self.client(c)
        self.assertEqual((a.attach(), b.attach()), (0, 0))
        a.write(b"from-a\n")
        for x in (a, b):
            x.readUntil(b"from-a\n")
        b.write(b"from-b\n")
        for x in (a, b):
            self.assertEqual(x.readUntil(b"from-b\n"), b"from-a\nfrom-b\n")
        b.close()
        a.write(b"again\n")
        self.assertEqual(a.readUntil(b"again\n"), b"from-a\nfrom-b\nagain\n")
        self.assertTrue(self.running(c))
        c.closeStdin()  # the engine's end of input: cat exits
        self.assertEqual(a.readToEnd(), (b"from-a\nfrom-b\nagain\n", b""))
        _, _, status = self.engine.collect(c)
        self.assertEqual(status, 0)
        self.engine.reapShim(c)
        self.assertEqual(reassemble(readRecords([c.path("console.log")]), "stdout"), "from-a\nfrom-b\nagain\n")
        ended = [r["msg"] for r in self.attachLog(c) if "ended" in r["msg"]]
        self.assertIn("stdin FIFO was closed", ended[0])

    def test_stderrToErrFifo(self) -> None:
        """B1: the container's stderr reaches each client's err FIFO, never its out FIFO."""
        c = self.container(["sh", "-c", 'while read -r l; do echo "out:$l"; echo "err:$l" >&2; done'], openStdin=True)
        a, b = self.client(c), self.client(c)
        self.assertEqual((a.attach(), b.attach()), (0, 0))
        a.write(b"1\n")
        b.write(b"2\n")
        for x in (a, b):
            x.readUntil(b"out:2\n")
            x.readUntil(b"err:2\n", "stderr")
            self.assertEqual(bytes(x.received["stdout"]), b"out:1\nout:2\n")
            self.assertEqual(bytes(x.received["stderr"]), b"err:1\nerr:2\n")


class InvalidRequestTests(AttachMixin, TestCase):
    """Every invalid request: -1, a reason in attach-log.json, nobody else disturbed."""

    def setUp(self) -> None:
        self.setUpEngine()

    def test_invalidRequests(self) -> None:
        c = self.container(["sh", "-c", "i=0; while :; do echo tick $i; i=$((i+1)); sleep 0.02; done"])
        valid = self.client(c)
        self.assertEqual(valid.attach(), 0)
        # Ticks from the reply on (which tick depends on how soon it came).
        valid.readUntil(b"\n")
        wd, sock = c.workdir, os.path.join(c.workdir, "attach.sock")
        outside = os.path.join(self.stateRoot, "outside")
        os.makedirs(outside)

        def fifo(path: str, mode: int = 0o600, owner: int = 0) -> str:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            os.mkfifo(path)
            os.chmod(path, mode)
            os.chown(path, owner, owner)
            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)  # a reader, so only the check can fail
            self.addCleanup(os.close, fd)
            return path

        regular = os.path.join(wd, "regular")
        with open(regular, "w"):
            pass
        os.chmod(regular, 0o600)
        os.symlink(fifo(os.path.join(outside, "target")), os.path.join(wd, "escape"))
        os.makedirs(wd + "X")
        self.addCleanup(subprocess.run, ["rm", "-rf", wd + "X"])
        noReader = os.path.join(wd, "no-reader")
        os.mkfifo(noReader, 0o600)

        def withStdout(path: str) -> bytes:
            """A valid triple but for stdout: the reason must name that path."""
            ok = self.client(c)
            return f"{ok.paths['stdin']} {path} {ok.paths['stderr']}".encode()

        cases: list[tuple[str, bytes, str, bool]] = [
            ("relative", b"attach/a/in-fifo /a /b", 'stdin path "attach/a/in-fifo" is not an absolute path', False),
            ("outside", withStdout(fifo(os.path.join(outside, "out"))), "not inside the workdir", False),
            ("dotdot", withStdout(os.path.join(wd, "..", "..", "outside", "out")), "not inside the workdir", False),
            ("prefix (B16)", withStdout(fifo(wd + "X/out")), "not inside the workdir", False),
            ("symlink", withStdout(os.path.join(wd, "escape")), "not inside the workdir", False),
            ("not a FIFO", withStdout(regular), "is not a FIFO", False),
            ("mode", withStdout(fifo(os.path.join(wd, "m644"), 0o644)), "has mode 0644, not 0600", False),
            ("owner", withStdout(fifo(os.path.join(wd, "nobody"), owner=65534)), "owned by uid 65534", False),
            ("missing (B3)", withStdout(os.path.join(wd, "missing")), "cannot be resolved", False),
            ("no reader", withStdout(noReader), "has no reader", False),
            ("2 tokens", b"/a /b", "got 2 tokens", False),
            ("4 tokens", b"/a /b /c /d", "got 4 tokens", False),
            ("empty", b"", "empty message", True),
            ("64 KiB garbage", b"G" * 65536, "longer than", False),
            ("binary", bytes(b for b in range(256) if b != 10), "", False),
            ("invalid JSON", b'{"stdin": "/a", "stdout": }', "invalid JSON", False),
            ("wrong JSON type", b'{"stdout": 1}', "stdout must be a string", False),
            ("bad detach keys", json.dumps({"stdout": "/a", "detachKeys": "ctrl-"}).encode(), "invalid detach keys", False),
        ]
        seen = len(self.attachLog(c))
        for label, message, why, halfClose in cases:
            self.assertEqual(sendAttachRequest(sock, message, halfClose=halfClose), -1, label)
            records = self.attachLog(c)
            errors = [r["msg"] for r in records[seen:] if r["level"] == "error"]
            seen = len(records)
            self.assertTrue(errors, f"{label}: no error logged")
            self.assertIn(why, errors[0], label)
            if message.startswith(b"/") and message.count(b" ") == 2:
                self.assertIn(f'stdout path "{message.split(b" ")[1].decode()}"', errors[0], label)
        # The valid session was never disturbed: every tick, in order, and more.
        got = valid.readUntil(b"\n")
        lines = got.split(b"\n")
        first = int(lines[0].split()[1])
        out = valid.readUntil(f"tick {first + len(lines) + 10}\n".encode())
        ticks = [int(line.split()[1]) for line in out[: out.rindex(b"\n")].splitlines()]  # whole lines
        self.assertEqual(ticks, list(range(ticks[0], ticks[0] + len(ticks))))
        self.assertIsNone(c.shim.poll())  # type: ignore[union-attr]

    def test_seventeenthSession(self) -> None:
        """16 sessions; the 17th gets -1 and nothing; once one leaves it fits (B2)."""
        c = self.container(["cat"], openStdin=True)
        clients = [self.client(c) for _ in range(17)]
        for x in clients[:16]:
            self.assertEqual(x.attach(), 0)
        last = clients[16]
        self.assertEqual(last.attach(), -1)
        self.assertIn("the limit is 16", self.attachLog(c)[-1]["msg"])
        clients[0].write(b"to all\n")
        for x in clients[:16]:
            x.readUntil(b"to all\n")
        self.assertEqual(os.read(last.fds["stdout"], 100), b"")  # never opened by the shim
        clients[0].close()
        deadline = time.monotonic() + 5
        while last.attach() != 0:
            self.assertLess(time.monotonic(), deadline, "a freed slot was not reused")
            time.sleep(0.05)
        clients[1].write(b"again\n")
        self.assertEqual(last.readUntil(b"again\n"), b"again\n")


class DetachTests(AttachMixin, TestCase):
    def setUp(self) -> None:
        self.setUpEngine()

    def assertDetached(self, client: AttachClient, before: bytes) -> None:
        """The output so far, then the message (one write), then end of file."""
        out, err = client.readToEnd(timeout=10)
        self.assertEqual(out, before + DETACH_MESSAGE)
        self.assertEqual(err, b"")

    def test_ctrlQ(self) -> None:
        """The default keys: what precedes is delivered, what follows is not; cat runs on."""
        c = self.container(["cat"], openStdin=True)
        a = self.client(c)
        self.assertEqual(a.attach(), 0)
        a.write(b"hello\n")
        a.readUntil(b"hello\n")
        a.write(b"more\x11ignored\n")
        out, _ = a.readToEnd(timeout=10)
        # cat's echo of "more" may come after the session ended: not for it.
        self.assertIn(out, (b"hello\n" + DETACH_MESSAGE, b"hello\nmore" + DETACH_MESSAGE))
        self.assertTrue(self.running(c))
        b = self.client(c)
        self.assertEqual(b.attach(), 0)
        b.write(b"again\n")
        self.assertEqual(b.readUntil(b"again\n"), b"again\n")
        self.assertEqual(reassemble(readRecords([c.path("console.log")]), "stdout"), "hello\nmoreagain\n")
        self.assertTrue(any(r["msg"].endswith("ended: detached") for r in self.attachLog(c)))

    def test_ctrlPCtrlQ(self) -> None:
        """Two keys: a lone ctrl-p (even in its own write) reaches cat as itself."""
        c = self.container(["cat"], openStdin=True)
        a = self.client(c)
        self.assertEqual(a.attach(detachKeys="ctrl-p,ctrl-q"), 0)
        a.write(b"\x10x\n")
        a.readUntil(b"\x10x\n")
        a.write(b"\x10")
        time.sleep(0.1)
        a.write(b"y\n")
        a.readUntil(b"\x10y\n")
        a.write(b"\x10\x11")
        self.assertDetached(a, b"\x10x\n\x10y\n")
        self.assertTrue(self.running(c))
        b = self.client(c)
        self.assertEqual(b.attach(), 0)  # the default, ctrl-q, for this one
        b.write(b"\x10x\n")
        self.assertEqual(b.readUntil(b"\x10x\n"), b"\x10x\n")


class RobustnessTests(AttachMixin, TestCase):
    def setUp(self) -> None:
        self.setUpEngine()

    def test_clientKilled(self) -> None:
        """A client SIGKILLed mid-stream is dropped at once; no stall; the shim idles after."""
        c = self.container(["sh", "-c", "read go; seq 1 200000; cat"], openStdin=True)
        code = (
            "import os, sys, time\n"
            "from tests.e2e import AttachClient\n"
            f"a = AttachClient({c.workdir!r})\n"
            "assert a.attach() == 0\n"
            "print('attached', flush=True)\n"
            "a.readUntil(b'1\\n')\n"
            "print('reading', flush=True)\n"
            "time.sleep(600)\n"
        )
        victim = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE)
        self.addCleanup(victim.wait)
        self.addCleanup(_kill, victim)
        self.assertEqual(victim.stdout.readline(), b"attached\n")  # type: ignore[union-attr]
        v = self.client(c)
        self.assertEqual(v.attach(), 0)
        v.write(b"go\n")
        self.assertEqual(victim.stdout.readline(), b"reading\n")  # type: ignore[union-attr]
        v.readUntil(b"10\n")
        time.sleep(0.3)  # the victim's FIFO fills up: output waits for it
        self.assertNotIn(b"200000\n", v.received["stdout"])
        victim.kill()
        killed = time.monotonic()
        self.assertEqual(v.readUntil(b"200000\n", timeout=8), SEQ)
        self.assertLess(time.monotonic() - killed, 5, "output stalled after the client died")
        v.write(b"ping\n")
        v.readUntil(b"ping\n")
        ended = [r["msg"] for r in self.attachLog(c) if r["msg"].startswith("attach session 1 ended")]
        self.assertEqual(len(ended), 1, self.attachLog(c))
        self.assertIn("reader is gone", ended[0])
        stat = f"/proc/{c.shim.pid}/stat"  # type: ignore[union-attr]
        time.sleep(0.2)
        before = _cpu(stat)
        time.sleep(2)
        self.assertLessEqual(_cpu(stat) - before, 5, "the shim is busy after the client died")

    def test_socketLifeCycle(self) -> None:
        """A stale socket is replaced, the socket is 0600, and it is gone after the exit."""
        c = self.engine.prepare(self.bundle, ["sh", "-c", "read l; echo $l"], stdout=False, stderr=False, openStdin=True)
        self.addCleanup(self.finish, c)
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(c.path("attach.sock"))
        stale.close()
        self.engine.create(c)
        self.assertEqual(os.stat(c.path("attach.sock")).st_mode & 0o777, 0o600)
        a = self.client(c)
        self.assertEqual(a.attach(), 0)
        self.engine.start(c)
        a.write(b"bye\n")
        self.assertEqual(a.readToEnd(), (b"bye\n", b""))
        self.assertEqual(self.engine.collect(c)[2], 0)
        self.assertEqual(self.engine.reapShim(c), 0)
        self.assertFalse(os.path.exists(c.path("attach.sock")))

    def test_socketPathTooLong(self) -> None:
        """Attach is optional (B17): a socket that cannot be made is logged; the container runs."""
        path = "/tmp/" + "x" * 120 + "/attach.sock"
        r = self.runContainer(["echo", "hi"], extra={"attach_socket": path})
        self.assertEqual((r.stdout, r.status, r.shimCode), (b"hi\n", 0, 0))
        with open(os.path.join(r.workdir, "attach-log.json")) as f:
            self.assertIn("longer than a unix socket allows", f.read())


class CommandTests(AttachMixin, TestCase):
    """shimd attach, end to end."""

    def setUp(self) -> None:
        self.setUpEngine()

    def shimdAttach(self, c: Container, *args: str) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(
            [os.path.join(BIN, "shimd"), "attach", c.workdir, *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/",
        )
        self.addCleanup(p.wait)
        self.addCleanup(_kill, p)
        return p

    def waitForSession(self, c: Container, count: int = 1) -> None:
        deadline = time.monotonic() + 20
        while sum("started" in r["msg"] for r in self.attachLog(c)) < count:
            self.assertLess(time.monotonic(), deadline, "shimd attach did not attach")
            time.sleep(0.05)

    def test_detach(self) -> None:
        c = self.container(["cat"], openStdin=True)
        p = self.shimdAttach(c, "--detach-keys", "ctrl-p,ctrl-q")
        self.waitForSession(c)
        p.stdin.write(b"hi\n")  # type: ignore[union-attr]
        p.stdin.flush()  # type: ignore[union-attr]
        self.assertEqual(_readLine(p.stdout.fileno()), b"hi\n")  # type: ignore[union-attr]
        p.stdin.write(b"\x10\x11")  # type: ignore[union-attr]
        p.stdin.flush()  # type: ignore[union-attr]
        self.assertEqual(p.wait(20), 0, p.stderr.read())  # type: ignore[union-attr]
        self.assertEqual(p.stdout.read(), b"")  # type: ignore[union-attr]
        self.assertEqual(p.stderr.read(), b"")  # type: ignore[union-attr]
        self.assertTrue(self.running(c))
        self.assertEqual(os.listdir(c.path("attach")), [])

    def interrupt(self, signum: int) -> None:
        """SIGINT or SIGTERM: shimd attach leaves, the container runs on and keeps its output."""
        c = self.container(["cat"], openStdin=True)
        p = self.shimdAttach(c)
        self.waitForSession(c)
        p.send_signal(signum)
        self.assertEqual(p.wait(20), 128 + signum)
        self.assertIn(f"the container keeps running: shimd attach {c.workdir}".encode(), p.stderr.read())  # type: ignore[union-attr]
        self.assertTrue(self.running(c))
        ended = [r["msg"] for r in self.attachLog(c) if r["msg"].startswith("attach session 1 ended")]
        self.assertEqual(len(ended), 1, self.attachLog(c))
        self.assertNotIn("output ended", ended[0])
        v = self.client(c)
        self.assertEqual(v.attach(), 0)
        v.write(b"still here\n")
        v.readUntil(b"still here\n")

    def test_sigterm(self) -> None:
        self.interrupt(signal.SIGTERM)

    def test_sigint(self) -> None:
        self.interrupt(signal.SIGINT)

    def test_exitCode(self) -> None:
        """The container exits: shimd attach exits with its code; its stdin EOF did not end cat's input."""
        c = self.container(["sh", "-c", 'read l; echo "got $l"; echo oops >&2; exit 3'], openStdin=True)
        p = self.shimdAttach(c)
        out, err = p.communicate(b"x\n", timeout=30)
        self.assertEqual((p.returncode, out, err), (3, b"got x\n", b"oops\n"))

    def test_noStdinAttachedBeforeStart(self) -> None:
        c = self.container(["sh", "-c", "echo out; echo err >&2; exit 4"], start=False)
        p = self.shimdAttach(c, "--no-stdin")
        self.waitForSession(c)
        self.engine.start(c)
        out, err = p.communicate(timeout=30)
        self.assertEqual((p.returncode, out, err), (4, b"out\n", b"err\n"))

    def test_notRunning(self) -> None:
        c = self.container(["true"])
        self.engine.collect(c)
        self.engine.reapShim(c)
        p = self.shimdAttach(c)
        _, err = p.communicate(timeout=30)
        self.assertEqual(p.returncode, 125)
        self.assertIn(b"the container has exited", err)


def _kill(p: subprocess.Popen[bytes]) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGKILL)


def _cpu(statPath: str) -> int:
    with open(statPath) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks


def _readLine(fd: int, timeout: float = 10.0) -> bytes:
    got = b""
    deadline = time.monotonic() + timeout
    while not got.endswith(b"\n") and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            got += chunk
    return got
