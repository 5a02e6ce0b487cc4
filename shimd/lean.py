"""
Keep the shim process small: one runs beside every container.

Twisted imports its TLS support (pyOpenSSL, cryptography, service_identity)
whenever it is installed, and the standard library's C{ssl} comes in through
asyncio and C{http.cookiejar}; a shim never speaks TLS.  L{keepLean}, called
by C{isulad-shim} before anything imports Twisted:

 - refuses those modules (an C{ImportError}, which Twisted and asyncio treat
   as "no TLS here");
 - makes C{http.cookiejar} (imported by C{twisted.python.compat}, and with it
   C{urllib.request}, C{http.client} and C{email}) load on first use only;
 - does the same for the reactor's TCP, UDP and unix-socket transports
   (L{LAZY}).

Measured with C{bench/run.py}: about 12 MB less RSS and 60 ms less start-up
per shim.  C{SHIMD_ALLOW_TLS=1} in the environment turns it off.

L{importDeferWithoutAsyncio}, called by C{isulad-shim} before the first
Twisted import, loads C{twisted.internet.defer} (which imports three
names from asyncio, and with it the whole asyncio package: 1.9 MB of RSS)
with a stand-in for asyncio: the two classes are used only in
annotations, and C{iscoroutine} is replaced by an equal test.  The
stand-in leaves C{sys.modules} at once: a later C{import asyncio} gets the
real one.

L{releaseStartupMemory}, run once when the container is up, gives the
garbage of start-up (imports, runc's output, the first log events) back to
the operating system: about 1 MB of RSS.

L{tuneMalloc}, called by the shim's entry points (not by a daemon that
embeds the service: the setting is the whole process's), keeps glibc from
giving the IO path's buffers back to the kernel after every chunk.
"""

from __future__ import annotations

import collections.abc
import gc
import os
import sys
import types

TYPE_CHECKING = False  # not typing's: see shimd.cli
if TYPE_CHECKING:
    from importlib.abc import Loader as _LoaderBase
    from importlib.machinery import ModuleSpec
    from typing import Any
else:
    _LoaderBase = object  # importlib.abc is not loaded for this

REFUSED = ("OpenSSL", "cryptography", "service_identity", "ssl", "_ssl")
"""Top-level modules a shim never loads."""

LAZY = (
    "http.cookiejar", "inspect",
    "twisted.internet.tcp", "twisted.internet.udp", "twisted.internet.unix",
    "ipaddress", "random", "unicodedata", "shutil", "tokenize", "textwrap",
    "copy", "fnmatch", "pty", "bz2", "lzma",
)
"""Modules loaded only when an attribute is first used.

 - C{inspect} (8 ms, with C{ast}, C{dis}, C{tokenize}) is imported by
   C{dataclasses}, which needs it only for a class without a docstring: so
   it loads with Twisted (attrs asks it about converters), after runc was
   started, not before.
 - C{twisted.internet.tcp}, C{udp} and C{unix} (with C{_newtls}) are
   imported by the reactor's module, which uses them only in C{listenTCP},
   C{connectUNIX} and the like.  A shim opens no TCP or UDP port, and its
   unix sockets are its own (L{shimd.listener}, L{shimd.sockets}).
   Measured: 0.45 MB less RSS beside an idle container (23.7 -> 23.3 MB);
   the reactor's import about 6 ms shorter; in workload 1 the shim's first
   read 3-15 ms sooner after C{runc start} (three runs of 12 alternating
   rounds, with the modules below as well), the time to the exit report
   the same within the noise.
 - The rest come from the standard library, imported at load time by
   modules that use them only in calls a running shim does not make:
   C{ipaddress} (by C{urllib.parse}), C{random} (C{twisted.internet.protocol}),
   C{unicodedata} (attrs), C{copy} (C{dataclasses}), C{fnmatch}
   (C{pathlib}), C{shutil}, C{bz2} and C{lzma} (C{zipfile}, for Twisted's
   plugin paths), C{tokenize} (C{linecache}, to read source for a
   traceback), C{textwrap} (C{traceback}) and C{pty}
   (C{twisted.internet.process}).  Together about 1.2 MB of RSS per shim.
   C{bz2} and C{lzma} are optional C modules: should one be missing,
   C{zipfile} finds that out when it compresses, which a shim never does."""


