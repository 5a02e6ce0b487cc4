"""
Tests for L{shimd.logfile}.
"""

from __future__ import annotations

import json
import os
import random
import re
import stat
from typing import Any

from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from shimd.logfile import JsonFileLog, formatTime

T0 = 1796315585_123456789
"""2026-12-03T16:33:05.123456789Z in nanoseconds."""

TIME_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z$")


class LogTestBase(SynchronousTestCase):
    """
    A temporary directory, a L{Clock} and a fake nanosecond clock that
    follows it.
    """

    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "console.log")
        self.clock = Clock()

    def timeNs(self) -> int:
        return T0 + int(round(self.clock.seconds() * 1e9))

    def makeLog(self, **kw: Any) -> JsonFileLog:
        kw.setdefault("clock", self.clock)
        kw.setdefault("timeNs", self.timeNs)
        log = JsonFileLog(self.path, **kw)
        self.addCleanup(log.close)
        return log

    def rawLines(self, path: str | None = None) -> list[bytes]:
        """
        The file's lines; it must be empty or end with C{\\n}.
        """
        with open(path or self.path, "rb") as f:
            data = f.read()
        if data:
            self.assertEqual(data[-1:], b"\n")
        return data.splitlines(keepends=True)

    def records(self, path: str | None = None) -> list[dict[str, str]]:
        """
        Every line of the file, parsed; each must be valid compact JSON with
        keys log, stream, time in that order.
        """
        result = []
        for line in self.rawLines(path):
            line.decode("utf-8")  # strict: the file is valid UTF-8
            rec = json.loads(line)
            self.assertEqual(list(rec), ["log", "stream", "time"])
            self.assertIn(rec["stream"], ("stdout", "stderr"))
            self.assertRegex(rec["time"], TIME_RE)
            self.assertTrue(line.startswith(b'{"log":"'), line)
            self.assertIn(
                b'","stream":"' + rec["stream"].encode() + b'","time":"', line
            )
            result.append(rec)
        return result

    def logs(self, path: str | None = None) -> list[str]:
        return [r["log"] for r in self.records(path)]


