# -*- test-case-name: tests.test_cli -*-
"""
Command-line front ends.

 - C{isulad-shim ID BUNDLE RUNTIME LOGLEVEL [EXEC_TIMEOUT]}: iSulad's argv,
   run with the workdir as cwd; the status goes to stdout as a 4-byte
   native int.
 - C{shimd run [--bundle DIR] [-- CMD ARGS...]}: the user-facing command;
   plays the engine's part (see L{shimd.engine}).
"""

from __future__ import annotations

import os
import signal
import struct
import sys

# Not typing.TYPE_CHECKING: isulad-shim imports nothing it can do without
# before runc is started (shimd.launch); mypy knows the name.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    import threading
    from typing import Any, NoReturn

FOREVER = 7 * 24 * 3600.0  # "no timeout", in a form poll() and communicate() accept
USAGE = "usage: isulad-shim ID BUNDLE RUNTIME LOGLEVEL [EXEC_TIMEOUT]\n"
STARTUP_TRIM_DELAY = 1.0
"""Seconds after start-up that L{shimd.lean.releaseStartupMemory} runs."""


def runShim(reactor: Any, config: Any, launch: Any = None) -> int:
    """
    Run one L{shimd.service.ShimService} on C{reactor} until it is done.

    @param launch: a L{shimd.launch.Launch} already made, if any.
    """
    from shimd.lean import tuneMalloc
    from shimd.service import EXIT_ERROR, ShimService

    tuneMalloc()  # this process is the shim's own
    shim = ShimService(config, reactor, launch=launch)
    result: list[int] = []

    def done(code: int) -> None:
        result.append(code)
        reactor.stop()

    shim.done.addCallback(done)
    reactor.callWhenRunning(shim.startService)
    # Once the container is up: start-up garbage back to the OS (~1 MB RSS).
    from shimd.lean import releaseStartupMemory

    reactor.callLater(STARTUP_TRIM_DELAY, releaseStartupMemory)
    reactor.run()
    return result[0] if result else EXIT_ERROR


def isuladShimMain(argv: list[str] | None = None) -> NoReturn:
    """
    The C{isulad-shim} drop-in: argv as iSulad passes it, cwd = workdir.

    runc starts before Twisted is loaded (L{shimd.launch}): the engine
    waits for the container's pid file, not for our imports; and the
    container's output is copied meanwhile (L{shimd.earlycopy}).
    """
    # Before anything imports Twisted: no TLS modules in a shim process.
    from shimd.lean import keepLean

    keepLean()
    args = sys.argv[1:] if argv is None else argv
    # The engine may leave SIGPIPE at its default; a gone reader must be an
    # EPIPE error for us, never a signal.
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    if len(args) < 4:
        sys.stderr.write(USAGE)
        sys.exit(1)
    containerId, bundle, runtime, level = args[:4]
    timeout = 0
    if len(args) > 4:
        try:
            timeout = int(args[4])
            if timeout < 0:
                raise ValueError
        except ValueError:
            sys.stderr.write(f"isulad-shim: bad exec timeout {args[4]!r}\n")
            sys.exit(1)

    workdir = os.getcwd()
    from shimd.launch import ShimConfig, describeFailure, launchShim, shimLogWritable

    # The shim log first (iSulad's order): nothing starts if it cannot be written.
    if not shimLogWritable(workdir):
        sys.stderr.write("failed to init shim log")
        sys.exit(1)
    config = ShimConfig(
        workdir=workdir,
        containerId=containerId,
        bundle=bundle,
        runtimeCommand=runtime,
        execTimeout=timeout,
        statusFd=1,
    )
    launch = None
    failure = None
    try:
        launch = launchShim(config)
        launch.copyEarly()
    except Exception as e:
        failure = describeFailure(e)
        if failure is None:
            raise

    # runc is working: now Twisted.
    from shimd.lean import importDeferWithoutAsyncio

    importDeferWithoutAsyncio()
    from shimd.shimlog import LEVELS, startShimLogging

    try:
        startShimLogging(workdir, level.lower() if level.lower() in LEVELS else "info")
    except OSError:
        sys.stderr.write("failed to init shim log")
        failure = failure or "failed to init shim log"
    if failure is not None:
        from twisted.logger import Logger

        Logger(namespace="shimd.service.ShimService").error("{msg}", msg=failure)
        if launch is not None:
            launch.close()
        sys.exit(1)

    from twisted.internet import reactor

    sys.exit(runShim(reactor, config, launch))


