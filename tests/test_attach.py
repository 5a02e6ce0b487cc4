"""
The attach socket without a reactor: framing and replies with trial's
StringTransport and a Clock, path validation on real files, sessions
(fan-out, fan-in, limit, detach) on real FIFOs with a memory reactor.
"""

from __future__ import annotations

import fcntl
import json
import os
import stat
import struct
import tempfile

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from shimd.attach import (
    DETACH_MESSAGE,
    OUTPUT_PIPE_SIZE,
    AttachFactory,
    AttachRequest,
    AttachServer,
    DetachFilter,
    RequestError,
    checkFifo,
    frameMessage,
    openChecked,
    parseDetachKeys,
    parseRequest,
)
from shimd.streams import OutputStream, StdinPipe
from tests.test_streams import pipe, pump, readAll

OK = struct.pack("=i", 0)
FAIL = struct.pack("=i", -1)


class DetachKeysTests(SynchronousTestCase):
    def test_docker(self) -> None:
        self.assertEqual(parseDetachKeys("ctrl-q"), b"\x11")
        self.assertEqual(parseDetachKeys("ctrl-p,ctrl-q"), b"\x10\x11")
        self.assertEqual(parseDetachKeys("ctrl-@,ctrl-[,ctrl-\\,ctrl-],ctrl-^,ctrl-_"), bytes([0, 27, 28, 29, 30, 31]))
        self.assertEqual(parseDetachKeys("a,b"), b"ab")
        self.assertEqual(parseDetachKeys("ctrl-A"), b"\x01")

    def test_emptyDisables(self) -> None:
        self.assertEqual(parseDetachKeys(""), b"")

    def test_invalid(self) -> None:
        for spec in ("ctrl-", "ctrl-1", "abc", "ctrl-q,", "é", "ctrl-qq"):
            self.assertRaises(ValueError, parseDetachKeys, spec)


class DetachFilterTests(SynchronousTestCase):
    def feed(self, keys: bytes, *chunks: bytes) -> tuple[bytes, bool]:
        f = DetachFilter(keys)
        out = b""
        for chunk in chunks:
            data, detached = f.feed(chunk)
            out += data
            if detached:
                return out, True
        return out + f.flush(), False

    def test_single(self) -> None:
        self.assertEqual(self.feed(b"\x11", b"abc\x11def"), (b"abc", True))

    def test_sequenceAcrossChunks(self) -> None:
        self.assertEqual(self.feed(b"\x10\x11", b"ab\x10", b"\x11cd"), (b"ab", True))

    def test_heldByteNotLostNorReordered(self) -> None:
        self.assertEqual(self.feed(b"\x10\x11", b"\x10", b"x"), (b"\x10x", False))
        self.assertEqual(self.feed(b"\x10\x11", b"a\x10x\x10y"), (b"a\x10x\x10y", False))

    def test_repeatedPrefix(self) -> None:
        f = DetachFilter(b"\x10\x11")
        self.assertEqual(f.feed(b"\x10"), (b"", False))
        self.assertEqual(f.feed(b"\x10\x11tail"), (b"\x10", True))

    def test_overlappingKeys(self) -> None:
        self.assertEqual(self.feed(b"aab", b"aaab"), (b"a", True))
        self.assertEqual(self.feed(b"aab", b"a", b"a", b"a", b"c"), (b"aaac", False))

    def test_flushAtEnd(self) -> None:
        f = DetachFilter(b"\x10\x11")
        self.assertEqual(f.feed(b"x\x10"), (b"x", False))
        self.assertEqual(f.flush(), b"\x10")

    def test_disabled(self) -> None:
        self.assertEqual(self.feed(b"", b"\x11\x10\x11"), (b"\x11\x10\x11", False))


