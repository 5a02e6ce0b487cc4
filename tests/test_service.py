"""
L{shimd.service.ShimService}'s report of the status, on a fake reactor.
A real container's report is in the end-to-end tests.
"""

from __future__ import annotations

import os
import struct

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from shimd.launch import ShimConfig
from shimd.service import ShimService


class ReportTests(SynchronousTestCase):
    """The status is written everywhere before the shim gives the CPU away."""

    def setUp(self) -> None:
        self.workdir = self.mktemp()
        os.makedirs(self.workdir)
        self.fifoR, self.fifoW = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.statusR, self.statusW = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        for fd in (self.fifoR, self.fifoW, self.statusR, self.statusW):
            self.addCleanup(os.close, fd)
        config = ShimConfig(self.workdir, "cid", "/bundle", statusFd=self.statusW)
        self.shim = ShimService(config, MemoryReactorClock())
        self.shim._exitFifo = self.fifoW
        self.yielded: list[tuple[bytes, bytes]] = []
        self.patch(os, "sched_yield", self._yield)

    def _yield(self) -> None:
        """What a reader woken by the report finds when the shim yields."""
        try:
            fifo = os.read(self.fifoR, 8)
        except BlockingIOError:
            fifo = b""
        self.yielded.append((fifo, os.read(self.statusR, 8)))

    def test_readableWhenYielding(self) -> None:
        """
        The exit FIFO and the status fd hold the status when the shim
        yields, once, so that the woken engine reads it at once.  (./exit
        is written before the report: the end-to-end tests check it.)
        """
        self.shim._report(137)
        packed = struct.pack("=i", 137)
        self.assertEqual(self.yielded, [(packed, packed)])

    def test_yieldsWithoutAReader(self) -> None:
        """
        With nobody reading the exit FIFO (a detached run), the status is
        still on the status fd when the shim yields.
        """
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        os.close(r)
        self.addCleanup(os.close, w)
        self.shim._exitFifo = w
        self.shim._report(0)
        packed = struct.pack("=i", 0)
        self.assertEqual(self.yielded, [(b"", packed)])
