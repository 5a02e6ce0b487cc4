"""
A minimal attach client for shimd, written against the wire protocol
(isulad-shim-spec section 6), not against shimd's own client code:

 - the client makes three FIFOs (mode 0600) under the container's workdir
   and opens them first: out and err C{O_RDONLY|O_NONBLOCK}, in C{O_RDWR};
 - it connects to C{<workdir>/attach.sock} and sends C{"<in> <out> <err>"};
 - the shim replies with a 4-byte native int, 0 for success.

Detaching is closing the FIFOs.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import time

now = time.perf_counter


class AttachUnavailable(Exception):
    """Nobody listens on the attach socket."""


class Session:
    def __init__(self, workdir: str, name: str) -> None:
        self.dir = os.path.join(workdir, "bench-attach", name)
        os.makedirs(self.dir, mode=0o700)
        self.paths = {}
        for stream in ("in", "out", "err"):
            path = os.path.join(self.dir, f"{stream}-fifo")
            os.mkfifo(path, 0o600)
            os.chmod(path, 0o600)
            self.paths[stream] = path
        flags = os.O_NONBLOCK | os.O_CLOEXEC
        self.out = os.open(self.paths["out"], os.O_RDONLY | flags)
        self.err = os.open(self.paths["err"], os.O_RDONLY | flags)
        self.inp = os.open(self.paths["in"], os.O_RDWR | flags)
        self.received = {self.out: 0, self.err: 0}
        self.ended: set[int] = set()

    def attach(self, socketPath: str, timeout: float = 10.0) -> tuple[int, float]:
        """
        Ask the shim to attach this session.

        @return: (the shim's reply, seconds from connect to reply).
        @raise AttachUnavailable: nothing listens on C{socketPath}.
        """
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        s.settimeout(timeout)
        message = " ".join(self.paths[k] for k in ("in", "out", "err")).encode()
        try:
            t0 = now()
            try:
                s.connect(socketPath)
            except (FileNotFoundError, ConnectionRefusedError) as e:
                raise AttachUnavailable(str(e)) from e
            s.sendall(message)
            reply = b""
            while len(reply) < 4:
                chunk = s.recv(4 - len(reply))
                if not chunk:
                    break
                reply += chunk
            t1 = now()
        finally:
            s.close()
        if len(reply) < 4:
            return -1, t1 - t0
        return struct.unpack("=i", reply)[0], t1 - t0

    def readable(self, fd: int, buf: bytearray) -> None:
        """Read what is there from C{fd} (out or err) and count it."""
        view = memoryview(buf)
        while True:
            try:
                n = os.readv(fd, [view])
            except BlockingIOError:
                return
            if n == 0:
                self.ended.add(fd)
                return
            self.received[fd] += n
            if n < len(buf):
                return

    @property
    def outBytes(self) -> int:
        return self.received[self.out]

    def close(self) -> None:
        for fd in (self.out, self.err, self.inp):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)