class ParseTests(SynchronousTestCase):
    def test_text(self) -> None:
        self.assertEqual(parseRequest(b"/a /b /c"), AttachRequest("/a", "/b", "/c"))

    def test_textNull(self) -> None:
        """iSulad prints a NULL stdin as (null) (B4): not attached."""
        self.assertEqual(parseRequest(b"(null) /b /c"), AttachRequest(None, "/b", "/c"))

    def test_tokens(self) -> None:
        for message in (b"/a /b", b"/a /b /c /d", b"/a  /b /c", b"garbage"):
            e = self.assertRaises(RequestError, parseRequest, message)
            self.assertIn("expected 3 space-separated paths", str(e))

    def test_empty(self) -> None:
        self.assertIn("empty", str(self.assertRaises(RequestError, parseRequest, b"  ")))

    def test_json(self) -> None:
        r = parseRequest(b'{"stdin": null, "stdout": "/my dir/out", "detachKeys": "ctrl-p,ctrl-q"}')
        self.assertEqual(r, AttachRequest(None, "/my dir/out", None, "ctrl-p,ctrl-q"))

    def test_jsonErrors(self) -> None:
        for message, why in (
            (b'{"stdin": ', "invalid JSON"),
            (b'{"stdin": 5}', "stdin must be a string"),
            (b'{"stdn": "/a"}', "unknown keys"),
            (b'{"detachKeys": []}', "detachKeys must be"),
            (b'{"stdout": "\xff"}', "invalid JSON"),
        ):
            self.assertIn(why, str(self.assertRaises(RequestError, parseRequest, message)))

    def test_frame(self) -> None:
        exists = {"/x/err"}.__contains__
        self.assertIsNone(frameMessage(b"/x/in /x/out", False, exists))
        self.assertIsNone(frameMessage(b"/x/in /x/out /x/er", False, exists))
        self.assertEqual(frameMessage(b"/x/in /x/out /x/err", False, exists), (b"/x/in /x/out /x/err", b""))
        self.assertEqual(frameMessage(b"/x/in /x/out", True, exists), (b"/x/in /x/out", b""))
        self.assertEqual(frameMessage(b"/a /b /c\r\nrest", False, exists), (b"/a /b /c", b"rest"))
        self.assertEqual(frameMessage(b'{"stdin": "}{"}{', False, exists), (b'{"stdin": "}{"}', b"{"))
        self.assertEqual(frameMessage(b' {"stdin": "a\\"}"} x', False, exists), (b' {"stdin": "a\\"}"}', b" x"))
        self.assertIsNone(frameMessage(b'{"stdin": {"a": 1}', False, exists))
        self.assertIsNone(frameMessage(b"\n ", False, exists))
        self.assertEqual(frameMessage(b"\n ", True, exists), (b"\n ", b""))
        self.assertEqual(frameMessage(b"(null) /x/out (null)", False, exists), (b"(null) /x/out (null)", b""))


class FakeServer:
    def __init__(self, code: int = 0) -> None:
        self.clock = Clock()
        self.requests: list[AttachRequest] = []
        self.code = code

    def handle(self, request: AttachRequest) -> int:
        self.requests.append(request)
        if self.code == 99:
            raise RuntimeError("boom")
        return self.code


