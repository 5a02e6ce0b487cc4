"""
The launch (L{shimd.launch}): everything runc needs is open, and runc is
running, before Twisted is loaded; a failure closes everything again.

The runtime here is a shell script standing in for runc: it records what
it was given (argv, cwd, its open descriptors, what it finds on the attach
socket) and writes the pid file.  Real runc runs in the end-to-end tests.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from shimd.config import ConfigError
from shimd.launch import Launch, ShimConfig, ShimError, launchShim
from shimd.runtimecmd import RuntimeFailure, forkExec

FAKE_RUNC = textwrap.dedent("""\
    #!/bin/sh
    # argv, cwd, and whether something listens on the attach socket
    out="$PWD/fake-runc.json"
    listening=no
    [ -S "$PWD/attach.sock" ] && listening=yes
    printf '{"argv": "%s", "cwd": "%s", "attach": "%s"}\\n' "$*" "$PWD" "$listening" > "$out"
    while [ $# -gt 1 ]; do [ "$1" = --pid-file ] && echo $$ > "$2"; shift; done
    echo "runc says hello" >&2
    exit ${FAKE_STATUS:-0}
""")


def openFds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


class LaunchTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.workdir = tempfile.mkdtemp(prefix="shimd-launch-", dir="/tmp")
        self.addCleanup(shutil.rmtree, self.workdir, True)
        self.runc = os.path.join(self.workdir, "fake-runc")
        with open(self.runc, "w") as f:
            f.write(FAKE_RUNC)
        os.chmod(self.runc, 0o755)
        self.config = ShimConfig(self.workdir, "cid", "/bundle", self.runc)
        self.before = openFds()

    def processJson(self, **keys: object) -> None:
        with open(os.path.join(self.workdir, "process.json"), "w") as f:
            json.dump({"args": ["sh"], "cwd": "/", **keys}, f)

    def fifo(self, name: str, reader: bool = True) -> str:
        path = os.path.join(self.workdir, name)
        os.mkfifo(path, 0o600)
        if reader:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            self.addCleanup(os.close, fd)
        return path

    def launch(self) -> Launch:
        launch = launchShim(self.config)
        self.addCleanup(launch.close)
        assert launch.runtime is not None
        _, status = os.waitpid(launch.runtime.pid, 0)
        self.assertEqual(os.waitstatus_to_exitcode(status), 0)
        return launch

    def recorded(self) -> dict[str, str]:
        with open(os.path.join(self.workdir, "fake-runc.json")) as f:
            result: dict[str, str] = json.load(f)
        return result

    def test_pipesAndFifos(self) -> None:
        """runc create with isulad-shim's argv; the engine's FIFOs, the exit FIFO and the pipes are ours."""
        out = self.fifo("out")
        self.processJson(isuladStdout=out, exit_fifo=self.fifo("exit_fifo"))
        launch = self.launch()
        recorded = self.recorded()
        self.assertEqual(
            recorded["argv"],
            f"--log {self.workdir}/log.json --log-format json --root {self.workdir}/fake-runc create "
            f"--bundle /bundle --pid-file {self.workdir}/pid cid",
        )
        self.assertEqual(recorded["cwd"], self.workdir)
        self.assertIsNotNone(launch.engineOut)
        self.assertIsNotNone(launch.exitFifo)
        self.assertIsNone(launch.engineErr)
        # What runc wrote to its stderr is the container's stderr pipe.
        assert launch.stderr is not None
        self.assertEqual(os.read(launch.stderr, 100), b"runc says hello\n")
        self.assertEqual(os.readlink(f"/proc/self/fd/{launch.engineOut}"), out)

    def test_attachListensBeforeRunc(self) -> None:
        """The attach socket (mode 0600) listens before runc runs (spec 9)."""
        self.processJson(attach_socket="attach.sock")
        launch = self.launch()
        self.assertEqual(self.recorded()["attach"], "yes")
        path = os.path.join(self.workdir, "attach.sock")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        client = socket.socket(socket.AF_UNIX)
        self.addCleanup(client.close)
        client.connect(path)  # waits in the backlog until the reactor runs
        launch.close()
        self.assertFalse(os.path.exists(path))

    def test_attachFailureIsNotFatal(self) -> None:
        """B17: no attach socket (a directory in the way), the container runs anyway."""
        os.mkdir(os.path.join(self.workdir, "attach.sock"))
        self.processJson(attach_socket="attach.sock")
        launch = self.launch()
        self.assertIsNone(launch.attach)
        self.assertIn("a directory is in the way", launch.attachError or "")

    def test_terminal(self) -> None:
        """tty: a private console socket, runc's stdio is /dev/null and a message pipe."""
        self.processJson(terminal=True, resizeFifo=self.fifo("resize", reader=False))
        launch = self.launch()
        assert launch.console is not None and launch.runtime is not None
        console = launch.console.path
        self.assertIn(f"--console-socket {console} cid", self.recorded()["argv"])
        self.assertEqual(stat.S_IMODE(os.stat(os.path.dirname(console)).st_mode), 0o700)
        self.assertIsNone(launch.stdout)
        assert launch.runtime.output is not None
        self.assertEqual(os.read(launch.runtime.output, 100), b"runc says hello\n")
        # The engine may open the resize FIFO for writing at once.
        os.close(os.open(os.path.join(self.workdir, "resize"), os.O_WRONLY | os.O_NONBLOCK))
        launch.close()
        self.assertFalse(os.path.exists(os.path.dirname(console)))

    def test_fifoWithoutReader(self) -> None:
        """iSulad's ENXIO: an error naming the FIFO; nothing stays open, runc never ran."""
        path = self.fifo("out", reader=False)
        self.processJson(isuladStdout=path, attach_socket="attach.sock")
        e = self.assertRaises(ShimError, launchShim, self.config)
        self.assertIn(f"engine stdout FIFO {path} has no reader", str(e))
        self.assertEqual(openFds(), self.before)
        self.assertFalse(os.path.exists(os.path.join(self.workdir, "attach.sock")))
        self.assertFalse(os.path.exists(os.path.join(self.workdir, "fake-runc.json")))

    def test_badProcessJson(self) -> None:
        self.processJson(terminal="yes")
        e = self.assertRaises(ConfigError, launchShim, self.config)
        self.assertEqual(e.field, "terminal")

    def test_runtimeMissing(self) -> None:
        """A runtime that cannot be executed: an error naming it; nothing stays open."""
        self.processJson(terminal=True)
        self.config.runtimeCommand = os.path.join(self.workdir, "no-such-runc")
        e = self.assertRaises(RuntimeFailure, launchShim, self.config)
        self.assertIn("fork/exec error", str(e))
        self.assertIn("no-such-runc", str(e))
        self.assertEqual(openFds(), self.before)
        self.assertEqual([n for n in os.listdir("/run") if n.startswith("shimd-") and not os.listdir(f"/run/{n}")], [])


class ForkExecTests(SynchronousTestCase):
    """forkExec in another directory than ours: a fork."""

    cwd = "/tmp"

    def run_(self, script: str | list[str], fds: dict[int, int]) -> tuple[int, str]:
        """
        Run C{script} (Python, or an argv) in a child with C{fds}, where
        -1 is a pipe we read; its status and output.
        """
        argv = [sys.executable, "-S", "-c", script] if isinstance(script, str) else script
        r, w = os.pipe2(os.O_CLOEXEC)
        pid = forkExec(argv, dict(os.environ), self.cwd,
                       {k: w if v == -1 else v for k, v in fds.items()})
        os.close(w)
        _, status = os.waitpid(pid, 0)
        with os.fdopen(r, "rb") as f:
            return os.waitstatus_to_exitcode(status), f.read().decode()

    def test_descriptorsAndDirectory(self) -> None:
        """Only the given descriptors reach the child, on the given numbers, in C{cwd}."""
        stray = os.open(os.devnull, os.O_RDONLY)  # inheritable: must not leak either
        self.addCleanup(os.close, stray)
        os.set_inheritable(stray, True)
        script = "import os,sys; sys.stdout.write(os.getcwd() + ' ' + ' '.join(sorted(os.listdir('/proc/self/fd'))))"
        status, out = self.run_(script, {0: stray, 1: -1, 2: -1})
        cwd, *fds = out.split()
        self.assertEqual(status, 0)
        self.assertEqual(cwd, "/tmp")
        self.assertEqual(fds[:3], ["0", "1", "2"])
        self.assertLessEqual(len(fds), 4)  # listdir's own descriptor

    def test_sourcesOnTargetNumbers(self) -> None:
        """Sources that are also targets (here swapped) arrive intact."""
        a, b = os.pipe2(os.O_CLOEXEC)  # a: our read end, b: our write end
        self.addCleanup(os.close, a)
        self.addCleanup(os.close, b)
        # The child's a is our b (it writes there) and its b our a.
        script = f"import os; mode = lambda fd: os.O_ACCMODE & __import__('fcntl').fcntl(fd, 3); os.write({a}, b'%d %d' % (mode({a}), mode({b})))"
        pid = forkExec([sys.executable, "-S", "-c", script], dict(os.environ), self.cwd, {a: b, b: a})
        _, status = os.waitpid(pid, 0)
        self.assertEqual(os.waitstatus_to_exitcode(status), 0)
        self.assertEqual(os.read(a, 100), b"%d %d" % (os.O_WRONLY, os.O_RDONLY))

    def test_ignoredSignalsDefault(self) -> None:
        """A signal we ignore (SIGPIPE: Python ignores it) is at its default in the child."""
        self.assertEqual(signal.getsignal(signal.SIGPIPE), signal.SIG_IGN)
        status, out = self.run_(["grep", "SigIgn", "/proc/self/status"], {1: -1})  # not Python: it ignores SIGPIPE
        ignoredMask = int(out.split()[1], 16)
        self.assertEqual((status, ignoredMask & (1 << (signal.SIGPIPE - 1))), (0, 0))

    def test_notExecutable(self) -> None:
        e = self.assertRaises(OSError, forkExec, ["/nonexistent/runc"], {"PATH": "/bin"}, self.cwd, {})
        self.assertEqual(e.filename, "/nonexistent/runc")

    def test_notOnPath(self) -> None:
        e = self.assertRaises(OSError, forkExec, ["no-such-runtime"], {"PATH": "/bin:/usr/bin"}, self.cwd, {})
        self.assertEqual((e.errno, e.filename), (errno.ENOENT, "no-such-runtime"))


class SpawnExecTests(ForkExecTests):
    """forkExec in our own directory: posix_spawn, with the same contract."""

    def setUp(self) -> None:
        before = os.getcwd()
        os.chdir(self.cwd)
        self.addCleanup(os.chdir, before)


class NoTwistedTests(SynchronousTestCase):
    def test_launchImportsNoTwisted(self) -> None:
        """The launch runs before Twisted is loaded: it must not load it."""
        code = "import sys, shimd.launch, shimd.sockets; print(sorted(m for m in sys.modules if m.startswith(('twisted', 'zope'))))"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True).stdout
        self.assertEqual(out.strip(), b"[]")

    def test_noAsyncio(self) -> None:
        """isulad-shim's imports leave asyncio out; Deferreds still run coroutines."""
        code = (
            "import sys\n"
            "from shimd.lean import keepLean, importDeferWithoutAsyncio\n"
            "keepLean(); importDeferWithoutAsyncio()\n"
            "import shimd.service, shimd.shimlog\n"
            "from twisted.internet import reactor\n"
            "from twisted.internet.defer import ensureDeferred\n"
            "async def f(): return 5\n"
            "print('asyncio' in sys.modules, ensureDeferred(f()).result)\n"
        )
        env = {k: v for k, v in os.environ.items() if k != "SHIMD_ALLOW_TLS"}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True, env=env).stdout
        self.assertEqual(out.split(), [b"False", b"5"])


