"""
OCI bundles for the demo and the tests.

L{ensureDemoBundle} builds, once, a small OCI bundle whose root filesystem is
the host's statically linked busybox (Debian package C{busybox-static}) and
whose C{config.json} comes from C{runc spec}, so that it always matches the
installed runtime.  L{writeBundleConfig} writes cheap extra bundles that share
the demo root filesystem (by absolute C{root.path}) but run other commands.

C{python -m shimd.bundle [PATH]} builds the demo bundle and prints its path.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile

DEFAULT_DEMO_BUNDLE = os.environ.get("SHIMD_DEMO_BUNDLE", "/var/lib/shimd/demo-bundle")

DEMO_ARGS = ["sh", "-c", "echo hello from a shimd container; uname -sr; exit 0"]

# Bump when the layout or the config produced below changes: an existing
# bundle with another format is rebuilt.
BUNDLE_FORMAT = 1
MARKER = ".shimd-demo-bundle"

_BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")

_PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
)
_GROUP = "root:x:0:\ntty:x:5:\nnogroup:x:65534:\n"


class BundleError(Exception):
    """
    The demo bundle cannot be built (runtime or busybox missing, ...).
    """


def findBusybox() -> str:
    """
    Return the path of a statically linked busybox on the host.

    C{$SHIMD_BUSYBOX} overrides the search.

    @raise BundleError: if there is none, or it is dynamically linked.
    """
    override = os.environ.get("SHIMD_BUSYBOX")
    candidates = [override] if override else list(_BUSYBOX_CANDIDATES)
    if not override:
        found = shutil.which("busybox")
        if found:
            candidates.append(found)
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            if not isStaticELF(path):
                raise BundleError(
                    f"{path} is dynamically linked; install the Debian package "
                    "busybox-static (make deps)"
                )
            return path
    raise BundleError("busybox not found; install the Debian package busybox-static (make deps)")


def isStaticELF(path: str) -> bool:
    """
    Return C{True} if C{path} is an ELF executable without a program
    interpreter (C{PT_INTERP}), that is, one that needs no shared libraries.
    """
    with open(path, "rb") as f:
        ident = f.read(16)
        if ident[:4] != b"\x7fELF":
            return False
        is64 = ident[4] == 2
        endian = "<" if ident[5] == 1 else ">"
        if is64:
            header = f.read(48)
            phoff, = struct.unpack(endian + "Q", header[16:24])
            phentsize, phnum = struct.unpack(endian + "HH", header[38:42])
        else:
            header = f.read(36)
            phoff, = struct.unpack(endian + "I", header[12:16])
            phentsize, phnum = struct.unpack(endian + "HH", header[26:30])
        PT_INTERP = 3
        for i in range(phnum):
            f.seek(phoff + i * phentsize)
            pType, = struct.unpack(endian + "I", f.read(4))
            if pType == PT_INTERP:
                return False
    return True


def isComplete(path: str) -> bool:
    """
    Return C{True} if C{path} holds a demo bundle of the current format.
    """
    try:
        with open(os.path.join(path, MARKER)) as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return False
    return (
        isinstance(marker, dict)
        and marker.get("format") == BUNDLE_FORMAT
        and os.path.isfile(os.path.join(path, "config.json"))
        and os.path.isfile(os.path.join(path, "rootfs", "bin", "busybox"))
    )


def ensureDemoBundle(path: str = DEFAULT_DEMO_BUNDLE, runtime: str = "runc") -> str:
    """
    Build the demo OCI bundle at C{path} unless it is already there.

    The bundle is built in a temporary directory next to C{path} and renamed
    into place, so a bundle at C{path} is always complete, and concurrent
    callers are safe.  A bundle of an older format (or an empty directory) at
    C{path} is replaced; any other existing directory is an error.

    @param runtime: the OCI runtime whose C{spec} command writes the default
        C{config.json}.
    @return: the absolute path of the bundle.
    @raise BundleError: if it cannot be built.
    """
    path = os.path.abspath(path)
    if isComplete(path):
        return path
    if os.path.lexists(path) and not _replaceable(path):
        raise BundleError(f"{path} exists and is not a shimd demo bundle")

    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp.", dir=parent)
    try:
        os.chmod(tmp, 0o755)
        _buildRootfs(os.path.join(tmp, "rootfs"), findBusybox())
        _writeDemoConfig(tmp, runtime)
        with open(os.path.join(tmp, MARKER), "w") as f:
            json.dump({"format": BUNDLE_FORMAT, "runtime": runtime}, f)
            f.write("\n")
        _install(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _replaceable(path: str) -> bool:
    if os.path.islink(path) or not os.path.isdir(path):
        return False
    return os.path.exists(os.path.join(path, MARKER)) or not os.listdir(path)


def _install(tmp: str, path: str) -> None:
    """
    Rename the finished bundle C{tmp} to C{path}.
    """
    try:
        os.rename(tmp, path)
        return
    except OSError:
        # path exists: another builder won the race, or it is stale.
        if isComplete(path):
            shutil.rmtree(tmp, ignore_errors=True)
            return
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old.", dir=os.path.dirname(path))
    os.rmdir(old)
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except OSError:
        if not isComplete(path):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def _buildRootfs(rootfs: str, busybox: str) -> None:
    """
    Make a minimal root filesystem: busybox and its applets in /bin, merged
    /sbin, /usr/bin and /usr/sbin, mount points, and a tiny /etc.
    """
    bindir = os.path.join(rootfs, "bin")
    os.makedirs(bindir, mode=0o755)
    os.chmod(rootfs, 0o755)
    target = os.path.join(bindir, "busybox")
    shutil.copy2(busybox, target)
    os.chmod(target, 0o755)

    applets = subprocess.run(
        [busybox, "--list"], check=True, stdout=subprocess.PIPE, text=True
    ).stdout.split()
    for applet in applets:
        # The list includes "busybox" itself: never replace the binary.
        if applet == "busybox" or "/" in applet:
            continue
        os.symlink("busybox", os.path.join(bindir, applet))

    os.symlink("bin", os.path.join(rootfs, "sbin"))
    os.makedirs(os.path.join(rootfs, "usr"), mode=0o755)
    os.symlink("../bin", os.path.join(rootfs, "usr", "bin"))
    os.symlink("../bin", os.path.join(rootfs, "usr", "sbin"))

    for name in ("proc", "sys", "dev", "etc", "root", "var", "run"):
        os.makedirs(os.path.join(rootfs, name), mode=0o755)
    os.chmod(os.path.join(rootfs, "root"), 0o700)
    tmpdir = os.path.join(rootfs, "tmp")
    os.makedirs(tmpdir)
    os.chmod(tmpdir, 0o1777)

    etc = os.path.join(rootfs, "etc")
    for name, text in (
        ("passwd", _PASSWD),
        ("group", _GROUP),
        ("hostname", "shimd\n"),
        ("hosts", "127.0.0.1\tlocalhost shimd\n::1\tlocalhost\n"),
    ):
        with open(os.path.join(etc, name), "w") as f:
            f.write(text)


def _writeDemoConfig(bundle: str, runtime: str) -> None:
    """
    Run C{<runtime> spec} in C{bundle} and adapt the result for the demo.
    """
    exe = shutil.which(runtime)
    if exe is None:
        for d in ("/usr/sbin", "/usr/local/sbin", "/sbin"):
            candidate = os.path.join(d, runtime)
            if os.access(candidate, os.X_OK):
                exe = candidate
                break
    if exe is None:
        raise BundleError(f"OCI runtime {runtime!r} not found; install it (make deps)")
    result = subprocess.run(
        [exe, "spec", "--bundle", bundle],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    if result.returncode != 0:
        raise BundleError(f"{runtime} spec failed ({result.returncode}): {result.stderr.strip()}")

    configPath = os.path.join(bundle, "config.json")
    with open(configPath) as f:
        config = json.load(f)
    process = config.setdefault("process", {})
    process["terminal"] = False
    process["args"] = list(DEMO_ARGS)
    process["cwd"] = "/"
    process.pop("consoleSize", None)
    root = config.setdefault("root", {})
    root["path"] = "rootfs"
    root["readonly"] = True
    config["hostname"] = "shimd"
    mounts = [m for m in config.get("mounts", []) if m.get("destination") != "/tmp"]
    mounts.append(
        {
            "destination": "/tmp",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "nodev", "mode=1777", "size=65536k"],
        }
    )
    config["mounts"] = mounts
    _writeJSON(configPath, config)


def _writeJSON(path: str, obj: object) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def writeBundleConfig(
    bundle: str,
    args: list[str],
    terminal: bool = False,
    consoleSize: tuple[int, int] | None = None,
    demoBundle: str | None = None,
    runtime: str = "runc",
) -> str:
    """
    Write a new bundle directory C{bundle} that runs C{args} on the demo
    root filesystem.

    Only C{config.json} is written: its C{root.path} is the absolute path of
    the demo bundle's C{rootfs} (built first if needed), which stays
    read-only; C{/tmp} is a tmpfs.

    @param args: C{process.args}.
    @param terminal: C{process.terminal}; with C{True} the runtime needs a
        C{--console-socket}.
    @param consoleSize: C{(height, width)}, that is C{(rows, columns)}, for
        C{process.consoleSize}; omitted when C{None}.
    @param demoBundle: the demo bundle to use; default L{DEFAULT_DEMO_BUNDLE}.
    @return: the absolute path of C{bundle}.
    """
    demo = ensureDemoBundle(demoBundle or DEFAULT_DEMO_BUNDLE, runtime)
    bundle = os.path.abspath(bundle)
    with open(os.path.join(demo, "config.json")) as f:
        config = json.load(f)
    process = config["process"]
    process["args"] = list(args)
    process["terminal"] = bool(terminal)
    if consoleSize is not None:
        height, width = consoleSize
        process["consoleSize"] = {"height": int(height), "width": int(width)}
    else:
        process.pop("consoleSize", None)
    config["root"]["path"] = os.path.join(demo, "rootfs")
    os.makedirs(bundle, mode=0o755, exist_ok=True)
    _writeJSON(os.path.join(bundle, "config.json"), config)
    return bundle


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) > 1 or (argv and argv[0].startswith("-")):
        sys.stderr.write("usage: python -m shimd.bundle [PATH]\n")
        return 2
    try:
        path = ensureDemoBundle(argv[0] if argv else DEFAULT_DEMO_BUNDLE)
    except (BundleError, OSError, subprocess.CalledProcessError) as e:
        sys.stderr.write(f"shimd.bundle: {e}\n")
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
