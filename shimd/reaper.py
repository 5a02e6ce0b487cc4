# -*- test-case-name: tests.test_reaper -*-
"""
Learning how processes end without polling and without stealing Twisted's
children.

 - L{setChildSubreaper}: orphans re-parent to the shim, so the container
   init (whose parent, C{runc create}, exits) stays our child and its exit
   status is ours to read.
 - L{ExitWatcher}: a pidfd on the reactor; readable when the process exits,
   then C{waitid(P_PIDFD)} reaps exactly that process.
 - L{reapStrays}: reaps zombie children that nobody watches, never with
   C{waitpid(-1)}, which would steal the children Twisted spawned.
"""

from __future__ import annotations

import os
import signal as signal_
from typing import Iterable

from twisted.internet import main
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFDSet

from shimd.fdio import OwnedDescriptor
from shimd.launch import setChildSubreaper

__all__ = ["setChildSubreaper", "ExitWatcher", "reapStrays", "statusFromWaitid", "isNamespaceInit"]

def statusFromWaitid(result: os.waitid_result) -> int:
    """The shell's encoding: the exit code, or 128 + the signal number."""
    if result.si_code == os.CLD_EXITED:
        return result.si_status
    return 128 + result.si_status


class ExitWatcher(OwnedDescriptor):
    """
    Watches one process through a pidfd.

    @ivar exited: fires with the status (exit code, or 128 + signal), or
        with L{None} if the process was not our child (its status cannot be
        known).
    """

    def __init__(self, reactor: IReactorFDSet, pid: int) -> None:
        super().__init__(reactor)
        self.pid = pid
        self.fd = os.pidfd_open(pid)
        self.exited: Deferred[int | None] = Deferred()
        self.startReading()

    def doRead(self) -> object:
        try:
            info = os.waitid(os.P_PIDFD, self.fd, os.WEXITED | os.WNOHANG)
        except ChildProcessError:
            return self._done(None)
        if info is None:
            return None
        return self._done(statusFromWaitid(info))

    def _done(self, status: int | None) -> object:
        if not self.exited.called:
            self.exited.callback(status)
        return main.CONNECTION_DONE

    def writeSomeData(self, data: bytes) -> int | BaseException:
        return main.CONNECTION_LOST

    def kill(self, signal: int) -> None:
        """Send C{signal} through the pidfd (no pid reuse race)."""
        if self.fd >= 0:
            try:
                signal_.pidfd_send_signal(self.fd, signal)
            except ProcessLookupError:
                pass



def isNamespaceInit(pid: int) -> bool:
    """
    Whether C{pid} is process 1 of its own pid namespace (C{NSpid} in
    C{/proc/<pid>/status} ends in 1).  When such a process has exited, the
    kernel has killed every other process of the namespace and waited for
    them, so nothing of the container is left to kill.
    """
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    ids = line.split()[1:]
                    return len(ids) > 1 and ids[-1] == "1"
    except OSError:
        pass
    return False


def _children() -> list[int]:
    pids: list[int] = []
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return pids
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/children") as f:
                pids.extend(int(p) for p in f.read().split())
        except OSError:
            continue
    return pids


def reapStrays(owned: Iterable[int]) -> list[tuple[int, int]]:
    """
    Reap zombie children that are not in C{owned}.

    @return: C{(pid, status)} for each process reaped.
    """
    keep = set(owned)
    reaped = []
    for pid in _children():
        if pid in keep:
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            continue
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            continue
        if done:
            reaped.append((pid, os.waitstatus_to_exitcode(status)))
    return reaped