class ProtocolTests(SynchronousTestCase):
    """Framing and replies over a StringTransport."""

    def setUp(self) -> None:
        self.server = FakeServer()
        self.factory = AttachFactory(self.server)  # type: ignore[arg-type]
        self.proto = self.factory.buildProtocol(None)
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)
        self.dir = tempfile.mkdtemp()
        self.addCleanup(os.rmdir, self.dir)
        self.err = os.path.join(self.dir, "err")
        os.mkfifo(self.err)
        self.addCleanup(os.unlink, self.err)
        self.errors: list[str] = []

        def observe(event: dict) -> None:
            if event.get("log_namespace") == "shimd.attach" and event["log_level"].name == "error":
                self.errors.append(event["why"])

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def send(self, *chunks: bytes) -> bytes:
        for chunk in chunks:
            self.proto.dataReceived(chunk)
        value = self.transport.value()
        self.transport.clear()
        return value

    def test_halfCloseable(self) -> None:
        self.assertTrue(IHalfCloseableProtocol.providedBy(self.proto))

    def test_textOneWrite(self) -> None:
        """iSulad: one write, no terminator, last path exists: answered at once."""
        self.assertEqual(self.send(f"/x/in /x/out {self.err}".encode()), OK)
        self.assertEqual(self.server.requests, [AttachRequest("/x/in", "/x/out", self.err)])
        self.assertEqual(self.server.clock.getDelayedCalls(), [])

    def test_textInPieces(self) -> None:
        self.assertEqual(self.send(b"/x/in /x/o", b"ut "), b"")
        self.assertEqual(self.send(self.err[:4].encode()), b"")
        self.assertEqual(self.send(self.err[4:].encode()), OK)
        self.assertEqual(len(self.server.requests), 1)

    def test_idleTimeout(self) -> None:
        """A message that never looks complete is taken as it is after a pause."""
        self.assertEqual(self.send(b"/x/in /x/out"), b"")
        self.server.clock.advance(0.19)
        self.assertEqual(self.transport.value(), b"")
        self.server.clock.advance(0.01)
        self.assertEqual(self.transport.value(), FAIL)
        self.assertIn("got 2 tokens", self.errors[0])
        self.assertEqual(self.server.requests, [])

    def test_pauseResets(self) -> None:
        self.send(b"/x/in ")
        self.server.clock.advance(0.15)
        self.send(b"/x/out ")
        self.server.clock.advance(0.15)
        self.assertEqual(self.transport.value(), b"")
        self.send(b"/nonexistent")
        self.server.clock.advance(0.2)
        self.assertEqual(self.transport.value(), OK)
        self.assertEqual(self.server.requests, [AttachRequest("/x/in", "/x/out", "/nonexistent")])

    def test_jsonInPieces(self) -> None:
        message = json.dumps({"stdin": "/a}", "stdout": None, "stderr": "/c", "detachKeys": ""}).encode()
        for i in range(len(message) - 1):
            self.assertEqual(self.send(message[i : i + 1]), b"")
        self.assertEqual(self.send(message[-1:]), OK)
        self.assertEqual(self.server.requests, [AttachRequest("/a}", None, "/c", "")])

    def test_twoRequestsOneWrite(self) -> None:
        self.assertEqual(self.send(b'{"stdout": "/a"}\n{"stdout": "/b"}\n/c /d /e\n'), OK * 3)
        self.assertEqual([r.stdout for r in self.server.requests], ["/a", "/b", "/d"])

    def test_secondRequestSameConnection(self) -> None:
        self.assertEqual(self.send(b'{"stdout": "/a"}'), OK)
        self.assertEqual(self.send(b'{"stdout": "/b"}'), OK)
        self.assertEqual(len(self.server.requests), 2)
        self.assertFalse(self.transport.disconnecting)

    def test_blankBetweenRequestsIgnored(self) -> None:
        self.assertEqual(self.send(b'{"stdout": "/a"}', b"\n"), OK)
        self.server.clock.advance(1)
        self.assertEqual(self.transport.value(), b"")

    def test_halfCloseEmpty(self) -> None:
        """Half-close with nothing sent: -1 once, then the connection closes (no spin: B25)."""
        self.proto.readConnectionLost()
        self.assertEqual(self.transport.value(), FAIL)
        self.assertTrue(self.transport.disconnecting)
        self.assertIn("empty message", self.errors[0])
        self.proto.dataReceived(b"/a /b /c\n")
        self.assertEqual(self.transport.value(), FAIL)

    def test_halfCloseEndsMessage(self) -> None:
        self.send(b"/a /b /nonexistent")
        self.proto.readConnectionLost()
        self.assertEqual(self.transport.value(), OK)
        self.assertEqual(len(self.server.requests), 1)
        self.assertTrue(self.transport.disconnecting)

    def test_halfCloseAfterRequest(self) -> None:
        """A client done with its requests may half-close: no extra reply."""
        self.assertEqual(self.send(b'{"stdout": "/a"}'), OK)
        self.proto.readConnectionLost()
        self.assertEqual(self.transport.value(), b"")
        self.assertTrue(self.transport.disconnecting)

    def test_blankFirstMessage(self) -> None:
        self.assertEqual(self.send(b"\n"), b"")
        self.server.clock.advance(0.2)
        self.assertEqual(self.transport.value(), FAIL)

    def test_garbage(self) -> None:
        """64 KiB without a newline: -1 once, connection closed."""
        self.assertEqual(self.send(b"A" * 65536), FAIL)
        self.assertTrue(self.transport.disconnecting)
        self.assertIn("longer than", self.errors[0])
        self.assertEqual(self.send(b"/a /b /c\n"), b"")
        self.assertEqual(self.server.requests, [])

    def test_binary(self) -> None:
        self.send(bytes(range(256)).replace(b"\n", b""))
        self.server.clock.advance(0.2)
        self.assertEqual(self.transport.value(), FAIL)
        self.assertEqual(self.server.requests, [])

    def test_invalidJSON(self) -> None:
        self.assertEqual(self.send(b'{"stdin": /a}'), FAIL)
        self.assertIn("invalid JSON", self.errors[0])

    def test_serverFailure(self) -> None:
        self.server.code = 99
        self.assertEqual(self.send(b'{"stdout": "/a"}'), FAIL)
        self.flushLoggedErrors(RuntimeError)

    def test_refused(self) -> None:
        self.server.code = -1
        self.assertEqual(self.send(b'{"stdout": "/a"}'), FAIL)


