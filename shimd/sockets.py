# -*- test-case-name: tests.test_listener -*-
"""
Listening unix sockets, made with plain system calls.

The shim binds its sockets (the attach socket, runc's console socket)
before Twisted is loaded (L{shimd.launch}); L{shimd.listener.UnixListener}
accepts on them once the reactor runs.  Clients that connect in between
wait in the backlog.

A socket is created with its final mode: it is bound under a umask that
leaves only the owner's bits, so it is never, even for an instant, open to
others.

Nothing here imports Twisted.
"""

from __future__ import annotations

import errno
import os
import socket
import stat

SUN_PATH_MAX = 107
"""Longest path C{bind()} takes for a unix socket (C{sun_path} is 108 bytes)."""


class UnixSocket:
    """
    A listening unix socket and the path it is bound to.

    @ivar directory: a private directory made for it (removed with it), or
        L{None}.
    """

    def __init__(self, sock: socket.socket, path: str, directory: str | None = None) -> None:
        self.socket = sock
        self.path = path
        self.directory = directory

    def fileno(self) -> int:
        return self.socket.fileno()

    def close(self) -> None:
        """Close the socket, remove its file (and its directory); idempotent."""
        self.socket.close()
        for remove, path in ((os.unlink, self.path), (os.rmdir, self.directory)):
            if path is None:
                continue
            try:
                remove(path)
            except FileNotFoundError:
                pass
        self.directory = None


def removeStaleSocket(path: str) -> None:
    """
    Unlink a leftover socket file at C{path}.

    @raise OSError: C{EADDRINUSE} if a process listens there, C{EISDIR} if
        a directory is in the way.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        raise OSError(errno.EISDIR, "a directory is in the way", path)
    if stat.S_ISSOCK(st.st_mode):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            probe.connect(path)
            live = True
        except BlockingIOError:
            live = True  # a listener whose backlog is full
        except OSError:
            live = False
        finally:
            probe.close()
        if live:
            raise OSError(errno.EADDRINUSE, "another process is listening on it", path)
    os.unlink(path)


def listenUnix(path: str, backlog: int, mode: int = 0o600, directory: str | None = None) -> UnixSocket:
    """
    Bind a non-blocking, close-on-exec C{SOCK_STREAM} socket to C{path}
    with C{mode} and listen.

    @raise OSError: the path is too long (C{ENAMETOOLONG}), or C{bind()}
        or C{listen()} failed.
    """
    if len(os.fsencode(path)) > SUN_PATH_MAX:
        raise OSError(
            errno.ENAMETOOLONG,
            f"{len(os.fsencode(path))} bytes, longer than a unix socket allows ({SUN_PATH_MAX})",
            path,
        )
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        old = os.umask(0o777 & ~mode)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        try:
            sock.listen(backlog)
        except BaseException:
            os.unlink(path)
            raise
    except BaseException:
        sock.close()
        raise
    return UnixSocket(sock, path, directory)


def listenPrivate(parent: str | None, name: str, backlog: int) -> UnixSocket:
    """
    Listen on C{<parent>/shimd-XXXXXXXX/<name>}: a new directory (mode
    0700) with a short path, for a socket given to another program (runc's
    C{--console-socket}).  C{parent}: C{/run} if writable, else C{/tmp}.
    """
    if parent is None:
        parent = "/run" if os.access("/run", os.W_OK) else "/tmp"
    for _ in range(100):
        directory = os.path.join(parent, "shimd-" + os.urandom(4).hex())
        try:
            os.mkdir(directory, 0o700)
            break
        except FileExistsError:
            continue
    else:
        raise OSError(errno.EEXIST, "no free name for a private directory", parent)
    try:
        return listenUnix(os.path.join(directory, name), backlog, 0o600, directory)
    except BaseException:
        os.rmdir(directory)
        raise