def _run(opts: argparse.Namespace) -> int:
    from shimd.attach import DEFAULT_DETACH_KEYS, parseDetachKeys
    from shimd.bundle import ensureDemoBundle
    from shimd.engine import Engine, EngineError
    from shimd.localterm import localTerminal, windowSize

    bundle = opts.bundle or ensureDemoBundle()
    command = opts.command
    engine = Engine(stateRoot=opts.state_root, runtime=opts.runtime)
    # -t at a terminal: raw mode, our size, and our keys go in (-i implied),
    # the detach keys too.
    localTty = opts.tty and os.isatty(0)
    keys = DEFAULT_DETACH_KEYS if opts.detach_keys is None else opts.detach_keys
    try:
        detachKeys = parseDetachKeys(keys) if localTty else b""
    except ValueError as e:
        sys.stderr.write(f"shimd: {e}\n")
        return 125
    interactive = opts.interactive or localTty
    size = windowSize(0) if localTty else None
    try:
        c = engine.prepare(
            bundle,
            args=command or None,
            containerId=opts.id,
            stdin=interactive,
            logMaxsize=opts.log_max_size,
            logMaxfile=opts.log_max_file,
            terminal=True if opts.tty else None,
            consoleSize=(size[1], size[0]) if size else None,
            resize=opts.tty,
        )
    except (EngineError, OSError) as e:
        sys.stderr.write(f"shimd: {e}\n")
        return 125

    import contextlib
    import threading

    terminal = contextlib.ExitStack()  # restored before any message
    detached = threading.Event()
    signal.signal(signal.SIGTERM, _interrupted)  # unwind: restore our terminal, say where it runs
    try:
        engine.create(c, detach=True)
        if localTty:
            terminal.enter_context(localTerminal(0, c.process["resizeFifo"]))
        engine.start(c)
        if interactive:
            threading.Thread(target=_copyStdin, args=(c, detachKeys, detached), daemon=True).start()
        _, _, status = engine.collect(c, timeout=FOREVER, onOutput=_copyOutput)
    except EngineError as e:
        terminal.close()
        sys.stderr.write(f"shimd: {e}\n")
        engine.close(c, remove=True)
        return 125
    except BrokenPipeError:
        # Whoever reads our output is gone (shimd run -- yes | head): stop
        # the container, as SIGPIPE would stop a process in a pipeline.
        terminal.close()
        _silenceStdout()
        engine.runtimeCall(c, "kill", c.id, "KILL")
        _drain(engine, c)
        _close(engine, c, opts.keep)
        return 128 + signal.SIGPIPE
    except KeyboardInterrupt as e:
        terminal.close()
        if detached.is_set():
            sys.stderr.write(f"\nshimd: detached; the container runs on: shimd attach {c.workdir}\n")
            return 0
        sys.stderr.write(f"\nshimd: the container keeps running; its workdir is {c.workdir}\n")
        return 128 + (e.args[0] if e.args and isinstance(e.args[0], int) else signal.SIGINT)
    terminal.close()
    _close(engine, c, opts.keep)
    return status


def _close(engine: Any, c: Any, keep: bool) -> None:
    """The container has ended: remove its workdir, or say where it is kept."""
    engine.close(c, remove=not keep)
    if keep:
        sys.stderr.write(f"shimd: the workdir is kept: {c.workdir}\n")