class ValidationTests(SynchronousTestCase):
    """Spec 6.3 step 5 with a real directory boundary (B16)."""

    def setUp(self) -> None:
        base = os.path.realpath(tempfile.mkdtemp())
        self.addCleanup(_rmtree, base)
        self.wd = os.path.join(base, "wd")
        os.mkdir(self.wd)
        self.base = base

    def fifo(self, path: str, mode: int = 0o600) -> str:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.mkfifo(path)
        os.chmod(path, mode)
        return path

    def refused(self, path: str, why: str, uid: int | None = None) -> None:
        e = self.assertRaises(RequestError, checkFifo, "stdout", path, self.wd, os.geteuid() if uid is None else uid)
        self.assertIn(why, str(e))
        self.assertIn(f'stdout path "{path}"', str(e))

    def test_valid(self) -> None:
        path = self.fifo(os.path.join(self.wd, "attach", "x", "out"))
        st = checkFifo("stdout", path, self.wd, os.geteuid())
        self.assertEqual(st.st_ino, os.stat(path).st_ino)

    def test_relative(self) -> None:
        self.refused("attach/x/out", "not an absolute path")

    def test_missing(self) -> None:
        self.refused(os.path.join(self.wd, "nope"), "cannot be resolved")

    def test_outside(self) -> None:
        self.refused(self.fifo(os.path.join(self.base, "out")), "not inside the workdir")

    def test_dotdot(self) -> None:
        self.fifo(os.path.join(self.base, "other", "out"))
        self.refused(os.path.join(self.wd, "..", "other", "out"), "not inside the workdir")

    def test_prefixSibling(self) -> None:
        """B16: <workdir>X/ shares the string prefix but is not inside."""
        self.refused(self.fifo(self.wd + "X/out"), "not inside the workdir")

    def test_symlinkEscape(self) -> None:
        target = self.fifo(os.path.join(self.base, "out"))
        link = os.path.join(self.wd, "link")
        os.symlink(target, link)
        self.refused(link, "not inside the workdir")

    def test_symlinkInside(self) -> None:
        target = self.fifo(os.path.join(self.wd, "real"))
        os.symlink(target, os.path.join(self.wd, "link"))
        checkFifo("stdout", os.path.join(self.wd, "link"), self.wd, os.geteuid())

    def test_workdirItself(self) -> None:
        self.refused(self.wd, "not inside the workdir")

    def test_notFifo(self) -> None:
        path = os.path.join(self.wd, "file")
        with open(path, "w"):
            pass
        os.chmod(path, 0o600)
        self.refused(path, "is not a FIFO")

    def test_mode(self) -> None:
        self.refused(self.fifo(os.path.join(self.wd, "out"), 0o644), "has mode 0644, not 0600")

    def test_owner(self) -> None:
        path = self.fifo(os.path.join(self.wd, "out"))
        self.refused(path, f"is owned by uid {os.geteuid()}, not {os.geteuid() + 1}", uid=os.geteuid() + 1)

    def test_emptyAndNul(self) -> None:
        self.refused("", "is empty")
        self.refused("/a\0b", "NUL")

    def test_noReader(self) -> None:
        path = self.fifo(os.path.join(self.wd, "out"))
        st = checkFifo("stdout", path, self.wd, os.geteuid())
        self.assertIn("has no reader", str(self.assertRaises(RequestError, openChecked, "stdout", path, st)))

    def test_swapped(self) -> None:
        path = self.fifo(os.path.join(self.wd, "in"))
        st = checkFifo("stdin", path, self.wd, os.geteuid())
        os.rename(self.fifo(path + ".new"), path)
        self.assertIn("changed", str(self.assertRaises(RequestError, openChecked, "stdin", path, st)))


