"""
The isulad-shim front end: argv and process.json errors exit 1 with a
message naming the problem, on stderr and in shim-log.json, and write no
status.  These run the real command; no runc is needed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

from twisted.trial.unittest import TestCase

from tests.e2e import runShimIn


class BadInputTests(TestCase):
    def setUp(self) -> None:
        self.workdir = tempfile.mkdtemp(prefix="shimd-cli-", dir="/tmp")
        self.addCleanup(shutil.rmtree, self.workdir, True)

    def shim(self, processJson: str | None, argv: list[str] | None = None) -> tuple[int, bytes, bytes, list[dict]]:
        if processJson is not None:
            with open(os.path.join(self.workdir, "process.json"), "w") as f:
                f.write(processJson)
        p = runShimIn(self.workdir, argv if argv is not None else ["cid", "/nonexistent-bundle", "runc", "info"])
        records = []
        path = os.path.join(self.workdir, "shim-log.json")
        if os.path.exists(path):
            with open(path, "rb") as f:
                records = [json.loads(line) for line in f.read().splitlines()]
        return p.returncode, p.stdout, p.stderr, records

    def assertRejected(self, processJson: str | None, mentions: str) -> None:
        code, out, err, records = self.shim(processJson)
        self.assertEqual(code, 1)
        self.assertEqual(out, b"", "no status may be written")
        self.assertIn(mentions, err.decode())
        errors = [r["msg"] for r in records if r["level"] == "error"]
        self.assertTrue(any(mentions in m for m in errors), records)

    def test_tooFewArguments(self) -> None:
        code, out, err, _ = self.shim('{"args":["true"],"cwd":"/"}', ["cid", "bundle", "runc"])
        self.assertEqual((code, out), (1, b""))
        self.assertIn(b"usage", err)

    def test_badTimeout(self) -> None:
        code, out, err, _ = self.shim('{"args":["true"],"cwd":"/"}', ["cid", "bundle", "runc", "info", "soon"])
        self.assertEqual((code, out), (1, b""))
        self.assertIn(b"soon", err)

    def test_missingProcessJson(self) -> None:
        self.assertRejected(None, "process.json")

    def test_badJSON(self) -> None:
        self.assertRejected('{"args": ["true"], "cwd": ', "invalid JSON")

    def test_missingCwd(self) -> None:
        self.assertRejected('{"args": ["true"]}', '"cwd"')

    def test_missingArgs(self) -> None:
        self.assertRejected('{"cwd": "/"}', '"args"')

    def test_argsNotAList(self) -> None:
        self.assertRejected('{"args": "true", "cwd": "/"}', '"args"')

    def test_wrongTypeNested(self) -> None:
        self.assertRejected('{"args": ["true"], "cwd": "/", "consoleSize": {"height": 1, "width": "x"}}',
                            "consoleSize.width")

    def test_wrongTypeBool(self) -> None:
        self.assertRejected('{"args": ["true"], "cwd": "/", "terminal": "yes"}', '"terminal"')

    def test_engineFifoWithoutReader(self) -> None:
        """The engine must open its FIFO ends first; if not, say so and exit 1."""
        fifo = os.path.join(self.workdir, "out")
        os.mkfifo(fifo, 0o600)
        self.assertRejected(json.dumps({"args": ["true"], "cwd": "/", "isuladStdout": fifo}), "has no reader")
