"""
The attach client without a reactor: a memory reactor records the
connection, a StringTransport plays the shim, and the clock drives the
120 s timeout and the 100 ms liveness checks (no real waiting).
"""

from __future__ import annotations

import io
import json
import os
import stat
import struct
import subprocess
import sys
import tempfile

from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from shimd.client import AttachError, Attachment, AttachTimeout, attach, runAttach


class AttachTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.wd = os.path.realpath(tempfile.mkdtemp())
        self.addCleanup(subprocess.run, ["rm", "-rf", self.wd])
        self.reactor = MemoryReactorClock()

    def start(self, **kw: object) -> tuple:
        d = attach(self.reactor, self.wd, **kw)  # type: ignore[arg-type]
        path, factory = self.reactor.unixClients[0][:2]
        self.assertEqual(path, os.path.join(self.wd, "attach.sock"))
        proto = factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        return d, proto, transport

    def fifoDirs(self) -> list[str]:
        base = os.path.join(self.wd, "attach")
        return os.listdir(base) if os.path.isdir(base) else []

    def test_request(self) -> None:
        """A private 0700 directory, 0600 FIFOs, our ends open, the JSON form."""
        d, proto, transport = self.start(detachKeys="ctrl-p,ctrl-q")
        request = json.loads(transport.value())
        self.assertEqual(set(request), {"stdin", "stdout", "stderr", "detachKeys"})
        self.assertEqual(request["detachKeys"], "ctrl-p,ctrl-q")
        directory = os.path.dirname(request["stdin"])
        self.assertEqual(os.path.dirname(directory), os.path.join(self.wd, "attach"))
        self.assertEqual(stat.S_IMODE(os.stat(directory).st_mode), 0o700)
        for name in ("stdin", "stdout", "stderr"):
            st = os.stat(request[name])
            self.assertTrue(stat.S_ISFIFO(st.st_mode))
            self.assertEqual(stat.S_IMODE(st.st_mode), 0o600)
        # Our read ends are open already: the shim can open the write ends.
        fd = os.open(request["stdout"], os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        proto.dataReceived(struct.pack("=i", 0))
        session = self.successResultOf(d)
        self.addCleanup(session.close)
        self.assertEqual(self.fifoDirs(), [])  # removed once the reply is in
        for fd in (session.stdin, session.stdout, session.stderr):
            self.assertTrue(stat.S_ISFIFO(os.fstat(fd).st_mode))  # type: ignore[arg-type]
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_someStreams(self) -> None:
        d, proto, transport = self.start(stdin=False, stderr=False)
        request = json.loads(transport.value())
        self.assertEqual((request["stdin"], request["stderr"]), (None, None))
        self.assertNotIn("detachKeys", request)
        proto.dataReceived(struct.pack("=i", 0))
        session = self.successResultOf(d)
        self.addCleanup(session.close)
        self.assertEqual((session.stdin, session.stderr), (None, None))

    def test_replyInPieces(self) -> None:
        d, proto, _ = self.start()
        reply = struct.pack("=i", 0)
        proto.dataReceived(reply[:1])
        self.assertNoResult(d)
        proto.dataReceived(reply[1:])
        self.successResultOf(d).close()

    def test_timeout(self) -> None:
        """120 s without a reply: AttachTimeout, FIFOs removed, nothing left scheduled."""
        d, proto, transport = self.start()
        self.reactor.advance(119.9)
        self.assertNoResult(d)
        self.reactor.advance(0.1)
        failure = self.failureResultOf(d, AttachTimeout)
        self.assertIn("120s", failure.getErrorMessage())
        self.assertEqual(self.fifoDirs(), [])
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertTrue(transport.disconnecting)

    def test_customTimeout(self) -> None:
        d, _, _ = self.start(timeout=5)
        self.reactor.advance(5)
        self.failureResultOf(d, AttachTimeout)

    def test_deadShim(self) -> None:
        """B19: the shim dies: the next 100 ms check fails the attach."""
        p = subprocess.Popen([sys.executable, "-c", "pass"])
        p.wait()
        with open(os.path.join(self.wd, "shim-pid"), "w") as f:
            f.write(str(os.getpid()))
        d, _, _ = self.start()
        self.reactor.advance(0.1)
        self.assertNoResult(d)  # alive
        with open(os.path.join(self.wd, "shim-pid"), "w") as f:
            f.write(str(p.pid))
        self.reactor.advance(0.1)
        self.assertIn("not running", self.failureResultOf(d, AttachError).getErrorMessage())
        self.assertEqual(self.fifoDirs(), [])
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_closedWithoutReply(self) -> None:
        """B19: EOF is not 'try again later'."""
        d, proto, _ = self.start()
        proto.connectionLost(Failure(Exception("closed")))
        self.assertIn("without a reply", self.failureResultOf(d, AttachError).getErrorMessage())
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_shortReply(self) -> None:
        """B19: a partial int is not a value."""
        d, proto, _ = self.start()
        proto.dataReceived(b"\x00\x00")
        proto.connectionLost(Failure(Exception("closed")))
        self.assertIn("short reply of 2 bytes", self.failureResultOf(d, AttachError).getErrorMessage())

    def test_refused(self) -> None:
        """-1: the shim's reason from attach-log.json is in the error."""
        d, proto, transport = self.start()
        directory = os.path.dirname(json.loads(transport.value())["stdout"])
        with open(os.path.join(self.wd, "attach-log.json"), "w") as f:
            f.write(json.dumps({"level": "error", "msg": "something else"}) + "\n")
            f.write(json.dumps({"level": "error", "msg": f'stdout path "{directory}/out-fifo" has no reader'}) + "\n")
            f.write(json.dumps({"level": "error", "msg": "a later one"}) + "\n")
        proto.dataReceived(struct.pack("=i", -1))
        message = self.failureResultOf(d, AttachError).getErrorMessage()
        self.assertIn("refused", message)
        self.assertIn("has no reader", message)
        self.assertEqual(self.fifoDirs(), [])

    def test_connectFails(self) -> None:
        d = attach(self.reactor, self.wd)
        factory = self.reactor.unixClients[0][1]
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        self.assertIn("cannot connect", self.failureResultOf(d, AttachError).getErrorMessage())
        self.assertEqual(self.fifoDirs(), [])

    def test_badKeys(self) -> None:
        d = attach(self.reactor, self.wd, detachKeys="ctrl-1")
        self.failureResultOf(d, AttachError)
        self.assertEqual(self.reactor.unixClients, [])

    def test_socketFromProcessJson(self) -> None:
        with open(os.path.join(self.wd, "process.json"), "w") as f:
            json.dump({"args": ["sh"], "cwd": "/", "attach_socket": "/run/x/attach_socket.sock"}, f)
        attach(self.reactor, self.wd)
        self.assertEqual(self.reactor.unixClients[0][0], "/run/x/attach_socket.sock")

    def test_attachmentClose(self) -> None:
        r, w = os.pipe()
        a = Attachment(r, w, None)
        a.close()
        a.close()
        self.assertRaises(OSError, os.fstat, r)


class RunAttachTests(SynchronousTestCase):
    """shimd attach's checks before it connects."""

    def setUp(self) -> None:
        self.wd = tempfile.mkdtemp()
        self.addCleanup(subprocess.run, ["rm", "-rf", self.wd])
        self.stderr = io.StringIO()
        self.patch(sys, "stderr", self.stderr)

    def test_notATTY(self) -> None:
        with open(os.path.join(self.wd, "process.json"), "w") as f:
            json.dump({"args": ["sh"], "cwd": "/", "terminal": True}, f)
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        self.assertEqual(runAttach(self.wd, stdinFd=r, reactor=object()), 125)
        self.assertIn("the input device is not a TTY", self.stderr.getvalue())

    def test_badKeys(self) -> None:
        self.assertEqual(runAttach(self.wd, detachKeys="nope", reactor=object()), 125)
        self.assertIn("invalid detach keys", self.stderr.getvalue())