def _rmtree(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


class Client:
    """A FIFO triple under the workdir with our ends open, as iSulad makes it."""

    def __init__(self, test: SessionTests, stdin: bool = True) -> None:
        d = tempfile.mkdtemp(dir=test.wd)
        self.paths = {n: os.path.join(d, n) for n in ("stdin", "stdout", "stderr")}
        self.fds = {}
        for name, path in self.paths.items():
            os.mkfifo(path, 0o600)
            os.chmod(path, 0o600)
            flags = os.O_RDWR if name == "stdin" else os.O_RDONLY
            self.fds[name] = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC)
            test.addCleanup(_closeQuietly, self.fds[name])
        if not stdin:
            self.paths["stdin"] = None  # type: ignore[assignment]

    def request(self, detachKeys: str | None = None) -> AttachRequest:
        return AttachRequest(self.paths["stdin"], self.paths["stdout"], self.paths["stderr"], detachKeys)

    def read(self, name: str = "stdout") -> bytes:
        return readAll(self.fds[name])


def _closeQuietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


class SessionTests(SynchronousTestCase):
    """Sessions on real FIFOs and pipes; the reactor is a memory one."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.wd = os.path.realpath(tempfile.mkdtemp())
        self.addCleanup(_rmtree, self.wd)
        outR, self.outW = pipe(self)
        errR, self.errW = pipe(self)
        self.stdinR, stdinW = pipe(self)
        self.stdout = OutputStream(self.reactor, self.reactor, "stdout", outR)
        self.stderr = OutputStream(self.reactor, self.reactor, "stderr", errR)
        self.stdin = StdinPipe(self.reactor, self.reactor, os.dup(stdinW))
        self.server = AttachServer(
            self.reactor, self.wd, self.stdout, self.stderr, self.stdin, ownerUid=os.geteuid()
        )
        self.addCleanup(self.server.stop)

    def output(self, stdout: bytes = b"", stderr: bytes = b"") -> None:
        """The container writes; the streams read (as the reactor would)."""
        for fd, data, stream in ((self.outW, stdout, self.stdout), (self.errW, stderr, self.stderr)):
            if data:
                os.write(fd, data)
                stream.reader.doRead()

    def typed(self, client: Client, data: bytes) -> None:
        os.write(client.fds["stdin"], data)
        session = next(s for s in self.server.sessions if s.input is not None and s.input.fd >= 0
                       and os.path.samestat(os.fstat(s.input.fd), os.fstat(client.fds["stdin"])))
        session.input.doRead()  # type: ignore[union-attr]

    def test_fanOutFanIn(self) -> None:
        """stdout to every out FIFO, stderr to every err FIFO (B1), each in to stdin."""
        a, b = Client(self), Client(self)
        self.assertEqual(self.server.handle(a.request()), 0)
        self.assertEqual(self.server.handle(b.request()), 0)
        self.output(b"out\n", b"err\n")
        for c in (a, b):
            self.assertEqual((c.read("stdout"), c.read("stderr")), (b"out\n", b"err\n"))
        self.typed(a, b"from-a\n")
        self.typed(b, b"from-b\n")
        self.assertEqual(readAll(self.stdinR), b"from-a\nfrom-b\n")

    def test_limit(self) -> None:
        """16 sessions; the 17th is refused; a refused one never counts (B2)."""
        clients = [Client(self) for _ in range(17)]
        for c in clients[:16]:
            self.assertEqual(self.server.handle(c.request()), 0)
        self.assertEqual(self.server.handle(clients[16].request()), -1)
        bad = Client(self)
        os.chmod(bad.paths["stdout"], 0o644)
        self.assertEqual(self.server.handle(bad.request()), -1)
        self.assertEqual(len(self.server.sessions), 16)
        self.output(b"x")
        self.assertEqual(clients[16].read(), b"")  # no writer: never opened
        self.assertEqual(clients[0].read(), b"x")
        self.server.sessions[0].end("test")
        self.assertEqual(self.server.handle(clients[16].request()), 0)

    def test_refusedOpensNothing(self) -> None:
        """A failure on the last path leaves no descriptor open and no session."""
        c = Client(self)
        os.chmod(c.paths["stderr"], 0o640)
        before = set(os.listdir("/proc/self/fd"))
        self.assertEqual(self.server.handle(c.request()), -1)
        self.assertEqual(set(os.listdir("/proc/self/fd")), before)
        self.assertEqual(self.server.sessions, [])

    def test_sameFifo(self) -> None:
        c = Client(self)
        request = AttachRequest(c.paths["stdin"], c.paths["stdin"], None)
        self.assertEqual(self.server.handle(request), -1)

    def test_nothingToAttach(self) -> None:
        self.assertEqual(self.server.handle(AttachRequest(None, None, None)), -1)

    def test_badDetachKeys(self) -> None:
        self.assertEqual(self.server.handle(Client(self).request("ctrl-1")), -1)

    def test_detach(self) -> None:
        """Bytes before the keys go in, the message is one write, the session ends."""
        c = Client(self)
        self.server.handle(c.request())
        session = self.server.sessions[0]
        writes: list[bytes] = []
        original = session.out.writeSomeData  # type: ignore[union-attr]

        def record(data: bytes) -> object:
            writes.append(bytes(data))
            return original(data)

        session.out.writeSomeData = record  # type: ignore[union-attr]
        self.typed(c, b"abc\x11def")
        self.assertEqual(readAll(self.stdinR), b"abc")
        self.assertEqual(writes, [DETACH_MESSAGE])
        self.assertEqual(c.read(), DETACH_MESSAGE)
        self.assertEqual(self.server.sessions, [])
        self.assertEqual(session.ended, "detached")
        self.output(b"later")
        self.assertEqual(c.read(), b"")
        self.assertIsNotNone(self.stdin.writer)

    def test_detachAfterQueuedOutput(self) -> None:
        """Output queued for the session is flushed first; the message follows on its own."""
        c = Client(self)
        self.server.handle(c.request())
        session = self.server.sessions[0]
        # Back to a 64 KiB FIFO, so that 180 KB of output queues in the shim.
        fcntl.fcntl(session.out.fd, fcntl.F_SETPIPE_SZ, 65536)  # type: ignore[union-attr]
        big = b"y" * 180000
        for i in range(0, len(big), 60000):
            self.output(big[i : i + 60000])
        self.assertGreater(session.out.pending(), 0)  # type: ignore[union-attr]
        writes: list[bytes] = []
        original = session.out.writeSomeData  # type: ignore[union-attr]
        session.out.writeSomeData = lambda data: writes.append(bytes(data)) or original(data)  # type: ignore
        self.typed(c, b"\x11")
        got = b""
        for _ in range(100):
            got += c.read()
            if got.endswith(DETACH_MESSAGE):
                break
            session.out.doWrite()  # type: ignore[union-attr]
        self.assertEqual(got, big + DETACH_MESSAGE)
        self.assertEqual(writes[-1], DETACH_MESSAGE)

    def test_outputFifosGrown(self) -> None:
        """A session's out and err FIFOs hold OUTPUT_PIPE_SIZE bytes; its in FIFO is left alone."""
        c = Client(self)
        self.server.handle(c.request())
        session = self.server.sessions[0]
        for writer in (session.out, session.err):
            self.assertEqual(fcntl.fcntl(writer.fd, fcntl.F_GETPIPE_SZ), OUTPUT_PIPE_SIZE)  # type: ignore[union-attr]
        self.assertEqual(fcntl.fcntl(c.fds["stdin"], fcntl.F_GETPIPE_SZ), 65536)

    def test_perSessionKeys(self) -> None:
        c = Client(self)
        self.server.handle(c.request("ctrl-p,ctrl-q"))
        self.typed(c, b"\x10")
        self.typed(c, b"x\x11")
        self.assertEqual(readAll(self.stdinR), b"\x10x\x11")
        self.assertEqual(len(self.server.sessions), 1)
        self.typed(c, b"\x10\x11")
        self.assertEqual(self.server.sessions, [])

    def test_detachDisabled(self) -> None:
        c = Client(self)
        self.server.handle(c.request(""))
        self.typed(c, b"\x11\x10\x11")
        self.assertEqual(readAll(self.stdinR), b"\x11\x10\x11")
        self.assertEqual(len(self.server.sessions), 1)

    def test_stdinEndDoesNotCloseContainerStdin(self) -> None:
        """The in FIFO hangs up: pending bytes (a held prefix too) go in, the session ends, stdin stays."""
        c = Client(self)
        self.server.handle(c.request("ctrl-p,ctrl-q"))
        session = self.server.sessions[0]
        os.write(c.fds["stdin"], b"last\x10")
        os.close(c.fds["stdin"])
        session.input.doRead()  # type: ignore[union-attr]
        session.input.doRead()  # type: ignore[union-attr]
        from twisted.internet import main

        self.assertEqual(session.input.doRead(), main.CONNECTION_DONE)  # type: ignore[union-attr]
        session.input.connectionLost(main.CONNECTION_DONE)  # type: ignore[union-attr, arg-type]
        self.assertEqual(readAll(self.stdinR), b"last\x10")
        self.assertEqual(self.server.sessions, [])
        self.assertIsNotNone(self.stdin.writer)
        self.assertEqual(self.stdin._sources, set())

    def test_outGone(self) -> None:
        c = Client(self)
        self.server.handle(c.request())
        session = self.server.sessions[0]
        os.close(c.fds["stdout"])
        self.output(b"data")
        self.reactor.advance(0)
        self.assertEqual(self.server.sessions, [])
        self.assertEqual(session.input.fd, -1)  # type: ignore[union-attr]
        self.assertEqual(self.stdin._sources, set())
        self.assertEqual(self.stdout.sinkCount(), 0)
        self.assertEqual(self.stderr.sinkCount(), 0)

    def test_noStdin(self) -> None:
        c = Client(self, stdin=False)
        self.assertEqual(self.server.handle(c.request()), 0)
        self.output(b"o", b"e")
        self.assertEqual((c.read(), c.read("stderr")), (b"o", b"e"))

    def test_containerExit(self) -> None:
        """finish() gives each session the rest, then end of file; stop() closes the in readers."""
        c = Client(self)
        self.server.handle(c.request())
        session = self.server.sessions[0]
        self.output(b"tail")
        for stream in (self.stdout, self.stderr):
            stream.finish()
        for writer in (session.out, session.err):
            pump(writer)  # type: ignore[arg-type]
        self.assertEqual(c.read(), b"tail")
        self.assertEqual(self.server.sessions, [])
        self.server.stop()
        self.assertEqual(session.input.fd, -1)  # type: ignore[union-attr]

    def test_stopped(self) -> None:
        self.server.stop()
        self.assertEqual(self.server.handle(Client(self).request()), -1)


class ListenTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.wd = os.path.realpath(tempfile.mkdtemp())
        self.addCleanup(_rmtree, self.wd)
        self.reactor = MemoryReactorClock()
        self.server = AttachServer(self.reactor, self.wd, None, None, None)

    def test_listen(self) -> None:
        """A real socket, mode 0600, accepting once the reactor reads it; removed by stop()."""
        import socket

        self.assertTrue(self.server.listen("attach.sock"))
        path = os.path.join(self.wd, "attach.sock")
        st = os.stat(path)
        self.assertTrue(stat.S_ISSOCK(st.st_mode))
        self.assertEqual(stat.S_IMODE(st.st_mode), 0o600)
        self.assertIn(self.server.port, self.reactor.readers)
        client = socket.socket(socket.AF_UNIX)
        self.addCleanup(client.close)
        client.connect(path)
        self.server.port.doRead()
        self.assertEqual(len(self.reactor.adoptedStreamConnections), 1)
        self.server.stop()
        self.assertFalse(os.path.exists(path))
        self.assertNotIn(self.server.port, self.reactor.readers)

    def test_staleReplaced(self) -> None:
        import socket

        path = os.path.join(self.wd, "attach.sock")
        s = socket.socket(socket.AF_UNIX)
        s.bind(path)
        s.close()
        self.assertTrue(self.server.listen(path))
        client = socket.socket(socket.AF_UNIX)
        self.addCleanup(client.close)
        client.connect(path)  # a live socket in its place
        self.server.stop()

    def test_liveNotReplaced(self) -> None:
        import socket

        path = os.path.join(self.wd, "attach.sock")
        s = socket.socket(socket.AF_UNIX)
        self.addCleanup(s.close)
        s.bind(path)
        s.listen(1)
        self.assertFalse(self.server.listen(path))
        self.assertTrue(os.path.exists(path))

    def test_tooLong(self) -> None:
        self.assertFalse(self.server.listen("x" * 120))
        self.assertEqual(os.listdir(self.wd), [])

    def test_bindFails(self) -> None:
        """Something that is no socket in the way: logged, attach off, nothing removed."""
        path = os.path.join(self.wd, "attach.sock")
        os.mkdir(path)
        self.assertFalse(self.server.listen(path))
        self.assertTrue(os.path.isdir(path))
