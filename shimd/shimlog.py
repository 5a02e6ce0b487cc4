"""
The shim's own diagnostic log (C{shim-log.json}, C{attach-log.json}).

isulad-shim at the attach patch appends one JSON object per line::

    {"time": "2023-11-07 10:00:00", "level": "error", "msg": "..."}

with the local time, and the daemon greps those lines for C{"error"} when an
operation fails.  shimd keeps the key names and the time format but, unlike
iSulad (bug B9: lines cut at 126 bytes, C{msg} not escaped), always writes a
complete, valid JSON line per event, whatever the message contains.

All shimd code logs through L{twisted.logger.Logger}; L{startShimLogging}
routes those events to the file (and errors to stderr).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable

from constantly import NamedConstant
from twisted.logger import (
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    LogEvent,
    LogLevel,
    LogLevelFilterPredicate,
    PredicateResult,
    eventAsText,
    globalLogBeginner,
    globalLogPublisher,
)
from zope.interface import implementer

__all__ = [
    "LEVELS",
    "SHIM_LOG_NAME",
    "ATTACH_LOG_NAME",
    "parseLevel",
    "formatLogLine",
    "JSONLineFileObserver",
    "ClosableFilteringObserver",
    "jsonLineObserver",
    "stderrObserver",
    "startShimLogging",
    "errorMessages",
]

from shimd.launch import SHIM_LOG_NAME  # noqa: E402  (file name of the shim log in the workdir)

#: File name of the attach log in the workdir.
ATTACH_LOG_NAME = "attach-log.json"

#: Level names accepted by L{jsonLineObserver} and L{startShimLogging}.
LEVELS: dict[str, LogLevel] = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "warning": LogLevel.warn,
    "error": LogLevel.error,
    "critical": LogLevel.critical,
    "fatal": LogLevel.critical,
}

#: Characters that C{json.dumps(ensure_ascii=False)} leaves raw but that some
#: readers (e.g. Python's C{str.splitlines}, JavaScript) treat as line breaks.
_LINE_BREAK_ESCAPES = {
    ord("\x85"): "\\u0085",
    ord("\u2028"): "\\u2028",
    ord("\u2029"): "\\u2029",
}

_TIME_FORMAT = "%Y-%m-%d %H:%M:%S"


def parseLevel(name: str) -> LogLevel:
    """
    Map a level name to a L{LogLevel}.

    @param name: One of the keys of L{LEVELS}; case-insensitive.
    @return: The level.
    @raise ValueError: If the name is unknown.
    """
    try:
        return LEVELS[name.lower()]
    except (KeyError, AttributeError):
        raise ValueError(
            f"unknown log level {name!r}; expected one of {', '.join(LEVELS)}"
        ) from None


def _eventMessage(event: LogEvent) -> str:
    """
    @return: The formatted message of C{event}, followed by the traceback of
        its C{log_failure}, if any.
    """
    return eventAsText(
        event, includeTraceback=True, includeTimestamp=False, includeSystem=False
    )


def _levelName(level: object) -> str:
    """
    @param level: The C{log_level} of an event (normally a L{LogLevel}
        constant, which is not an instance of the L{LogLevel} class).
    @return: Its name (C{"warn"} for L{LogLevel.warn}), or C{"info"} if it
        is not a L{LogLevel} constant.
    """
    name = getattr(level, "name", None)
    if isinstance(name, str):
        try:
            if LogLevel.lookupByName(name) is level:
                return name
        except ValueError:
            pass
    return "info"


def formatLogLine(event: LogEvent) -> bytes:
    """
    Render one event as an iSulad shim-log line.

    @param event: A L{twisted.logger} event.
    @return: C{{"time": "YYYY-MM-DD HH:MM:SS", "level": "...", "msg": "..."}}
        followed by C{"\\n"}, UTF-8 encoded.  The result is always exactly
        one line of valid JSON (newlines and other control characters in the
        message are escaped; lone surrogates become C{\\uXXXX} escapes).
    """
    when = event.get("log_time")
    if not isinstance(when, (int, float)):
        when = time.time()
    levelName = _levelName(event.get("log_level"))
    record = {
        "time": time.strftime(_TIME_FORMAT, time.localtime(when)),
        "level": levelName,
        "msg": _eventMessage(event),
    }
    text = json.dumps(record, ensure_ascii=False, separators=(", ", ": "))
    text = text.translate(_LINE_BREAK_ESCAPES)
    # A str may hold lone surrogates (os.fsdecode of undecodable bytes);
    # backslashreplace turns them into "\udcXX", a valid JSON escape.
    return (text + "\n").encode("utf-8", "backslashreplace")


@implementer(ILogObserver)
class JSONLineFileObserver:
    """
    Append each event as one L{formatLogLine} line to a file.

    Each line is written with a single C{os.write} on an C{O_APPEND}
    descriptor, so lines from several writers never interleave.  Write
    errors are ignored (the log must never break the shim).

    @ivar path: The file path.
    """

    def __init__(self, path: str) -> None:
        """
        Open (creating it, mode 0600) C{path} for appending.

        @param path: The log file.
        @raise OSError: If the file cannot be opened.
        """
        self.path = path
        self._fd: int = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600
        )
        try:
            # The umask can only remove bits; also fix a pre-existing file.
            os.fchmod(self._fd, 0o600)
        except OSError:
            pass

    @property
    def closed(self) -> bool:
        """
        Whether L{close} has been called.
        """
        return self._fd < 0

    def __call__(self, event: LogEvent) -> None:
        """
        Write C{event} as one line; does nothing once closed.

        @param event: A log event.
        """
        fd = self._fd
        if fd < 0:
            return
        data = formatLogLine(event)
        try:
            while data:
                written = os.write(fd, data)
                if written <= 0:
                    break
                data = data[written:]
        except OSError:
            pass

    def close(self) -> None:
        """
        Close the file.  Idempotent.
        """
        fd, self._fd = self._fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass


@implementer(ILogFilterPredicate)
class _NamespacePrefixPredicate:
    """
    Accept (C{maybe}) only events whose C{log_namespace} starts with a prefix.
    """

    def __init__(self, prefix: str) -> None:
        """
        @param prefix: The required namespace prefix.
        """
        self.prefix = prefix

    def __call__(self, event: LogEvent) -> NamedConstant:
        """
        @return: C{maybe} if the namespace matches, else C{no}.
        """
        namespace = event.get("log_namespace")
        if isinstance(namespace, str) and namespace.startswith(self.prefix):
            return PredicateResult.maybe
        return PredicateResult.no


class ClosableFilteringObserver(FilteringLogObserver):
    """
    A L{FilteringLogObserver} whose C{close} closes the wrapped observer.

    @ivar observer: The wrapped observer.
    @ivar levelPredicate: The L{LogLevelFilterPredicate} in use; the level
        can be changed later through its C{defaultLogLevel} attribute.
    """

    def __init__(
        self,
        observer: ILogObserver,
        levelPredicate: LogLevelFilterPredicate,
        extraPredicates: list[ILogFilterPredicate] | None = None,
    ) -> None:
        """
        @param observer: The wrapped observer; its C{close()} (if any) is
            called by L{close}.
        @param levelPredicate: Drops events below its level.
        @param extraPredicates: Further predicates, applied after the level.
        """
        predicates: list[ILogFilterPredicate] = [levelPredicate, *(extraPredicates or [])]
        super().__init__(observer, predicates)
        self.observer = observer
        self.levelPredicate = levelPredicate

    def close(self) -> None:
        """
        Close the wrapped observer, if it can be closed.
        """
        close = getattr(self.observer, "close", None)
        if close is not None:
            close()


def jsonLineObserver(
    path: str, level: str = "info", namespacePrefix: str | None = None
) -> ClosableFilteringObserver:
    """
    Make an observer that appends events to a JSON-lines log file.

    @param path: The file, opened C{O_WRONLY|O_CREAT|O_APPEND|O_CLOEXEC},
        mode 0600.
    @param level: The lowest level written (a key of L{LEVELS}).
    @param namespacePrefix: If given, only events whose C{log_namespace}
        starts with it are written (e.g. for C{attach-log.json}).
    @return: An observer with a C{close()} method that closes the file.
    @raise ValueError: If C{level} is unknown.
    @raise OSError: If the file cannot be opened.
    """
    minimum = parseLevel(level)
    fileObserver = JSONLineFileObserver(path)
    extra: list[ILogFilterPredicate] = []
    if namespacePrefix is not None:
        extra.append(_NamespacePrefixPredicate(namespacePrefix))
    return ClosableFilteringObserver(
        fileObserver, LogLevelFilterPredicate(defaultLogLevel=minimum), extra
    )


@implementer(ILogObserver)
class _StderrWriter:
    """
    Write each event as C{"shimd: <msg>\\n"} to the current C{sys.stderr}.
    """

    def __call__(self, event: LogEvent) -> None:
        """
        @param event: A log event.
        """
        stream = sys.stderr
        if stream is None:
            return
        try:
            stream.write(f"shimd: {_eventMessage(event)}\n")
            stream.flush()
        except (OSError, ValueError, UnicodeError):
            pass


def stderrObserver(level: str = "error") -> ClosableFilteringObserver:
    """
    Make an observer that prints events at C{level} or above to stderr as
    C{"shimd: <msg>\\n"}.

    @param level: The lowest level printed (a key of L{LEVELS}).
    @return: The observer (its C{close()} does nothing).
    """
    return ClosableFilteringObserver(
        _StderrWriter(), LogLevelFilterPredicate(defaultLogLevel=parseLevel(level))
    )


_begun = False


def _loggingHasBegun() -> bool:
    """
    @return: Whether C{globalLogBeginner.beginLoggingTo} has already been
        called in this process (by us or by anyone else, e.g. twistd/trial).
    """
    # LogBeginner has no public query; it drops its buffering observer when
    # logging begins.  Fall back to our own flag should that attribute go.
    missing = object()
    marker = getattr(globalLogBeginner, "_temporaryObserver", missing)
    if marker is missing:
        return _begun
    return marker is None


def startShimLogging(
    workdir: str, level: str = "info", stderr: bool = True
) -> Callable[[], None]:
    """
    Send the global Twisted log to C{<workdir>/shim-log.json}, and errors to
    stderr.

    The first time, this calls C{globalLogBeginner.beginLoggingTo} (without
    redirecting stdio and without discarding the events buffered so far,
    which are then written to the file; Python warnings are logged at level
    C{warn}).  If logging has already begun, the observers are simply added
    to C{globalLogPublisher}.

    @param workdir: The shim's working directory.
    @param level: The lowest level written to the file (a key of L{LEVELS}).
    @param stderr: Whether to also print events at level C{error} and above
        to C{sys.stderr} as C{"shimd: <msg>\\n"}.
    @return: A function that removes the observers and closes the file;
        calling it again does nothing.
    @raise ValueError: If C{level} is unknown.
    @raise OSError: If the log file cannot be opened.
    """
    global _begun
    observers: list[ClosableFilteringObserver] = [
        jsonLineObserver(os.path.join(workdir, SHIM_LOG_NAME), level)
    ]
    if stderr:
        observers.append(stderrObserver("error"))

    if _loggingHasBegun():
        for observer in observers:
            globalLogPublisher.addObserver(observer)
    else:
        globalLogBeginner.beginLoggingTo(
            list(observers), discardBuffer=False, redirectStandardIO=False
        )
        _begun = True

    def stop() -> None:
        """
        Remove and close the observers added by L{startShimLogging}.
        """
        while observers:
            observer = observers.pop()
            globalLogPublisher.removeObserver(observer)
            observer.close()

    return stop


ERROR_LEVELS = frozenset({"error", "critical", "fatal", "panic"})


def errorMessages(path: str, offset: int = 0, tail: int | None = None) -> list[str]:
    """
    The C{msg} of every error record of a JSON-lines log (shim-log.json,
    attach-log.json, or runc's C{--log}), oldest first; lines that are not
    JSON objects are skipped.  A missing file has none.

    @param offset: read from this byte on (what an invocation appended).
    @param tail: read at most this many bytes from the end.
    """
    try:
        with open(path, "rb") as f:
            if tail is not None:
                f.seek(0, os.SEEK_END)
                offset = max(offset, f.tell() - tail)
            f.seek(offset)
            lines = f.read().splitlines()
    except OSError:
        return []
    messages = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("level") in ERROR_LEVELS:
            messages.append(str(record.get("msg", "")))
    return messages