class KeepLeanTests(SynchronousTestCase):
    """
    L{shimd.lean.keepLean} in a fresh interpreter, with the imports
    C{isulad-shim} makes: what a shim never uses stays out, and what it
    defers still works when something asks for it.
    """

    _SHIM_IMPORTS = (
        "import sys\n"
        "from shimd.lean import LAZY, _LazyModule, keepLean, importDeferWithoutAsyncio\n"
        "keepLean(); importDeferWithoutAsyncio()\n"
        "import shimd.service, shimd.shimlog\n"
        "from twisted.internet import reactor\n"
        "def loaded(name):\n"
        "    return name in sys.modules and type(sys.modules[name]) is not _LazyModule\n"
    )

    def shim(self, code: str) -> list[bytes]:
        env = {k: v for k, v in os.environ.items() if k != "SHIMD_ALLOW_TLS"}
        out = subprocess.run([sys.executable, "-c", self._SHIM_IMPORTS + code],
                             capture_output=True, env=env)
        self.assertEqual(out.returncode, 0, out.stderr.decode())
        return out.stdout.split()

    def test_lazyModulesStayOut(self) -> None:
        """After the shim's imports, no module of L{LAZY} but C{inspect} (which
        attrs asks about converters) is loaded; each name is there, in
        C{sys.modules} and on its package."""
        out = self.shim(
            "for name in LAZY:\n"
            "    package, _, child = name.rpartition('.')\n"
            "    onPackage = not package or getattr(sys.modules[package], child) is sys.modules[name]\n"
            "    print(name, loaded(name), onPackage)\n"
        )
        from shimd.lean import LAZY

        expected = []
        for name in LAZY:
            expected += [name.encode(), b"True" if name == "inspect" else b"False", b"True"]
        self.assertEqual(out, expected)

    def test_tlsRefused(self) -> None:
        """C{ssl} and pyOpenSSL cannot be imported in a shim."""
        out = self.shim(
            "for name in ('ssl', 'OpenSSL.SSL'):\n"
            "    try:\n"
            "        __import__(name)\n"
            "    except ImportError:\n"
            "        print('refused')\n"
        )
        self.assertEqual(out, [b"refused", b"refused"])

    def test_lazyModulesLoadOnUse(self) -> None:
        """The reactor's TCP, UDP and unix ports, C{inspect} and the cookie
        jar work when used, and are then the real modules."""
        out = self.shim(
            "import os, shutil, tempfile, http.cookiejar, inspect, twisted.internet.tcp\n"
            "from twisted.internet.protocol import DatagramProtocol, Factory\n"
            "tcp = reactor.listenTCP(0, Factory(), interface='127.0.0.1')\n"
            "udp = reactor.listenUDP(0, DatagramProtocol(), interface='127.0.0.1')\n"
            "path = os.path.join(tempfile.mkdtemp(), 's')\n"
            "unix = reactor.listenUNIX(path, Factory())\n"
            "print(tcp.getHost().port > 0, udp.getHost().port > 0, unix.getHost().name == path.encode())\n"
            "for p in (tcp, udp, unix): p.stopListening()\n"
            "shutil.rmtree(os.path.dirname(path))\n"
            "print(list(inspect.signature(lambda a, b: 0).parameters), len(http.cookiejar.CookieJar()))\n"
            "print(twisted.internet.tcp.Port is type(tcp))\n"
            "print(all(loaded(n) for n in ('http.cookiejar', 'inspect', 'twisted.internet.tcp',\n"
            "                               'twisted.internet.udp', 'twisted.internet.unix')))\n"
        )
        self.assertEqual(out, [b"True", b"True", b"True", b"['a',", b"'b']", b"0", b"True", b"True"])

    def test_standardModulesLoadOnUse(self) -> None:
        """The standard library's lazy modules answer as the real ones."""
        out = self.shim(
            "import copy, fnmatch, ipaddress, random, shutil, textwrap, tokenize, unicodedata\n"
            "print(copy.deepcopy([[1]]), fnmatch.fnmatch('ab', 'a*'), ipaddress.ip_address('::1').version,\n"
            "      random.Random(1).randrange(1), shutil.which('sh') is not None, textwrap.indent('a', '>'),\n"
            "      tokenize.NAME > 0, unicodedata.name('a'))\n"
        )
        self.assertEqual(out, [b"[[1]]", b"True", b"6", b"0", b"True", b">a", b"True", b"LATIN", b"SMALL", b"LETTER", b"A"])


