"""
End to end: real runc containers through the real isulad-shim, with the
test playing iSulad's part.  Field cases C3 to C7 of shared/cases, rotation,
and the exit paths.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import struct
import subprocess
import time

from twisted.trial.unittest import SkipTest, TestCase

from tests.e2e import EngineMixin, isAlive, parallel, reassemble, readRecords, repeat

TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z$")


class ExitCodeTests(EngineMixin, TestCase):
    """C5: the status on exit_fifo and on the shim's stdout."""

    def setUp(self) -> None:
        self.setUpEngine()

    def assertStatus(self, args: list[str], expected: int, **kw: object) -> None:
        r = self.runContainer(args, **kw)  # type: ignore[arg-type]
        self.assertEqual(r.status, expected)
        self.assertEqual(r.shimCode, 0, r.shimStderr)
        self.assertEqual(r.shimStdout, struct.pack("=i", expected))
        with open(os.path.join(r.workdir, "exit")) as f:
            self.assertEqual(f.read(), str(expected))
        # When the engine reads the status, ./exit holds it and runc has
        # deleted the container (isulad-shim's order).
        self.assertEqual((r.exitFileAtStatus, r.inRuncAtStatus), (str(expected), False))

    def test_true(self) -> None:
        self.assertStatus(["true"], 0)

    def test_false(self) -> None:
        self.assertStatus(["false"], 1)

    def test_exit42(self) -> None:
        self.assertStatus(["sh", "-c", "exit 42"], 42)

    def test_killedFromOutside(self) -> None:
        def kill(c: object) -> None:
            time.sleep(0.2)
            result = self.engine.runtimeCall(c, "kill", c.id, "KILL")  # type: ignore[attr-defined]
            self.assertEqual(result.returncode, 0, result.stderr)

        self.assertStatus(["sleep", "300"], 137, between=kill)

    def test_runtimeReaped(self) -> None:
        """After the report the container is deleted from runc's state."""
        r = self.runContainer(["true"])
        root = os.path.join(r.workdir, "runc")
        self.assertEqual(os.listdir(root) if os.path.isdir(root) else [], [])