class _Lean:
    """
    A meta path finder: refuses L{REFUSED}, and imports each module of
    L{LAZY} as a L{_LazyModule} (through the import system, so that its
    package gets the attribute too: C{import http.cookiejar} then
    C{http.cookiejar.CookieJar} works).
    """

    released: set[str] = set()
    """Lazy modules whose real import has begun: found as usual from then on."""

    @classmethod
    def find_spec(cls, name: str, path: Any = None, target: Any = None) -> ModuleSpec | None:
        if name.partition(".")[0] in REFUSED:
            raise ModuleNotFoundError(f"{name} is not loaded in a shim (shimd.lean)", name=name)
        if name in LAZY and name not in cls.released:
            from importlib.machinery import ModuleSpec

            return ModuleSpec(name, _LAZY_LOADER)
        return None

    @staticmethod
    def invalidate_caches() -> None:
        pass


class _LazyModule(types.ModuleType):
    """Stands in for a module until an attribute it lacks is asked for; it
    then imports the real module (once) and answers from it."""

    def __getattr__(self, attr: str) -> Any:
        if attr == "__path__":
            # Asked by the import system as it sets the stand-in up: the
            # modules of LAZY are plain modules, not packages.
            raise AttributeError(attr)
        name = self.__name__
        _Lean.released.add(name)
        if sys.modules.get(name) is self:
            del sys.modules[name]
        import importlib

        return getattr(importlib.import_module(name), attr)


class _LazyLoader(_LoaderBase):
    """Makes the L{_LazyModule} for a spec of L{_Lean}; runs no code."""

    def create_module(self, spec: ModuleSpec) -> types.ModuleType:
        module = _LazyModule(spec.name)
        # Present, so that a probe such as inspect.getmodule's
        # hasattr(module, "__file__") does not load the real module.
        module.__file__ = None
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


_LAZY_LOADER = _LazyLoader()


def keepLean(environ: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    """
    Install the refusals and the lazy modules (once).  A module of L{LAZY}
    already imported stays as it is.

    @return: whether they are in place.
    """
    if environ.get("SHIMD_ALLOW_TLS"):
        return False
    if _Lean not in sys.meta_path:
        sys.meta_path.insert(0, _Lean)
    return True


class _NotLoaded:
    """Stands for C{asyncio.AbstractEventLoop} and C{asyncio.Future} in
    C{twisted.internet.defer}, which names them only in annotations."""


_COROUTINE_TYPES = (types.CoroutineType, types.GeneratorType, collections.abc.Coroutine)


def _iscoroutine(obj: object) -> bool:
    """C{asyncio.iscoroutine} (Python 3.11): a coroutine, or a generator."""
    return isinstance(obj, _COROUTINE_TYPES)


def importDeferWithoutAsyncio() -> bool:
    """
    Import C{twisted.internet.defer} with a stand-in for asyncio (once; a
    no-op if either is loaded already or L{keepLean} was turned off).

    @return: whether the stand-in was used.
    """
    if "twisted.internet.defer" in sys.modules or "asyncio" in sys.modules or _Lean not in sys.meta_path:
        return False
    stub = types.ModuleType("asyncio")
    stub.AbstractEventLoop = _NotLoaded  # type: ignore[attr-defined]
    stub.Future = _NotLoaded  # type: ignore[attr-defined]
    stub.iscoroutine = _iscoroutine  # type: ignore[attr-defined]
    sys.modules["asyncio"] = stub
    try:
        import twisted.internet.defer  # noqa: F401
    finally:
        if sys.modules.get("asyncio") is stub:
            del sys.modules["asyncio"]
    return True


def releaseStartupMemory() -> None:
    """
    Collect the garbage of start-up and return free heap pages to the
    operating system (glibc's C{malloc_trim}; nothing elsewhere).
    """
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


MMAP_THRESHOLD = 512 * 1024
"""Allocations below this come from the heap (glibc's default: 128 KiB)."""

TRIM_THRESHOLD = 1024 * 1024
"""Free heap above this is handed back to the kernel (default: 128 KiB)."""

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tuneMalloc() -> bool:
    """
    Raise glibc's mmap and trim thresholds (C{mallopt}).

    Each chunk of container output (up to 64 KiB, read at once) allocates
    and frees a few buffers of 100-200 KB: the chunk and its json-file
    records.  With glibc's defaults, whenever they were the top of the
    heap, freeing them shrinks the heap (C{brk}) and the next chunk grows
    it again on fresh pages (strace of a workload-1 shim: 5,895 C{brk}
    calls for 3,222 chunks, 39 with these settings; a replay of the log
    path alone took some 50 page faults a chunk, and twice the time).
    Whether that happens depends on the heap's layout, so the
    shim's CPU for the same output varied by half from run to run
    (workload 1 of C{make bench}: 0.84-0.91 CPU-s with the defaults,
    0.52-0.70 with these).  At most L{TRIM_THRESHOLD} of free heap is
    kept; L{releaseStartupMemory}'s C{malloc_trim} still returns all of it.

    @return: whether glibc took the settings.
    """
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