class TuneMallocTests(SynchronousTestCase):
    """
    L{shimd.lean.tuneMalloc}: buffers freed at the top of the heap stay
    there for the next chunk instead of coming back as fresh pages.
    """

    # glibc's own malloc and free, so that nothing of Python's lands between
    # the buffers; "default" pins glibc's default thresholds (128 KiB), as
    # glibc would otherwise raise them after the first large free, which
    # made the baseline depend on the heap's history.
    _CODE = textwrap.dedent(
        """
        import ctypes, resource, sys
        from shimd.lean import tuneMalloc
        libc = ctypes.CDLL(None)
        libc.malloc.restype = ctypes.c_void_p
        libc.malloc.argtypes = [ctypes.c_size_t]
        libc.free.argtypes = [ctypes.c_void_p]
        libc.memset.restype = ctypes.c_void_p
        libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
        if sys.argv[1] == "tuned":
            took = tuneMalloc()
        else:
            took = libc.mallopt(-3, 128 * 1024) == 1 and libc.mallopt(-1, 128 * 1024) == 1
        # A chunk's buffers: the 64 KiB read and two sets of records.
        sizes = [64 * 1024, 150_000, 150_000]
        def chunk():
            buffers = [libc.malloc(size) for size in sizes]
            for buffer, size in zip(buffers, sizes):
                libc.memset(buffer, 1, size)
            for buffer in reversed(buffers):
                libc.free(buffer)
        chunk()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(50):
            chunk()
        print(int(took), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        """
    )

    def faults(self, mode: str) -> tuple[int, int]:
        out = subprocess.run([sys.executable, "-c", self._CODE, mode], capture_output=True, check=True)
        took, faults = out.stdout.split()
        return int(took), int(faults)

    def test_freedHeapIsKept(self) -> None:
        """
        50 chunks of buffers allocated and freed: with glibc's default
        thresholds each chunk faults its buffers in again; tuned, none do.
        """
        took, untuned = self.faults("default")
        if not took:
            raise SkipTest("not glibc: mallopt is not there")
        self.assertGreater(untuned, 1000, "the defaults kept the freed buffers")
        tuned, faults = self.faults("tuned")
        self.assertEqual(tuned, 1)
        self.assertLess(faults, 50, f"{faults} page faults tuned, {untuned} with the defaults")