def sleepers(seconds: str) -> list[int]:
    """Processes running C{sleep <seconds>} (busybox's cmdline)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read() == b"sleep\0" + seconds.encode() + b"\0":
                    found.append(int(pid))
        except OSError:
            pass
    return found


class LeftoverProcessTests(EngineMixin, TestCase):
    """Nothing of a container outlives its report, whatever its pid namespace."""

    def setUp(self) -> None:
        self.setUpEngine()

    def backgroundSleeper(self) -> str:
        seconds = str(900000 + secrets.randbelow(99999))
        r = self.runContainer(["sh", "-c", f"sleep {seconds} >/dev/null 2>&1 & echo started; exit 3"])
        self.assertEqual((r.status, r.stdout), (3, b"started\n"))
        return seconds

    def test_ownPidNamespace(self) -> None:
        """Its init exited: the kernel ended the rest; the shim deleted the container."""
        self.assertEqual(sleepers(self.backgroundSleeper()), [])

    def test_hostPidNamespace(self) -> None:
        """No pid namespace of its own: the background process outlives init; kill --all ends it."""
        with open(os.path.join(self.bundle, "config.json")) as f:
            config = json.load(f)
        config["linux"]["namespaces"] = [n for n in config["linux"]["namespaces"] if n["type"] != "pid"]
        config["root"]["path"] = os.path.join(self.bundle, config["root"]["path"])
        bundle = os.path.join(self.stateRoot, "hostpid-bundle")
        os.makedirs(bundle)
        with open(os.path.join(bundle, "config.json"), "w") as f:
            json.dump(config, f)
        self.bundle = bundle
        self.assertEqual(sleepers(self.backgroundSleeper()), [])


class OutputTests(EngineMixin, TestCase):
    """C3, C4, C7: what reaches the FIFOs and the log."""

    def setUp(self) -> None:
        self.setUpEngine()

    def test_unterminatedLastLine(self) -> None:
        """C3 A: printf abcd gives exactly abcd and one record."""
        r = self.runContainer(["sh", "-c", "printf abcd"])
        self.assertEqual(r.stdout, b"abcd")
        self.assertEqual(len(r.records), 1)
        self.assertEqual(r.records[0]["log"], "abcd")
        self.assertEqual(r.records[0]["stream"], "stdout")
        self.assertEqual(list(r.records[0]), ["log", "stream", "time"])
        self.assertRegex(r.records[0]["time"], TIME)

    def test_promptBeforeSleep(self) -> None:
        """C3 B: the prompt reaches the client at once and the log within ~1 s."""
        c = self.engine.prepare(self.bundle, ["sh", "-c", 'printf "line1\\nprompt> "; sleep 2; echo rest'])
        try:
            self.engine.create(c)
            self.engine.start(c)
            started = time.monotonic()
            got = b""
            fd = c.fds["stdout"]
            while b"prompt> " not in got:
                self.assertLess(time.monotonic() - started, 1.8, "prompt not delivered before the sleep ended")
                try:
                    got += os.read(fd, 4096)
                except BlockingIOError:
                    time.sleep(0.01)
            clientAt = time.monotonic() - started
            self.assertEqual(got, b"line1\nprompt> ")
            while True:
                records = readRecords([c.path("console.log")])
                if "prompt> " in reassemble(records, "stdout"):
                    break
                self.assertLess(time.monotonic() - started, 1.9, "prompt not in the log before rest")
                time.sleep(0.02)
            self.assertLess(clientAt, 1.0)
            out, _, status = self.engine.collect(c)
            self.assertEqual(got + out, b"line1\nprompt> rest\n")
            self.assertEqual(status, 0)
            self.engine.reapShim(c)
            records = readRecords([c.path("console.log")])
            self.assertEqual(reassemble(records, "stdout"), "line1\nprompt> rest\n")
        finally:
            self.engine.close(c)

    def test_notUTF8(self) -> None:
        """C4: bytes stay bytes on the FIFO; the log stays valid JSON."""
        r = self.runContainer(["sh", "-c", 'printf "\\355\\253\\356\\333\\003\\000\\377\\n"; echo after'])
        self.assertEqual(r.stdout, bytes.fromhex("edabeedb0300ff0a") + b"after\n")
        self.assertEqual(r.status, 0)
        self.assertEqual(r.records[-1]["log"], "after\n")
        first = reassemble(r.records, "stdout").split("after")[0]
        self.assertIn("\ufffd", first)
        self.assertIn("\x03\x00", first)

    def test_outAndErr(self) -> None:
        """C7: stdout to stdout, stderr to stderr, all there when the exit is reported."""
        r = self.runContainer(["sh", "-c", "echo out; echo err >&2"])
        self.assertEqual((r.stdout, r.stderr, r.status), (b"out\n", b"err\n", 0))
        assert r.atStatus is not None
        out, err, log = r.atStatus
        self.assertEqual((out, err), (b"out\n", b"err\n"))
        records = [json.loads(line) for line in log.splitlines()]
        self.assertEqual(reassemble(records, "stdout"), "out\n")
        self.assertEqual(reassemble(records, "stderr"), "err\n")

    def test_shortLivedMany(self) -> None:
        """C7: many short-lived containers never lose output."""

        def one(i: int) -> None:
            args = [
                ["echo", "running in container"],
                ["sh", "-c", "printf x; exit 3"],
                ["sh", "-c", "echo out; echo err >&2"],
            ][i % 3]
            expected = [
                (b"running in container\n", b"", 0),
                (b"x", b"", 3),
                (b"out\n", b"err\n", 0),
            ][i % 3]
            r = self.runContainer(args)
            self.assertEqual((r.stdout, r.stderr, r.status), expected)
            assert r.atStatus is not None
            self.assertEqual(r.atStatus[:2], expected[:2])
            records = [json.loads(line) for line in r.atStatus[2].splitlines()]
            self.assertEqual(reassemble(records, "stdout").encode(), expected[0])
            self.assertEqual(reassemble(records, "stderr").encode(), expected[1])

        parallel(one, repeat(200))

    def test_bigOutputSlowEngine(self) -> None:
        """A slow engine reader gets every byte; nothing is dropped."""

        def slowCollect(c: object) -> None:
            time.sleep(1.5)  # the container blocks meanwhile (backpressure)

        r = self.runContainer(["sh", "-c", "seq 1 300000; echo END"], between=slowCollect)
        expected = "".join(f"{i}\n" for i in range(1, 300001)) + "END\n"
        self.assertEqual(r.stdout.decode(), expected)
        self.assertEqual(reassemble(r.records, "stdout"), expected)

    def test_outputCopiedWhileTheShimLoads(self) -> None:
        """
        Output is logged while the shim is still loading Twisted
        (L{shimd.earlycopy}): a container that writes more than its pipe
        holds does not wait for the shim.  The shim is held (SIGSTOP) as soon
        as runc has created the container; its copier is not, and logs all of
        the output; the shim then goes on from there, and the log has every
        line once.
        """
        lines = 400_000  # 2.6 MB: more than the container's 1 MiB pipe
        expected = "".join(f"{i}\n" for i in range(1, lines + 1))
        for attempt in range(3):
            c = self.engine.prepare(self.bundle, ["seq", "1", str(lines)], stdout=False, stderr=False)
            try:
                self.engine.spawnShim(c)
                assert c.shim is not None
                deadline = time.monotonic() + 30
                while not os.path.exists(c.path("pid")):
                    self.assertLess(time.monotonic(), deadline, "no pid file")
                    time.sleep(0.001)
                os.kill(c.shim.pid, signal.SIGSTOP)
                log = c.path("console.log")
                try:
                    time.sleep(0.05)  # a copier asked to stop just before is gone by now
                    held = self.copierRunning(c.shim.pid)
                    self.engine.start(c)
                    while held:
                        with open(log) as f:
                            logged = f.read().count("\n")
                        if logged == lines:
                            break
                        if time.monotonic() > deadline:
                            with open(c.path("shim-log.json")) as f:
                                self.fail(f"{logged} of {lines} lines logged; shim log: {f.read()}")
                        time.sleep(0.05)
                finally:
                    os.kill(c.shim.pid, signal.SIGCONT)
                _, _, status = self.engine.collect(c, timeout=60)
                self.assertEqual(status, 0)
                self.assertEqual(self.engine.reapShim(c), 0)
                self.assertEqual(reassemble(readRecords([log]), "stdout"), expected)
                with open(c.path("shim-log.json")) as f:
                    shimLog = f.read()
                # The copier ran (and, held or not, handed over to the shim).
                self.assertIn(" bytes of output while loading; the copier stopped: ", shimLog)
                if held:
                    self.assertIn(f"copied {len(expected)} bytes of output while loading; "
                                  "the copier stopped: end of file on every pipe", shimLog)
                    return
            finally:
                self.engine.close(c)
        raise SkipTest("the shim was up before runc had created the container, three times: "
                       "its copier had nothing to show")

    def copierRunning(self, shimPid: int) -> bool:
        """Whether the shim has a child that is a copy of itself (its copier), alive."""
        with open(f"/proc/{shimPid}/cmdline", "rb") as f:
            cmdline = f.read()
        with open(f"/proc/{shimPid}/task/{shimPid}/children") as f:
            children = f.read().split()
        for child in children:
            try:
                with open(f"/proc/{child}/cmdline", "rb") as f:
                    if f.read() != cmdline:
                        continue
            except OSError:
                continue
            if isAlive(int(child)):
                return True
        return False


class StdinTests(EngineMixin, TestCase):
    """C6: the engine closes stdin; cat ends."""

    def setUp(self) -> None:
        self.setUpEngine()

    def test_helloThenClose(self) -> None:
        def one(i: int) -> None:
            r = self.runContainer(["cat"], stdinData=b"hello\n", timeout=20)
            self.assertEqual((r.stdout, r.status), (b"hello\n", 0))

        parallel(one, repeat(200))

    def test_closeWithoutInput(self) -> None:
        def one(i: int) -> None:
            r = self.runContainer(["cat"], stdinData=b"", timeout=20)
            self.assertEqual((r.stdout, r.status), (b"", 0))

        parallel(one, repeat(50))

    def test_closeBeforeStart(self) -> None:
        r = self.runContainer(["cat"], closeStdinBeforeStart=True, timeout=20)
        self.assertEqual((r.stdout, r.status), (b"", 0))

    def test_noStdinMeansEOF(self) -> None:
        """open_stdin false and no stdin FIFO: the container sees end of file."""
        r = self.runContainer(["cat"], timeout=20)
        self.assertEqual((r.stdout, r.status), (b"", 0))

    def test_bigInput(self) -> None:
        data = b"".join(b"%d\n" % i for i in range(200000))
        r = self.runContainer(["cat"], stdinData=data, timeout=60)
        self.assertEqual(r.stdout, data)


class RotationTests(EngineMixin, TestCase):
    """json-file rotation with logMaxsize 4096."""

    def setUp(self) -> None:
        self.setUpEngine()

    def rotated(self, maxfile: int) -> None:
        r = self.runContainer(["seq", "1", "5000"], logMaxsize=4096, logMaxfile=maxfile)
        names = sorted(n for n in os.listdir(r.workdir) if n.startswith("console.log"))
        expectedNames = ["console.log"] + [f"console.log.{i}" for i in range(1, maxfile)]
        self.assertEqual(names, sorted(expectedNames))
        paths = [os.path.join(r.workdir, n) for n in reversed(expectedNames)]
        for p in paths:
            self.assertLessEqual(os.path.getsize(p), 4096)
        kept = reassemble(readRecords(paths), "stdout")
        full = "".join(f"{i}\n" for i in range(1, 5001))
        self.assertTrue(full.endswith(kept))
        self.assertTrue(kept.endswith("4999\n5000\n"))
        for p in paths[:-1]:  # rotated files were filled up to the next record
            self.assertGreater(os.path.getsize(p), 4096 - 100)

    def test_maxfile1(self) -> None:
        self.rotated(1)

    def test_maxfile3(self) -> None:
        self.rotated(3)


class CommandTests(EngineMixin, TestCase):
    """shimd run and twistd shimd run the same container."""

    def setUp(self) -> None:
        self.setUpEngine()

    def test_shimdRun(self) -> None:
        from tests.e2e import BIN

        p = subprocess.run(
            [os.path.join(BIN, "shimd"), "run", "--state-root", self.stateRoot, "--",
             "sh", "-c", "echo hi; exit 3"],
            capture_output=True, timeout=60, cwd="/",
        )
        self.assertEqual((p.stdout, p.returncode), (b"hi\n", 3), p.stderr)
        self.assertEqual(os.listdir(os.path.join(self.stateRoot, "runc")), [])

    def test_shimdRunKeep(self) -> None:
        """--keep: the ended container's workdir stays, with its log and exit code, and is named."""
        from tests.e2e import BIN

        p = subprocess.run(
            [os.path.join(BIN, "shimd"), "run", "--keep", "--state-root", self.stateRoot, "--",
             "sh", "-c", "echo kept; exit 4"],
            capture_output=True, timeout=60, cwd="/",
        )
        self.assertEqual((p.stdout, p.returncode), (b"kept\n", 4), p.stderr)
        (workdir,) = [os.path.join(self.stateRoot, "runc", n) for n in os.listdir(os.path.join(self.stateRoot, "runc"))]
        self.assertEqual(p.stderr.decode(), f"shimd: the workdir is kept: {workdir}\n")
        with open(os.path.join(workdir, "exit")) as f:
            self.assertEqual(f.read(), "4")
        self.assertEqual([r["log"] for r in readRecords([os.path.join(workdir, "console.log")])], ["kept\n"])

    def test_shimdRunBadInput(self) -> None:
        """Bad input: one clear line, exit 125, no workdir left behind."""
        from tests.e2e import BIN

        for args, says in ((["--bundle", "/nonexistent"], "not an OCI bundle"),
                           (["--id", "bad/id"], "bad container id"),
                           (["--runtime", "nosuchruntime"], "not found")):
            p = subprocess.run([os.path.join(BIN, "shimd"), "run", "--state-root", self.stateRoot, *args,
                                "--", "true"], capture_output=True, timeout=60, cwd="/")
            self.assertEqual(p.returncode, 125, p.stderr)
            self.assertIn(says, p.stderr.decode())
            self.assertNotIn(b"Traceback", p.stderr)
        left = [os.path.join(d, n) for d, _, ns in os.walk(self.stateRoot) for n in ns]
        self.assertEqual(left, [])

    def test_shimdRunReaderGone(self) -> None:
        """shimd run -- yes | head: the container is stopped, exit 141, nothing left."""
        from tests.e2e import BIN

        p = subprocess.run(
            f"{os.path.join(BIN, 'shimd')} run --state-root {self.stateRoot} -- yes | head -2; "
            "exit ${PIPESTATUS[0]}",
            shell=True, executable="/bin/bash", capture_output=True, timeout=60, cwd="/",
        )
        self.assertEqual((p.stdout, p.returncode), (b"y\ny\n", 141), p.stderr)
        self.assertNotIn(b"Traceback", p.stderr)
        self.assertEqual(os.listdir(os.path.join(self.stateRoot, "runc")), [])

    def test_twistd(self) -> None:
        from tests.e2e import BIN

        c = self.engine.prepare(self.bundle, ["sh", "-c", "echo from twistd; exit 7"])
        try:
            p = subprocess.run(
                [os.path.join(BIN, "twistd"), "-n", "--pidfile=", "shimd", "--workdir", c.workdir,
                 "--id", c.id, "--bundle", c.bundle, "--start"],
                capture_output=True, timeout=60, cwd="/",
            )
            self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
            out, _, status = self.engine.collect(c, timeout=10)
            self.assertEqual((out, status), (b"from twistd\n", 7))
            with open(c.path("exit")) as f:
                self.assertEqual(f.read(), "7")
        finally:
            self.engine.close(c)

    def test_runtimeFailure(self) -> None:
        """runc create fails: exit 1, runc's message in the shim log, no status."""
        c = self.engine.prepare(self.bundle, ["/no/such/binary"])
        try:
            self.engine.spawnShim(c)
            code = self.engine.reapShim(c)
            self.assertEqual(code, 1)
            self.assertEqual(c.shimStatus, b"")
            errors = self.engine.shimErrors(c)
            self.assertIn("runc create failed", errors)
            self.assertIn("/no/such/binary", errors)
        finally:
            self.engine.close(c)