class LineAssemblyTests(LogTestBase):
    def test_completeLine(self) -> None:
        """
        A complete line is one compact record including its C{\\n}.
        """
        log = self.makeLog()
        log.write("stdout", b"hello\n")
        self.assertEqual(
            self.rawLines(),
            [
                b'{"log":"hello\\n","stream":"stdout",'
                b'"time":"2026-12-03T16:33:05.123456789Z"}\n'
            ],
        )
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_fileModeAndAppend(self) -> None:
        """
        A new file gets mode 0600; an existing file is appended to.
        """
        log = self.makeLog()
        log.write("stdout", b"one\n")
        log.close()
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        log2 = self.makeLog()
        log2.write("stdout", b"two\n")
        self.assertEqual(self.logs(), ["one\n", "two\n"])

    def test_severalLines(self) -> None:
        """
        Several lines in one chunk give one record each, all with the same
        time (one timestamp per chunk).
        """
        log = self.makeLog()
        log.write("stdout", b"a\nbb\n\nccc\n")
        recs = self.records()
        self.assertEqual([r["log"] for r in recs], ["a\n", "bb\n", "\n", "ccc\n"])
        self.assertEqual({r["time"] for r in recs}, {formatTime(T0).decode()})

    def test_oneWritePerChunk(self) -> None:
        """
        A chunk of many printable lines is written with a single
        C{os.write}.
        """
        calls: list[int] = []
        realWrite = os.write

        def write(fd: int, data: Any) -> int:
            calls.append(len(data))
            return realWrite(fd, data)

        log = self.makeLog(maxSize=10 * 1024 * 1024, maxFiles=2)
        chunk = b"".join(b"%099d\n" % (i,) for i in range(655))
        self.patch(os, "write", write)
        log.write("stdout", chunk + b"part")
        self.assertEqual(len(calls), 1)
        self.assertEqual(self.logs(), [b"%099d\n".decode() % (i,) for i in range(655)])

    def test_lineSplitAcrossChunks(self) -> None:
        """
        A line arriving in several chunks is one record, written when its
        C{\\n} arrives; the timer is cancelled.
        """
        log = self.makeLog()
        log.write("stdout", b"hel")
        log.write("stdout", b"lo wor")
        self.assertEqual(self.logs(), [])
        log.write("stdout", b"ld\nnext")
        self.assertEqual(self.logs(), ["hello world\n"])
        log.write("stdout", b"\n")
        self.assertEqual(self.logs(), ["hello world\n", "next\n"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_partialAfterDelay(self) -> None:
        """
        Field case C3: a prompt is written about 1 s after it arrived, and
        the records reassemble to the output.
        """
        log = self.makeLog()
        log.write("stdout", b"line1\nprompt> ")
        self.assertEqual(self.logs(), ["line1\n"])
        self.clock.advance(0.9)
        self.assertEqual(self.logs(), ["line1\n"])
        self.clock.advance(0.1)
        recs = self.records()
        self.assertEqual([r["log"] for r in recs], ["line1\n", "prompt> "])
        self.assertEqual(recs[1]["time"], formatTime(T0 + 10**9).decode())
        self.clock.advance(1)
        log.write("stdout", b"rest\n")
        self.assertEqual(self.logs(), ["line1\n", "prompt> ", "rest\n"])
        self.assertEqual("".join(self.logs()), "line1\nprompt> rest\n")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_partialDelayFromFirstPending(self) -> None:
        """
        The delay counts from when the partial line first became pending,
        not from its last growth.
        """
        log = self.makeLog(partialDelay=2.0)
        log.write("stdout", b"a")
        self.clock.advance(1.5)
        log.write("stdout", b"b")
        self.clock.advance(0.4)
        self.assertEqual(self.logs(), [])
        self.clock.advance(0.1)
        self.assertEqual(self.logs(), ["ab"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_partialDelayFromSince(self) -> None:
        """
        Output read earlier by another process (L{shimd.earlycopy}) is held
        C{partialDelay} from when it was read, not from when it is logged;
        its complete lines are logged at once.
        """
        log = self.makeLog()
        self.clock.advance(5)
        log.write("stdout", b"line\nprompt> ", since=4.3)
        self.assertEqual(self.logs(), ["line\n"])
        self.clock.advance(0.29)
        self.assertEqual(self.logs(), ["line\n"])
        self.clock.advance(0.01)
        self.assertEqual(self.logs(), ["line\n", "prompt> "])
        log.write("stdout", b"late", since=1.0)  # long overdue: at the next turn
        self.clock.advance(0)
        self.assertEqual(self.logs(), ["line\n", "prompt> ", "late"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_newPartialAfterLine(self) -> None:
        """
        Bytes after a consumed partial start a new delay.
        """
        log = self.makeLog()
        log.write("stdout", b"a")
        self.clock.advance(0.5)
        log.write("stdout", b"\nb")
        self.clock.advance(0.9)
        self.assertEqual(self.logs(), ["a\n"])
        self.clock.advance(0.1)
        self.assertEqual(self.logs(), ["a\n", "b"])

    def test_oneTimerForManyChunks(self) -> None:
        """
        Chunks that each end mid-line keep one timer armed (no timer work
        per chunk), and each partial line still waits its full delay.
        """
        log = self.makeLog()
        log.write("stdout", b"a")
        armed = self.clock.getDelayedCalls()
        self.assertEqual(len(armed), 1)
        for i in range(5):
            self.clock.advance(0.1)
            log.write("stdout", b"\nb%d" % (i,))
        self.assertEqual(self.clock.getDelayedCalls(), armed)
        self.clock.advance(0.5)
        self.assertEqual(self.logs(), ["a\n", "b0\n", "b1\n", "b2\n", "b3\n"])
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(0.5)
        self.assertEqual(self.logs()[-1], "b4")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_partialMax(self) -> None:
        """
        A held partial line is written in C{partialMax}-sized pieces.
        """
        log = self.makeLog(partialMax=10)
        log.write("stdout", b"x" * 9)
        self.assertEqual(self.logs(), [])
        log.write("stdout", b"y" * 16)
        self.assertEqual(self.logs(), ["x" * 9 + "y", "y" * 10])
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        log.write("stdout", b"w" * 5)
        self.assertEqual(self.logs()[2:], ["yyyyywwwww"])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        log.write("stdout", b"z\n")
        self.assertEqual(self.logs()[3:], ["z\n"])

    def test_partialMaxUtf8(self) -> None:
        """
        A C{partialMax} piece does not end inside a UTF-8 sequence.
        """
        log = self.makeLog(partialMax=4)
        log.write("stdout", "abc\u00e9".encode())
        self.assertEqual(self.logs(), ["abc"])
        log.close()
        self.assertEqual(self.logs(), ["abc", "\u00e9"])

    def test_flushAtClose(self) -> None:
        """
        Field case C3: C{printf abcd} then exit gives exactly one record
        without C{\\n}; close cancels the timer, is idempotent, and later
        writes are ignored.
        """
        log = self.makeLog()
        log.write("stdout", b"abcd")
        log.close()
        self.assertEqual(len(self.rawLines()), 1)
        self.assertEqual(self.logs(), ["abcd"])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        log.close()
        log.write("stdout", b"late\n")
        self.clock.advance(5)
        self.assertEqual(self.logs(), ["abcd"])

    def test_flush(self) -> None:
        """
        L{JsonFileLog.flush} writes every held partial line now.
        """
        log = self.makeLog()
        log.write("stdout", b"out")
        log.write("stderr", b"err")
        log.flush()
        self.assertEqual(
            [(r["stream"], r["log"]) for r in self.records()],
            [("stdout", "out"), ("stderr", "err")],
        )
        self.assertEqual(self.clock.getDelayedCalls(), [])
        log.flush()
        self.assertEqual(len(self.records()), 2)

    def test_streamsIndependent(self) -> None:
        """
        stdout and stderr are assembled separately.
        """
        log = self.makeLog()
        log.write("stdout", b"out-")
        log.write("stderr", b"err-")
        log.write("stdout", b"1\n")
        log.write("stderr", b"2\n")
        self.assertEqual(
            [(r["stream"], r["log"]) for r in self.records()],
            [("stdout", "out-1\n"), ("stderr", "err-2\n")],
        )


class EncodingTests(LogTestBase):
    def test_escaping(self) -> None:
        """
        Quotes, backslashes and control characters are escaped; C{/} is not.
        """
        log = self.makeLog()
        data = b'q"b\\s\tt\rr\x08b\x0cf\x01\x1f\x7f/x\n'
        log.write("stdout", data)
        (line,) = self.rawLines()
        self.assertTrue(
            line.startswith(
                b'{"log":"q\\"b\\\\s\\tt\\rr\\bb\\ff\\u0001\\u001f'
            ),
            line,
        )
        self.assertIn(b"/x\\n", line)
        self.assertEqual(self.logs(), [data.decode()])

    def test_allControlBytes(self) -> None:
        """
        Every byte below 0x80 survives the round trip, also in a partial.
        """
        log = self.makeLog()
        data = bytes(range(128))
        log.write("stderr", data)
        log.flush()
        self.assertEqual("".join(self.logs()), data.decode())

    def test_escapingLargeChunks(self) -> None:
        """
        Every byte value is detected and escaped also in chunks large enough
        for the C{memchr} scan, wherever it is in the chunk.
        """
        log = self.makeLog()
        expected = []
        for value in range(256):
            if value == 0x0A:
                continue
            for pos in (0, 2999):
                chunk = bytearray(b"x" * 3000 + b"\n")
                chunk[pos] = value
                log.write("stdout", bytes(chunk))
                expected.append(bytes(chunk).decode("utf-8", "replace"))
        self.assertEqual(self.logs(), expected)

    def test_invalidUtf8(self) -> None:
        """
        Field case C4: invalid UTF-8 is written as U+FFFD, every line is
        valid JSON, and the logger keeps going.
        """
        log = self.makeLog()
        bad = b"\355\253\356\333\003\000\377\n"
        log.write("stdout", bad)
        log.write("stdout", b"after\n")
        logs = self.logs()
        self.assertEqual(logs, [bad.decode("utf-8", "replace"), "after\n"])
        self.assertIn("\ufffd", logs[0])
        self.assertIn("\x03\x00", logs[0])

    def test_validUtf8Raw(self) -> None:
        """
        Valid multi-byte UTF-8 is written as raw UTF-8, not as escapes.
        """
        log = self.makeLog()
        text = "h\u00e9llo \u4e16\u754c \U0001f600\n"
        log.write("stdout", text.encode())
        (line,) = self.rawLines()
        self.assertIn(text[:-1].encode(), line)
        self.assertNotIn(b"\\u", line)
        self.assertEqual(self.logs(), [text])

    def test_timeFormat(self) -> None:
        """
        The time is UTC RFC 3339 with 9 fractional digits, from C{timeNs}.
        """
        log = self.makeLog(timeNs=lambda: 5)
        log.write("stdout", b"x\n")
        (rec,) = self.records()
        self.assertEqual(rec["time"], "1970-01-01T00:00:00.000000005Z")
        self.assertRegex(rec["time"], TIME_RE)
        self.assertEqual(formatTime(T0), b"2026-12-03T16:33:05.123456789Z")


class RotationTests(LogTestBase):
    def files(self) -> list[str]:
        return sorted(os.listdir(self.dir))

    def keptLogs(self, maxFiles: int) -> list[str]:
        """
        All records in rotation order (oldest file first).
        """
        paths = [f"{self.path}.{i}" for i in range(maxFiles - 1, 0, -1)]
        paths.append(self.path)
        logs: list[str] = []
        for p in paths:
            if os.path.exists(p):
                self.assertLessEqual(os.path.getsize(p), 4096)
                logs.extend(self.logs(p))
        return logs

    def feed(self, log: JsonFileLog, total: int, seed: int = 1) -> bytes:
        """
        Write about C{total} bytes of lines of random lengths in random
        chunks; return them.
        """
        rnd = random.Random(seed)
        data = b"".join(
            b"%d:" % (i,) + b"x" * rnd.randrange(0, 300) + b"\n"
            for i in range(total // 150)
        )
        pos = 0
        while pos < len(data):
            n = rnd.randrange(1, 2000)
            log.write("stdout", data[pos : pos + n])
            pos += n
        log.close()
        return data

    def test_rotateThreeFiles(self) -> None:
        """
        With maxSize 4096 and maxFiles 3 exactly console.log, .1 and .2
        exist, each <= 4096 bytes, and the kept records are exactly the
        last whole lines of the input.
        """
        log = self.makeLog(maxSize=4096, maxFiles=3)
        data = self.feed(log, 60000)
        self.assertEqual(
            self.files(), ["console.log", "console.log.1", "console.log.2"]
        )
        kept = "".join(self.keptLogs(3)).encode()
        self.assertTrue(data.endswith(kept))
        self.assertEqual(data[: len(data) - len(kept)][-1:], b"\n")
        # Rotated files are nearly full: nothing is dropped early.
        for p in (self.path + ".1", self.path + ".2"):
            self.assertGreater(os.path.getsize(p), 4096 - 600)

    def test_rotateNoLoss(self) -> None:
        """
        With enough files nothing is lost or duplicated across rotations.
        """
        log = self.makeLog(maxSize=4096, maxFiles=50)
        data = self.feed(log, 40000, seed=2)
        self.assertIn("console.log.5", self.files())
        self.assertNotIn("console.log.49", self.files())
        self.assertEqual("".join(self.keptLogs(50)).encode(), data)

    def test_oneFile(self) -> None:
        """
        maxFiles 1 keeps exactly one file, truncated on rotation (not iSulad
        bug B15).
        """
        log = self.makeLog(maxSize=4096, maxFiles=1)
        data = self.feed(log, 30000)
        self.assertEqual(self.files(), ["console.log"])
        self.assertLessEqual(os.path.getsize(self.path), 4096)
        kept = "".join(self.logs()).encode()
        self.assertTrue(kept)
        self.assertTrue(data.endswith(kept))

    def test_maxFilesBelowOne(self) -> None:
        """
        maxFiles below 1 is raised to 1.
        """
        log = self.makeLog(maxSize=4096, maxFiles=0)
        self.feed(log, 20000)
        self.assertEqual(self.files(), ["console.log"])

    def test_maxSizeRaised(self) -> None:
        """
        maxSize below 4096 is raised to 4096.
        """
        log = self.makeLog(maxSize=100, maxFiles=2)
        self.assertEqual(log.maxSize, 4096)
        self.feed(log, 20000)
        self.assertEqual(self.files(), ["console.log", "console.log.1"])
        self.assertGreater(os.path.getsize(self.path + ".1"), 3000)
        self.assertLessEqual(os.path.getsize(self.path + ".1"), 4096)

    def test_noRotation(self) -> None:
        """
        maxSize 0 never rotates.
        """
        log = self.makeLog(maxSize=0, maxFiles=3)
        data = self.feed(log, 30000)
        self.assertEqual(self.files(), ["console.log"])
        self.assertEqual("".join(self.logs()).encode(), data)

    def test_existingFileCounts(self) -> None:
        """
        The size of an existing file counts towards maxSize.
        """
        with open(self.path, "wb") as f:
            f.write(b'{"log":"old\\n","stream":"stdout","time":"x"}\n' * 90)
        log = self.makeLog(maxSize=4096, maxFiles=2)
        log.write("stdout", b"y" * 100 + b"\n")
        self.assertEqual(self.files(), ["console.log", "console.log.1"])
        self.assertEqual(self.logs(), ["y" * 100 + "\n"])

    def test_oversizeLine(self) -> None:
        """
        A line longer than maxSize is split into records of at most maxSize
        bytes that reassemble to the line.
        """
        log = self.makeLog(maxSize=4096, maxFiles=20)
        line = b"".join(b"%d," % (i % 10) for i in range(10000))[:20000] + b"\n"
        self.assertEqual(len(line), 20001)
        log.write("stdout", b"before\n" + line + b"after\n")
        log.close()
        logs = self.keptLogs(20)
        self.assertGreater(len(logs), 6)
        self.assertEqual("".join(logs).encode(), b"before\n" + line + b"after\n")
        self.assertEqual(logs[0], "before\n")
        self.assertEqual(logs[-1], "after\n")
        for p in os.listdir(self.dir):
            for raw in self.rawLines(os.path.join(self.dir, p)):
                self.assertLessEqual(len(raw), 4096)

    def test_oversizeEscapedSplit(self) -> None:
        """
        Splitting an oversize line never cuts a JSON escape or a UTF-8
        sequence, whatever the cut position.
        """
        unit = '"\\\x01\t\u00e9\u4e16\U0001f600ab'.encode()
        for shift in range(12):
            for name in os.listdir(self.dir):
                os.unlink(os.path.join(self.dir, name))
            log = JsonFileLog(
                self.path,
                maxSize=4096,
                maxFiles=30,
                clock=self.clock,
                timeNs=self.timeNs,
            )
            line = b"a" * shift + unit * 700
            log.write("stderr", line + b"\n")
            log.write("stderr", line)
            log.close()
            logs = self.keptLogs(30)
            joined = "".join(logs).encode()
            self.assertEqual(joined, line + b"\n" + line)
            self.assertNotIn("\ufffd", "".join(logs))
            for p in os.listdir(self.dir):
                for raw in self.rawLines(os.path.join(self.dir, p)):
                    self.assertLessEqual(len(raw), 4096)

    def test_oversizePartial(self) -> None:
        """
        A held partial line larger than maxSize is split at flush.
        """
        log = self.makeLog(maxSize=4096, maxFiles=10, partialMax=1 << 20)
        log.write("stdout", b"p" * 20000)
        log.close()
        logs = self.keptLogs(10)
        self.assertEqual("".join(logs), "p" * 20000)
        self.assertGreater(len(logs), 4)


class ErrorTests(LogTestBase):
    def test_writeErrorLogged(self) -> None:
        """
        A write error is logged once, never raised, and writing resumes on
        a later call.
        """
        log = self.makeLog()
        events: list[dict[str, Any]] = []
        log.log = Logger(observer=events.append)
        log.write("stdout", b"first\n")
        saved = os.dup(log._fd)
        self.addCleanup(os.close, saved)
        os.close(log._fd)
        log.write("stdout", b"lost1\n")
        log.write("stdout", b"lost2\n")
        self.assertEqual(len(events), 1)
        self.assertIn("Cannot write", events[0]["log_format"])
        os.dup2(saved, log._fd)
        log.write("stdout", b"second\n")
        self.assertEqual(self.logs(), ["first\n", "second\n"])

    def test_closeWithFdGone(self) -> None:
        """
        close() with the descriptor closed underneath does not raise.
        """
        log = self.makeLog()
        log.log = Logger(observer=lambda e: None)
        log.write("stdout", b"pending")
        os.close(log._fd)
        log.close()
        log.close()

    def test_openFailure(self) -> None:
        """
        A log in a missing directory does not raise; writes are dropped and
        the failure is logged once.
        """
        events: list[dict[str, Any]] = []
        self.patch(JsonFileLog, "log", Logger(observer=events.append))
        log = JsonFileLog(
            os.path.join(self.dir, "missing", "x.log"), clock=self.clock
        )
        log.write("stdout", b"x\n")
        log.write("stdout", b"y\n")
        log.close()
        self.assertEqual(len(events), 1)
        self.assertIn("Cannot open", events[0]["log_format"])
        self.assertEqual(os.listdir(self.dir), [])
