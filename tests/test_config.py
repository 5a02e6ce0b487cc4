"""
Tests for L{shimd.config}.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from shimd.config import (
    ConfigError,
    ConsoleSize,
    ProcessState,
    Rlimit,
    User,
    loadProcessState,
    parseProcessState,
)

#: A process.json as iSulad/lcr writes it for a create, with every key set.
FULL: dict[str, Any] = {
    "args": ["/bin/sh", "-c", "echo hi"],
    "cwd": "/root",
    "env": ["PATH=/usr/bin:/bin", "TERM=xterm"],
    "terminal": True,
    "consoleSize": {"height": 24, "width": 80},
    "user": {
        "uid": 1000,
        "gid": 1001,
        "additionalGids": [10, 20],
        "username": "alice",
    },
    "capabilities": {
        "bounding": ["CAP_CHOWN", "CAP_KILL"],
        "permitted": ["CAP_CHOWN"],
        "effective": ["CAP_KILL"],
        "inheritable": [],
        "ambient": ["CAP_NET_BIND_SERVICE"],
    },
    "apparmorProfile": "docker-default",
    "selinuxLabel": "system_u:system_r:container_t:s0",
    "oomScoreAdj": -500,
    "noNewPrivileges": True,
    "rlimits": [
        {"type": "RLIMIT_NOFILE", "soft": 1024, "hard": 4096},
        {"type": "RLIMIT_CORE", "soft": 0, "hard": 18446744073709551615},
    ],
    "exec": True,
    "exit_fifo": "/run/isulad/runc/c1/exit_fifo",
    "attach_socket": "/run/isulad/runc/c1/attach_socket.sock",
    "open_tty": True,
    "open_stdin": True,
    "isuladStdin": "/run/isulad/fifo/in",
    "isuladStdout": "/run/isulad/fifo/out",
    "isuladStderr": "/run/isulad/fifo/err",
    "resizeFifo": "/run/isulad/runc/c1/exec/e1/resize_fifo",
    "runtimeArgs": ["--debug", "--log-format=json"],
    "rootUID": 100000,
    "rootGID": 100001,
    "logPath": "/var/lib/isulad/engines/runc/c1/console.log",
    "logMaxfile": 7,
    "logMaxsize": 1048576,
    "control_fifo": "/run/ctl",
    "checkpoint": "/var/ckpt",
    "runtime": "runc",
    "systemdCgroup": True,
    "noPivotRoot": True,
}

MINIMAL: dict[str, Any] = {"args": ["sh"], "cwd": "/"}


def dump(obj: Any) -> bytes:
    """
    @return: C{obj} as UTF-8 JSON.
    """
    return json.dumps(obj).encode("utf-8")


def tempDir(case: SynchronousTestCase) -> str:
    """
    @return: A new empty directory, removed when C{case} ends.
    """
    path = tempfile.mkdtemp(prefix="shimd-test-")
    case.addCleanup(shutil.rmtree, path, True)
    return path


def withKeys(**changes: Any) -> bytes:
    """
    @return: L{MINIMAL} updated with C{changes}, as JSON bytes.
    """
    obj = dict(MINIMAL)
    obj.update(changes)
    return dump(obj)


class ParseValidTests(SynchronousTestCase):
    """
    Valid documents parse into the right values.
    """

    def test_full(self) -> None:
        """
        Every key of an iSulad-style process.json maps to its attribute.
        """
        state = parseProcessState(dump(FULL))
        expected = ProcessState(
            args=("/bin/sh", "-c", "echo hi"),
            cwd="/root",
            env=("PATH=/usr/bin:/bin", "TERM=xterm"),
            terminal=True,
            console_size=ConsoleSize(height=24, width=80),
            user=User(uid=1000, gid=1001, additionalGids=(10, 20), username="alice"),
            capabilities={
                "bounding": ("CAP_CHOWN", "CAP_KILL"),
                "permitted": ("CAP_CHOWN",),
                "effective": ("CAP_KILL",),
                "inheritable": (),
                "ambient": ("CAP_NET_BIND_SERVICE",),
            },
            apparmor_profile="docker-default",
            selinux_label="system_u:system_r:container_t:s0",
            oom_score_adj=-500,
            no_new_privileges=True,
            rlimits=(
                Rlimit(type="RLIMIT_NOFILE", soft=1024, hard=4096),
                Rlimit(type="RLIMIT_CORE", soft=0, hard=18446744073709551615),
            ),
            exec=True,
            exit_fifo="/run/isulad/runc/c1/exit_fifo",
            attach_socket="/run/isulad/runc/c1/attach_socket.sock",
            open_tty=True,
            open_stdin=True,
            isulad_stdin="/run/isulad/fifo/in",
            isulad_stdout="/run/isulad/fifo/out",
            isulad_stderr="/run/isulad/fifo/err",
            resize_fifo="/run/isulad/runc/c1/exec/e1/resize_fifo",
            runtime_args=("--debug", "--log-format=json"),
            root_uid=100000,
            root_gid=100001,
            log_path="/var/lib/isulad/engines/runc/c1/console.log",
            log_maxfile=7,
            log_maxsize=1048576,
            control_fifo="/run/ctl",
            checkpoint="/var/ckpt",
            runtime="runc",
            systemd_cgroup=True,
            no_pivot_root=True,
        )
        self.assertEqual(state, expected)
        # Spot checks independent of dataclass equality.
        self.assertEqual(state.console_size, ConsoleSize(24, 80))
        self.assertIs(state.terminal, True)
        self.assertEqual(state.rlimits[1].hard, 2**64 - 1)
        self.assertEqual(dict(state.raw), FULL)

    def test_fromStr(self) -> None:
        """
        A L{str} is accepted as well as L{bytes}.
        """
        state = parseProcessState(json.dumps(FULL))
        self.assertEqual(state, parseProcessState(dump(FULL)))

    def test_minimal(self) -> None:
        """
        Only C{args} and C{cwd}: everything else takes its default.
        """
        state = parseProcessState(dump(MINIMAL))
        self.assertEqual(state.args, ("sh",))
        self.assertEqual(state.cwd, "/")
        self.assertEqual(state, ProcessState(args=("sh",), cwd="/"))
        self.assertEqual(state.env, ())
        self.assertIs(state.terminal, False)
        self.assertIsNone(state.console_size)
        self.assertIsNone(state.user)
        self.assertIsNone(state.capabilities)
        self.assertIs(state.exec, False)
        self.assertIsNone(state.exit_fifo)
        self.assertIsNone(state.attach_socket)
        self.assertIsNone(state.isulad_stdin)
        self.assertEqual(state.runtime_args, ())
        self.assertEqual(state.log_maxfile, 0)
        self.assertEqual(state.log_maxsize, 0)
        self.assertEqual(state.rlimits, ())
        self.assertEqual(dict(state.raw), MINIMAL)

    def test_unknownKeysIgnored(self) -> None:
        """
        Unknown keys, at the top level and inside nested objects, are
        ignored, but kept in C{raw}.
        """
        data = withKeys(
            futureKey={"anything": [1, 2]},
            syslogTag=5,
            consoleSize={"height": 1, "width": 2, "depth": "x"},
            capabilities={"bounding": ["CAP_KILL"], "other": 7},
        )
        state = parseProcessState(data)
        self.assertEqual(state.console_size, ConsoleSize(1, 2))
        self.assertEqual(state.capabilities, {"bounding": ("CAP_KILL",)})
        self.assertEqual(state.raw["futureKey"], {"anything": [1, 2]})
        self.assertEqual(state.raw["syslogTag"], 5)

    def test_nulls(self) -> None:
        """
        An explicit JSON null is the same as a missing key.
        """
        nullable = [k for k in FULL if k not in ("args", "cwd")]
        data = withKeys(**{k: None for k in nullable})
        state = parseProcessState(data)
        self.assertEqual(state, ProcessState(args=("sh",), cwd="/"))
        nested = withKeys(
            user={"uid": None, "gid": 5, "additionalGids": None, "username": None},
            consoleSize={"height": None, "width": 3},
            rlimits=[{"type": "RLIMIT_AS", "soft": None, "hard": 9}],
        )
        state = parseProcessState(nested)
        self.assertEqual(state.user, User(uid=0, gid=5))
        self.assertEqual(state.console_size, ConsoleSize(height=0, width=3))
        self.assertEqual(state.rlimits, (Rlimit("RLIMIT_AS", 0, 9),))

    def test_rawExcludedFromEquality(self) -> None:
        """
        Two states that differ only in unknown keys compare equal, and the
        repr does not dump C{raw}.
        """
        a = parseProcessState(withKeys(x=1))
        b = parseProcessState(withKeys(y=2))
        self.assertEqual(a, b)
        self.assertNotIn("raw", repr(a))

    def test_load(self) -> None:
        """
        L{loadProcessState} reads and parses a file.
        """
        path = os.path.join(tempDir(self), "state.json")
        with open(path, "wb") as f:
            f.write(dump(FULL))
        self.assertEqual(loadProcessState(path), parseProcessState(dump(FULL)))

    def test_loadDefaultPath(self) -> None:
        """
        By default L{loadProcessState} reads C{process.json} in the current
        directory.
        """
        directory = tempDir(self)
        with open(os.path.join(directory, "process.json"), "wb") as f:
            f.write(withKeys(cwd="/srv"))
        old = os.getcwd()
        os.chdir(directory)
        self.addCleanup(os.chdir, old)
        self.assertEqual(loadProcessState().cwd, "/srv")


class ParseErrorTests(SynchronousTestCase):
    """
    Invalid documents raise L{ConfigError} naming the field at fault.
    """

    def assertFieldError(self, data: bytes | str, field: str) -> ConfigError:
        """
        Assert that parsing C{data} fails on C{field}.

        @return: The error.
        """
        err = self.assertRaises(ConfigError, parseProcessState, data)
        self.assertEqual(err.field, field)
        message = str(err)
        self.assertIn(f'"{field}"', message)
        self.assertTrue(message.startswith("process.json: "), message)
        self.assertNotIn("\n", message)
        return err

    def test_missingFile(self) -> None:
        """
        A missing file names the path and the OS reason; no field.
        """
        path = os.path.join(tempDir(self), "missing", "process.json")
        err = self.assertRaises(ConfigError, loadProcessState, path)
        self.assertIsNone(err.field)
        self.assertEqual(
            str(err), f"process.json: cannot read {path}: No such file or directory"
        )

    def test_badJSON(self) -> None:
        """
        Invalid JSON reports the line and column; no field.
        """
        err = self.assertRaises(
            ConfigError, parseProcessState, b'{\n  "args": ["sh"],\n  "cwd": ,\n}'
        )
        self.assertIsNone(err.field)
        self.assertEqual(
            str(err), "process.json: invalid JSON at line 3 column 10: Expecting value"
        )

    def test_emptyFile(self) -> None:
        """
        An empty document is invalid JSON.
        """
        err = self.assertRaises(ConfigError, parseProcessState, b"")
        self.assertIsNone(err.field)
        self.assertIn("invalid JSON", str(err))

    def test_notUTF8(self) -> None:
        """
        Bytes that are not UTF-8 are invalid JSON, not a crash.
        """
        err = self.assertRaises(ConfigError, parseProcessState, b'{"args":["\xff"]}')
        self.assertIsNone(err.field)
        self.assertIn("invalid JSON", str(err))

    def test_nanRejected(self) -> None:
        """
        C{NaN}, which Python's json module would accept, is not JSON.
        """
        err = self.assertRaises(
            ConfigError, parseProcessState, b'{"args":["sh"],"cwd":"/","x":NaN}'
        )
        self.assertIsNone(err.field)
        self.assertIn("invalid JSON", str(err))

    def test_topLevelArray(self) -> None:
        """
        The top level must be an object.
        """
        err = self.assertRaises(ConfigError, parseProcessState, dump([MINIMAL]))
        self.assertIsNone(err.field)
        self.assertIn("top level must be a JSON object", str(err))

    def test_missingArgs(self) -> None:
        """
        C{args} is required.
        """
        err = self.assertFieldError(dump({"cwd": "/"}), "args")
        self.assertEqual(str(err), 'process.json: field "args" is required')

    def test_nullArgs(self) -> None:
        """
        A null C{args} is the same as a missing one.
        """
        self.assertFieldError(withKeys(args=None), "args")

    def test_emptyArgs(self) -> None:
        """
        C{args} must not be empty.
        """
        err = self.assertFieldError(withKeys(args=[]), "args")
        self.assertIn("empty", str(err))

    def test_missingCwd(self) -> None:
        """
        C{cwd} is required.
        """
        err = self.assertFieldError(dump({"args": ["sh"]}), "cwd")
        self.assertEqual(str(err), 'process.json: field "cwd" is required')

    def test_cwdNotString(self) -> None:
        """
        C{cwd} must be a string.
        """
        self.assertFieldError(withKeys(cwd=["/"]), "cwd")

    def test_argsNotList(self) -> None:
        """
        C{args} must be a list, not a string.
        """
        err = self.assertFieldError(withKeys(args="sh -c true"), "args")
        self.assertIn('"sh -c true"', str(err))

    def test_argsElementNotString(self) -> None:
        """
        Every element of C{args} must be a string; the index is named.
        """
        err = self.assertFieldError(withKeys(args=["sh", "-c", 3]), "args[2]")
        self.assertEqual(
            str(err), 'process.json: field "args[2]" must be a string, got 3'
        )
        self.assertFieldError(withKeys(args=["sh", None]), "args[1]")

    def test_envElementNotString(self) -> None:
        """
        Every element of C{env} must be a string.
        """
        self.assertFieldError(withKeys(env=[{"PATH": "/bin"}]), "env[0]")

    def test_terminalString(self) -> None:
        """
        Booleans must be JSON booleans, not strings.
        """
        err = self.assertFieldError(withKeys(terminal="yes"), "terminal")
        self.assertEqual(
            str(err), 'process.json: field "terminal" must be a boolean, got "yes"'
        )

    def test_boolNotInt(self) -> None:
        """
        An integer is not accepted as a boolean.
        """
        self.assertFieldError(withKeys(exec=1), "exec")

    def test_intNotBool(self) -> None:
        """
        A boolean is not accepted as an integer.
        """
        self.assertFieldError(withKeys(oomScoreAdj=True), "oomScoreAdj")
        self.assertFieldError(withKeys(user={"uid": False}), "user.uid")

    def test_logMaxsizeFloat(self) -> None:
        """
        Integers must not be floats, even integral ones.
        """
        err = self.assertFieldError(withKeys(logMaxsize=1.5), "logMaxsize")
        self.assertIn("integer", str(err))
        self.assertFieldError(withKeys(logMaxsize=4096.0), "logMaxsize")

    def test_consoleSizeWidthString(self) -> None:
        """
        Nested fields are named with a dotted path.
        """
        err = self.assertFieldError(
            withKeys(consoleSize={"height": 24, "width": "80"}), "consoleSize.width"
        )
        self.assertIn('"80"', str(err))

    def test_consoleSizeRange(self) -> None:
        """
        consoleSize values must be within 0..65535.
        """
        self.assertFieldError(
            withKeys(consoleSize={"height": -1, "width": 80}), "consoleSize.height"
        )
        self.assertFieldError(
            withKeys(consoleSize={"height": 1, "width": 65536}), "consoleSize.width"
        )
        state = parseProcessState(withKeys(consoleSize={"height": 65535, "width": 0}))
        self.assertEqual(state.console_size, ConsoleSize(65535, 0))

    def test_consoleSizeNotObject(self) -> None:
        """
        consoleSize must be an object.
        """
        self.assertFieldError(withKeys(consoleSize=[24, 80]), "consoleSize")

    def test_negativeLogMaxfile(self) -> None:
        """
        logMaxfile and logMaxsize must not be negative.
        """
        err = self.assertFieldError(withKeys(logMaxfile=-1), "logMaxfile")
        self.assertIn("-1", str(err))
        self.assertFieldError(withKeys(logMaxsize=-4096), "logMaxsize")

    def test_rlimitsBadEntry(self) -> None:
        """
        A bad rlimits entry is named by index and key.
        """
        good = {"type": "RLIMIT_NOFILE", "soft": 1, "hard": 2}
        self.assertFieldError(
            withKeys(rlimits=[good, {"type": "RLIMIT_AS", "soft": "1", "hard": 2}]),
            "rlimits[1].soft",
        )
        self.assertFieldError(withKeys(rlimits=[good, "RLIMIT_AS"]), "rlimits[1]")
        self.assertFieldError(
            withKeys(rlimits=[{"soft": 1, "hard": 2}]), "rlimits[0].type"
        )
        self.assertFieldError(withKeys(rlimits={"type": "x"}), "rlimits")

    def test_capabilitiesBadElement(self) -> None:
        """
        Capability names must be strings.
        """
        self.assertFieldError(
            withKeys(capabilities={"bounding": ["CAP_KILL", 5]}),
            "capabilities.bounding[1]",
        )

    def test_userBad(self) -> None:
        """
        user fields are type-checked.
        """
        self.assertFieldError(
            withKeys(user={"additionalGids": [1, "2"]}), "user.additionalGids[1]"
        )
        self.assertFieldError(withKeys(user={"username": 0}), "user.username")
        self.assertFieldError(withKeys(user="root"), "user")

    def test_stringFieldWrongType(self) -> None:
        """
        String fields reject other types.
        """
        self.assertFieldError(withKeys(exit_fifo=True), "exit_fifo")
        self.assertFieldError(withKeys(isuladStdin=0), "isuladStdin")
        self.assertFieldError(withKeys(runtimeArgs=["--x", 1]), "runtimeArgs[1]")

    def test_longValueShortened(self) -> None:
        """
        A huge offending value does not produce a huge message.
        """
        err = self.assertFieldError(withKeys(terminal="x" * 10000), "terminal")
        self.assertLess(len(str(err)), 200)