class GoneReaderTests(EngineMixin, TestCase):
    """Issue 2, point 6: gone and stalled engine readers are dropped; the rest carries on."""

    def setUp(self) -> None:
        self.setUpEngine()

    def test_readerCloses(self) -> None:
        """The engine closes its stdout FIFO: the container finishes, the log has everything."""

        def closeStdout(c: object) -> None:
            os.close(c.fds.pop("stdout"))  # type: ignore[attr-defined]

        r = self.runContainer(["sh", "-c", "seq 1 200000; echo done >&2"], between=closeStdout)
        self.assertEqual((r.status, r.stderr), (0, b"done\n"))
        self.assertEqual(reassemble(r.records, "stdout"), "".join(f"{i}\n" for i in range(1, 200001)))

    def test_stalledReaderDropped(self) -> None:
        """A reader that never reads is dropped after the stall timeout (1 s here, via twistd)."""
        from tests.e2e import BIN

        c = self.engine.prepare(self.bundle, ["sh", "-c", "seq 1 300000; echo done >&2"])
        try:
            p = subprocess.Popen(
                [os.path.join(BIN, "twistd"), "-n", "--pidfile=", "shimd", "--workdir", c.workdir,
                 "--id", c.id, "--bundle", c.bundle, "--start", "--stall-timeout", "1"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/",
            )
            stdoutFd = c.fds.pop("stdout")  # held open, never read
            try:
                _, err, status = self.engine.collect(c, timeout=30)
            finally:
                os.close(stdoutFd)
            self.assertEqual(p.wait(timeout=30), 0)
            self.assertEqual((status, err), (0, b"done\n"))
            records = readRecords([c.path("console.log")])
            self.assertEqual(reassemble(records, "stdout"), "".join(f"{i}\n" for i in range(1, 300001)))
            with open(c.path("shim-log.json")) as f:
                self.assertIn("made no progress", f.read())
        finally:
            self.engine.close(c)


class ContainerActionTests(EngineMixin, TestCase):
    def setUp(self) -> None:
        self.setUpEngine()

    def test_sighupIsReboot(self) -> None:
        """Status 129 (as for SIGHUP): runc kill/delete run with CONTAINER_ACTION=reboot."""
        from tests.e2e import BIN

        os.mkdir(os.path.join(self.stateRoot, "bin"))
        spy = os.path.join(self.stateRoot, "bin", "runc-spy")
        seen = os.path.join(self.stateRoot, "actions")
        with open(spy, "w") as f:
            f.write(f'#!/bin/sh\necho "$* ${{CONTAINER_ACTION:-none}}" >> {seen}\nexec runc "$@"\n')
        os.chmod(spy, 0o755)
        from shimd.engine import Engine

        self.engine = Engine(stateRoot=self.stateRoot, runtime=spy)
        r = self.runContainer(["sh", "-c", "exit 129"])  # init cannot die of an unhandled SIGHUP
        self.assertEqual(r.status, 129)
        with open(seen) as f:
            lines = f.read().splitlines()
        self.assertTrue(any(" create " in l and l.endswith(" none") for l in lines), lines)
        self.assertTrue(any(" delete " in l and l.endswith(" reboot") for l in lines), lines)
