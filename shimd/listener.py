# -*- test-case-name: tests.test_listener -*-
"""
L{UnixListener}: accepts connections on a listening unix socket that was
made before the reactor (L{shimd.sockets}), and hands each to a protocol
factory as Twisted's own unix ports do (half-close and fd passing
included: the connections are Twisted's unix transports).

Twisted's C{adoptStreamPort} would do, but it chmods the socket to 0666
while adopting it; the shim's sockets stay 0600.
"""

from __future__ import annotations

import errno
import socket
from typing import Any, cast

from twisted.internet import abstract, main
from twisted.internet.interfaces import IProtocolFactory, IReactorSocket
from twisted.logger import Logger
from twisted.python.failure import Failure

from shimd.sockets import UnixSocket

ACCEPTS_PER_WAKEUP = 16

_log = Logger()


class UnixListener(abstract.FileDescriptor):
    """
    Accepts on C{listening} until L{close}, which also removes the socket
    file (and its private directory).
    """

    def __init__(self, reactor: Any, listening: UnixSocket, factory: IProtocolFactory) -> None:
        super().__init__(reactor)
        self.connected = True
        self._sockets: IReactorSocket = reactor
        self._listening = listening
        self._fd = listening.fileno()
        self.path = listening.path
        self.factory = factory
        factory.doStart()
        self.startReading()

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        """Stop accepting, close the socket and remove its file."""
        if self._fd >= 0 and not self.disconnected:
            self.connectionLost(Failure(main.CONNECTION_DONE))

    def doRead(self) -> object:
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                conn, _ = self._listening.socket.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return None
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    _log.warn("{path}: cannot accept a connection: {e}", path=self.path, e=e)
                    return None
                return main.CONNECTION_LOST
            try:
                self._sockets.adoptStreamConnection(conn.fileno(), socket.AF_UNIX, cast(Any, self.factory))
            except Exception:
                _log.failure("{path}: cannot take a connection", path=self.path)
            finally:
                conn.close()  # Twisted took a duplicate
        return None

    def writeSomeData(self, data: bytes) -> int | BaseException:
        return main.CONNECTION_LOST

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)  # stops watching
        if self._fd >= 0:
            self._fd = -1
            self._listening.close()
            self.factory.doStop()
