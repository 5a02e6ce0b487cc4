"""
Tests for L{shimd.shimlog}.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import re
import shutil
import stat
import sys
import tempfile
import time
from typing import Any

from twisted.logger import Logger, LogLevel, globalLogBeginner
from twisted.trial.unittest import SynchronousTestCase

from shimd.shimlog import (
    LEVELS,
    SHIM_LOG_NAME,
    ClosableFilteringObserver,
    jsonLineObserver,
    parseLevel,
    startShimLogging,
)

TIME_RE = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}$")


def tempDir(case: SynchronousTestCase) -> str:
    """
    @return: A new empty directory, removed when C{case} ends.
    """
    path = tempfile.mkdtemp(prefix="shimd-test-")
    case.addCleanup(shutil.rmtree, path, True)
    return path


def readLines(path: str) -> list[dict[str, Any]]:
    """
    Read a JSON-lines file, asserting that it splits into whole lines.

    @return: The decoded objects, one per line.
    """
    with open(path, "rb") as f:
        data = f.read()
    if not data:
        return []
    assert data.endswith(b"\n"), data
    # bytes.split on b"\n" only: every event must be exactly one such line.
    return [json.loads(line.decode("utf-8")) for line in data[:-1].split(b"\n")]


class LevelsTests(SynchronousTestCase):
    """
    Level names.
    """

    def test_names(self) -> None:
        """
        The documented names map to Twisted levels.
        """
        self.assertEqual(LEVELS["debug"], LogLevel.debug)
        self.assertEqual(LEVELS["info"], LogLevel.info)
        self.assertEqual(LEVELS["warn"], LogLevel.warn)
        self.assertEqual(LEVELS["warning"], LogLevel.warn)
        self.assertEqual(LEVELS["error"], LogLevel.error)
        self.assertEqual(LEVELS["critical"], LogLevel.critical)
        self.assertEqual(LEVELS["fatal"], LogLevel.critical)
        self.assertEqual(parseLevel("ERROR"), LogLevel.error)

    def test_unknown(self) -> None:
        """
        Unknown names raise L{ValueError}, including from
        L{jsonLineObserver}, which then creates no file.
        """
        self.assertRaises(ValueError, parseLevel, "verbose")
        path = os.path.join(tempDir(self), "x.json")
        self.assertRaises(ValueError, jsonLineObserver, path, "loud")
        self.assertFalse(os.path.exists(path))


class JSONLineObserverTests(SynchronousTestCase):
    """
    Tests for L{jsonLineObserver}.
    """

    def setUp(self) -> None:
        self.path = os.path.join(tempDir(self), SHIM_LOG_NAME)

    def observer(self, level: str = "info", prefix: str | None = None) -> Any:
        """
        @return: An observer on C{self.path}, closed at cleanup.
        """
        obs = jsonLineObserver(self.path, level, prefix)
        self.addCleanup(obs.close)
        return obs

    def test_oneValidLinePerEvent(self) -> None:
        """
        Quotes, backslashes, newlines, long and non-ASCII messages each give
        exactly one valid JSON line with the full text (no B9 truncation).
        """
        log = Logger(namespace="shimd.test", observer=self.observer())
        messages = [
            'open "/run/isulad/a b" failed',
            "line one\nline two\r\n\ttabbed\x00nul\x1b[0m",
            "back\\slash {\"json\": true}",
            "x" * 500,
            "容器 échec — ünïcødé ✓ 🐳",
            "sep\u2028arators\u2029and\x85nel",
        ]
        for m in messages:
            log.info("{m}", m=m)
        lines = readLines(self.path)
        self.assertEqual([line["msg"] for line in lines], messages)
        for line in lines:
            self.assertEqual(set(line), {"time", "level", "msg"})
            self.assertEqual(line["level"], "info")
        with open(self.path, "rb") as f:
            raw = f.read().decode("utf-8")
        self.assertIn("容器", raw)  # ensure_ascii=False
        self.assertEqual(len(raw.splitlines()), len(messages))

    def test_loneSurrogate(self) -> None:
        """
        A message holding a lone surrogate (an undecodable file name) is
        still written as valid JSON.
        """
        log = Logger(namespace="shimd.test", observer=self.observer())
        name = os.fsdecode(b"/tmp/\xff")
        log.error("bad path {p}", p=name)
        [line] = readLines(self.path)
        self.assertEqual(line["msg"], "bad path " + name)

    def test_formatKeys(self) -> None:
        """
        The line uses iSulad's keys, in order, with the local time format.
        """
        log = Logger(namespace="shimd.test", observer=self.observer())
        log.warn("careful")
        with open(self.path, encoding="utf-8") as f:
            text = f.read()
        self.assertRegex(
            text,
            r'^\{"time": "\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}", '
            r'"level": "warn", "msg": "careful"\}\n$',
        )

    def test_timeFormat(self) -> None:
        """
        time is the event's local time as C{YYYY-MM-DD HH:MM:SS}.
        """
        obs = self.observer()
        when = 1700000000.75
        obs(
            {
                "log_time": when,
                "log_level": LogLevel.info,
                "log_namespace": "shimd.test",
                "log_format": "fixed",
            }
        )
        [line] = readLines(self.path)
        self.assertRegex(line["time"], TIME_RE)
        self.assertEqual(
            line["time"], time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))
        )

    def test_levels(self) -> None:
        """
        Each Twisted level is written by its name; warn is C{"warn"}.
        """
        log = Logger(namespace="shimd.test", observer=self.observer("debug"))
        log.debug("d")
        log.info("i")
        log.warn("w")
        log.error("e")
        log.critical("c")
        self.assertEqual(
            [(line["level"], line["msg"]) for line in readLines(self.path)],
            [("debug", "d"), ("info", "i"), ("warn", "w"), ("error", "e"),
             ("critical", "c")],
        )

    def test_levelFiltering(self) -> None:
        """
        At level C{"error"}, info and warn events are dropped.
        """
        log = Logger(namespace="shimd.test", observer=self.observer("error"))
        log.info("dropped info")
        log.warn("dropped warn")
        log.error("kept error")
        log.critical("kept critical")
        self.assertEqual(
            [line["msg"] for line in readLines(self.path)],
            ["kept error", "kept critical"],
        )

    def test_defaultLevelIsInfo(self) -> None:
        """
        By default debug is dropped and info is kept.
        """
        log = Logger(namespace="shimd.test", observer=self.observer())
        log.debug("no")
        log.info("yes")
        self.assertEqual([line["msg"] for line in readLines(self.path)], ["yes"])

    def test_failureTraceback(self) -> None:
        """
        L{Logger.failure} writes the traceback text inside msg, still on one
        line.
        """
        log = Logger(namespace="shimd.test", observer=self.observer())
        try:
            raise ZeroDivisionError("boom-marker")
        except ZeroDivisionError:
            log.failure("runtime failed for {cid}", cid="c1")
        [line] = readLines(self.path)
        self.assertEqual(line["level"], "critical")
        self.assertTrue(line["msg"].startswith("runtime failed for c1\n"))
        self.assertIn("Traceback", line["msg"])
        self.assertIn("ZeroDivisionError", line["msg"])
        self.assertIn("boom-marker", line["msg"])
        self.assertIn("test_failureTraceback", line["msg"])

    def test_namespacePrefix(self) -> None:
        """
        With a namespace prefix only matching events are written.
        """
        obs = self.observer(prefix="shimd.attach")
        Logger(namespace="shimd.attach", observer=obs).info("session opened")
        Logger(namespace="shimd.attach.session", observer=obs).info("nested")
        Logger(namespace="shimd.io", observer=obs).info("other")
        self.assertEqual(
            [line["msg"] for line in readLines(self.path)],
            ["session opened", "nested"],
        )

    def test_fileMode(self) -> None:
        """
        A new file is created with mode 0600 whatever the umask.
        """
        old = os.umask(0)
        try:
            obs = self.observer()
        finally:
            os.umask(old)
        Logger(namespace="shimd.test", observer=obs).info("x")
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)

    def test_existingFileModeFixedAndAppended(self) -> None:
        """
        An existing file is appended to, not truncated, and set to 0600.
        """
        with open(self.path, "w") as f:
            f.write('{"time": "2023-11-07 10:00:00", "level": "info", "msg": "old"}\n')
        os.chmod(self.path, 0o644)
        Logger(namespace="shimd.test", observer=self.observer()).info("new")
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertEqual([line["msg"] for line in readLines(self.path)], ["old", "new"])

    def test_twoObserversSameFile(self) -> None:
        """
        Two observers on the same file (O_APPEND) do not overwrite each
        other.
        """
        a = Logger(namespace="shimd.test", observer=self.observer())
        b = Logger(namespace="shimd.test", observer=self.observer())
        for i in range(20):
            a.info("a{i}", i=i)
            b.info("b{i}", i=i)
        msgs = [line["msg"] for line in readLines(self.path)]
        self.assertEqual(len(msgs), 40)
        self.assertEqual(msgs[:2], ["a0", "b0"])

    def test_close(self) -> None:
        """
        C{close()} closes the file; later events are ignored; closing twice
        is harmless.
        """
        obs = self.observer()
        self.assertIsInstance(obs, ClosableFilteringObserver)
        log = Logger(namespace="shimd.test", observer=obs)
        log.info("before")
        fd = obs.observer._fd
        obs.close()
        self.assertRaises(OSError, os.fstat, fd)
        log.info("after")
        obs.close()
        self.assertEqual([line["msg"] for line in readLines(self.path)], ["before"])

    def test_cloexec(self) -> None:
        """
        The descriptor is close-on-exec, so runc does not inherit it.
        """
        obs = self.observer()
        flags = fcntl.fcntl(obs.observer._fd, fcntl.F_GETFD)
        self.assertTrue(flags & fcntl.FD_CLOEXEC)
        fl = fcntl.fcntl(obs.observer._fd, fcntl.F_GETFL)
        self.assertTrue(fl & os.O_APPEND)

    def test_openFailure(self) -> None:
        """
        An unwritable location raises L{OSError}.
        """
        path = os.path.join(tempDir(self), "missing-dir", SHIM_LOG_NAME)
        self.assertRaises(OSError, jsonLineObserver, path)


class StartShimLoggingTests(SynchronousTestCase):
    """
    Tests for L{startShimLogging} (global log).
    """

    def setUp(self) -> None:
        self.workdir = tempDir(self)
        self.path = os.path.join(self.workdir, SHIM_LOG_NAME)
        self.stderr = io.StringIO()
        self.patch(sys, "stderr", self.stderr)
        self.log = Logger(namespace="shimd.test.global")

    def start(self, **kwargs: Any) -> Any:
        """
        Start shim logging, stopped at cleanup.
        """
        stop = startShimLogging(self.workdir, **kwargs)
        self.addCleanup(stop)
        return stop

    def msgs(self) -> list[str]:
        """
        @return: The messages in shim-log.json from this test's logger.
        """
        return [
            line["msg"]
            for line in readLines(self.path)
            if line["msg"].startswith("t:")
        ]

    def test_fileAndStderr(self) -> None:
        """
        Events go to shim-log.json; only error and above go to stderr as
        C{"shimd: <msg>"}.
        """
        self.start()
        self.log.info("t:hello")
        self.log.error("t:bad {x}", x="thing")
        self.assertEqual(self.msgs(), ["t:hello", "t:bad thing"])
        # Events logged by earlier tests in this process before logging began
        # are replayed too (discardBuffer=False); look at this test's only.
        ours = [line for line in self.stderr.getvalue().splitlines() if line.startswith("shimd: t:")]
        self.assertEqual(ours, ["shimd: t:bad thing"])
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertTrue(globalLogBeginner._temporaryObserver is None)

    def test_noStderr(self) -> None:
        """
        With stderr=False nothing is printed.
        """
        self.start(stderr=False)
        self.log.critical("t:quiet")
        self.assertEqual(self.msgs(), ["t:quiet"])
        self.assertEqual(self.stderr.getvalue(), "")

    def test_level(self) -> None:
        """
        The level argument filters the file.
        """
        self.start(level="warn")
        self.log.info("t:no")
        self.log.warn("t:yes")
        lines = [line for line in readLines(self.path) if line["msg"] == "t:yes"]
        self.assertEqual(self.msgs(), ["t:yes"])
        self.assertEqual(lines[0]["level"], "warn")

    def test_stop(self) -> None:
        """
        The returned function removes the observers and closes the file;
        calling it twice is harmless.
        """
        stop = self.start()
        self.log.error("t:one")
        stop()
        stop()
        self.log.error("t:two")
        self.assertEqual(self.msgs(), ["t:one"])
        self.assertEqual(self.stderr.getvalue(), "shimd: t:one\n")

    def test_twice(self) -> None:
        """
        Starting again after logging has begun still works (observers are
        added to the publisher) and does not log a "begun twice" warning.
        """
        self.start(stderr=False)
        other = tempDir(self)
        stop2 = startShimLogging(other, stderr=False)
        self.addCleanup(stop2)
        self.log.info("t:both")
        self.assertEqual(self.msgs(), ["t:both"])
        with open(os.path.join(other, SHIM_LOG_NAME), encoding="utf-8") as f:
            text = f.read()
        self.assertIn('"msg": "t:both"', text)
        self.assertNotIn("more than once", text)
        self.assertNotIn("selected twice", text)

    def test_warningsAreWarn(self) -> None:
        """
        Python warnings routed through the log beginner are written at level
        C{"warn"}.
        """
        self.start()
        globalLogBeginner.showwarning(
            "t:deprecated thing", DeprecationWarning, "f.py", 12
        )
        [line] = [
            line for line in readLines(self.path) if "t:deprecated thing" in line["msg"]
        ]
        self.assertEqual(line["level"], "warn")
        self.assertIn("DeprecationWarning", line["msg"])