def _silenceStdout() -> None:
    """Our reader is gone: send what is left (and Python's exit flush) nowhere."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _drain(engine: Any, c: Any) -> None:
    """Read the rest (to nowhere) so the shim can finish and report."""
    try:
        engine.collect(c, timeout=30)
    except Exception:
        pass


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signum)


def _copyStdin(c: Any, detachKeys: bytes = b"", detached: threading.Event | None = None) -> None:
    """
    Copy our stdin to the container's; on the detach keys, stop and
    interrupt the main thread (it leaves the container running).
    """
    import threading

    from shimd.attach import DetachFilter

    fd = sys.stdin.fileno()
    keys = DetachFilter(detachKeys)
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:
            data = b""
        eof = not data
        data, seen = (keys.flush(), False) if eof else keys.feed(data)
        try:
            if data:
                c.writeStdin(data)
            if eof:
                c.closeStdin()
                return
        except (OSError, KeyError):
            return
        if seen and detached is not None:
            detached.set()
            mainIdent = threading.main_thread().ident
            assert mainIdent is not None  # the main thread is always started
            signal.pthread_kill(mainIdent, signal.SIGINT)
            return


def _exec(opts: argparse.Namespace) -> int:
    from shimd.engine import Engine, EngineError
    from shimd.localterm import localTerminal, windowSize

    command = opts.command
    if not command:
        sys.stderr.write("shimd exec: no command given\n")
        return 125
    localTty = opts.tty and os.isatty(0)
    interactive = opts.interactive or localTty
    size = windowSize(0) if localTty else None
    engine = Engine(runtime=opts.runtime)
    try:
        c = engine.load(opts.workdir)
        e = engine.prepareExec(
            c, command, stdin=interactive, terminal=opts.tty,
            extra={"consoleSize": {"height": size[1], "width": size[0]}} if size else None,
        )
    except (EngineError, OSError) as err:
        sys.stderr.write(f"shimd exec: {err}\n")
        return 125
    import contextlib
    import threading

    terminal = contextlib.ExitStack()
    signal.signal(signal.SIGTERM, _interrupted)
    try:
        engine.spawnShim(e, opts.timeout or None)
        engine.waitPid(e)
        if localTty:
            terminal.enter_context(localTerminal(0, e.process["resizeFifo"]))
        if interactive:
            threading.Thread(target=_copyStdin, args=(e,), daemon=True).start()
        engine.collect(e, timeout=FOREVER, onOutput=_copyOutput)
        code = engine.reapShim(e, timeout=FOREVER)
    except EngineError as err:
        terminal.close()
        sys.stderr.write(f"shimd exec: {err}\n")
        return 126
    except BrokenPipeError:
        terminal.close()
        _silenceStdout()
        return 128 + signal.SIGPIPE
    except KeyboardInterrupt as err:
        terminal.close()
        sys.stderr.write("\nshimd exec: interrupted; the process was left running\n")
        return 128 + (err.args[0] if err.args and isinstance(err.args[0], int) else signal.SIGINT)
    finally:
        terminal.close()
        engine.close(e)
    status: int | None = struct.unpack("=i", e.shimStatus)[0] if len(e.shimStatus) == 4 else None
    if status is None:
        if code == 2:
            sys.stderr.write(f"shimd exec: timed out after {opts.timeout}s; killed\n")
            return 124
        sys.stderr.write(f"shimd exec: {engine.shimErrors(e) or 'the shim failed'}\n")
        return 126
    return status


def _copyOutput(name: str, data: bytes) -> None:
    stream = sys.stdout.buffer if name == "stdout" else sys.stderr.buffer
    stream.write(data)
    stream.flush()


def main(argv: list[str] | None = None) -> int:
    """C{shimd}: the user-facing command."""
    import argparse

    from shimd.engine import DEFAULT_STATE_ROOT

    parser = argparse.ArgumentParser(prog="shimd", description="A container shim on Twisted.")
    sub = parser.add_subparsers(dest="verb", required=True)
    run = sub.add_parser("run", help="run a container through the shim and wait for it")
    run.add_argument("--bundle", help="OCI bundle (default: the demo busybox bundle)")
    run.add_argument("--id", help="container id (default: random)")
    run.add_argument("--state-root", default=DEFAULT_STATE_ROOT, help="where workdirs go")
    run.add_argument("--runtime", default="runc", help="OCI runtime command")
    run.add_argument("-i", "--interactive", action="store_true", help="copy stdin to the container")
    run.add_argument("-t", "--tty", action="store_true",
                     help="give the container a terminal (at a terminal: raw mode, -i implied)")
    run.add_argument("--detach-keys",
                     help="with -t at a terminal: leave the container running (default ctrl-q; '' disables)")
    run.add_argument("--log-max-size", type=int, default=10 << 20,
                     help="json-file log: bytes per file (default 10 MiB; 0: no limit)")
    run.add_argument("--log-max-file", type=int, default=3, help="json-file log: files kept (default 3)")
    run.add_argument("--keep", action="store_true", help="keep the workdir after the exit")
    run.add_argument("command", nargs="*", help="-- CMD ARGS... (overrides the bundle)")
    ex = sub.add_parser("exec", help="run a process in a running container")
    ex.add_argument("workdir", help="the container's workdir (as printed by shimd run)")
    ex.add_argument("--runtime", default="runc", help="OCI runtime command")
    ex.add_argument("-i", "--interactive", action="store_true", help="copy stdin to the process")
    ex.add_argument("-t", "--tty", action="store_true", help="give the process a terminal")
    ex.add_argument("--timeout", type=int, default=0, help="kill the process after N seconds")
    ex.add_argument("command", nargs="*", help="-- CMD ARGS...")
    at = sub.add_parser("attach", help="attach to a running container's stdio through its shim")
    at.add_argument("workdir", help="the container's workdir")
    at.add_argument("--detach-keys", help="e.g. ctrl-p,ctrl-q ('' disables; default: the shim's)")
    at.add_argument("--no-stdin", action="store_true", help="do not attach stdin")
    args = sys.argv[1:] if argv is None else list(argv)
    command = None
    if "--" in args:  # everything after it is the command, options or not
        cut = args.index("--")
        args, command = args[:cut], args[cut + 1 :]
    opts = parser.parse_args(args)
    if command is not None and hasattr(opts, "command"):
        opts.command = (opts.command or []) + command
    if os.geteuid() != 0:
        sys.stderr.write("shimd: runc needs root; run as root\n")
        return 125
    if opts.verb == "run":
        return _run(opts)
    if opts.verb == "exec":
        return _exec(opts)
    if opts.verb == "attach":
        from shimd.client import runAttach

        return runAttach(opts.workdir, opts.detach_keys, attachStdin=not opts.no_stdin)
    return 2


if __name__ == "__main__":
    sys.exit(main())
