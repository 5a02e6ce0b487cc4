"""
Parsing of the shim's C{process.json} (lcr C{shim_client_process_state}).

The daemon writes C{process.json} into the shim's working directory before it
starts the shim.  The file is produced by lcr's JSON generator with
C{OPT_GEN_SIMPLIFY}, so false booleans, zero numbers and NULL strings are
simply omitted; a missing key (or an explicit JSON C{null}) therefore means
false, 0, C{None} or an empty tuple.  Unknown keys are ignored.  C{args} and
C{cwd} are required.

Every type error is reported as a L{ConfigError} whose L{ConfigError.field}
names the JSON path at fault (for example C{"consoleSize.width"},
C{"rlimits[1].soft"} or C{"env[0]"}).

This module is pure: it has no Twisted dependency and does no I/O other than
reading the file in L{loadProcessState}.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

TYPE_CHECKING = False  # not typing's: this runs before runc starts (shimd.launch)
if TYPE_CHECKING:
    from typing import Any, NoReturn

__all__ = [
    "ConfigError",
    "ConsoleSize",
    "User",
    "Rlimit",
    "ProcessState",
    "CAPABILITY_SETS",
    "parseProcessState",
    "loadProcessState",
]

#: The name used as the prefix of every error message.
_SOURCE = "process.json"

#: The capability sets of an OCI C{process.capabilities} object, in order.
CAPABILITY_SETS: tuple[str, ...] = (
    "bounding",
    "permitted",
    "effective",
    "inheritable",
    "ambient",
)

_UINT16_MAX = 0xFFFF
_UINT32_MAX = 0xFFFFFFFF
_UINT64_MAX = 0xFFFFFFFFFFFFFFFF
_INT64_MAX = 0x7FFFFFFFFFFFFFFF
_INT32_MAX = 0x7FFFFFFF

#: Longest rendering of an offending value quoted in an error message.
_MAX_VALUE_REPR = 60


class ConfigError(Exception):
    """
    C{process.json} is missing, unreadable, not JSON, or has a bad field.

    C{str(err)} is a one-line message that starts with C{"process.json: "}
    and names the field at fault, if any.

    @ivar field: The JSON path of the offending key (for example C{"cwd"},
        C{"consoleSize.height"} or C{"args[2]"}), or L{None} when the problem
        is not tied to one field (unreadable file, invalid JSON, top level
        not an object).
    """

    field: str | None

    def __init__(self, message: str, field: str | None = None) -> None:
        """
        @param message: The complete one-line message.
        @param field: The JSON path at fault, or L{None}.
        """
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class ConsoleSize:
    """
    Initial terminal size (C{consoleSize}).

    @ivar height: Rows, 0..65535.
    @ivar width: Columns, 0..65535.
    """

    height: int
    width: int


@dataclass(frozen=True)
class User:
    """
    The container process's user (C{user}).

    @ivar uid: User id.
    @ivar gid: Group id.
    @ivar additionalGids: Supplementary group ids.
    @ivar username: User name, if given.
    """

    uid: int = 0
    gid: int = 0
    additionalGids: tuple[int, ...] = ()
    username: str | None = None


@dataclass(frozen=True)
class Rlimit:
    """
    One entry of C{rlimits}.

    @ivar type: The resource name, for example C{"RLIMIT_NOFILE"}.
    @ivar soft: The soft limit.
    @ivar hard: The hard limit.
    """

    type: str
    soft: int = 0
    hard: int = 0


@dataclass(frozen=True)
class ProcessState:
    """
    The parsed content of C{process.json}.

    Attribute names are the snake_case of the JSON keys (C{consoleSize} is
    L{console_size}, C{isuladStdin} is L{isulad_stdin}, C{rootUID} is
    L{root_uid}, and so on).  See the module docstring for the rules on
    missing keys.

    @ivar capabilities: Maps each capability set present in the file (a
        subset of L{CAPABILITY_SETS}) to its capability names, or L{None}
        when C{capabilities} is absent.
    @ivar raw: The parsed JSON object itself, unchanged (unknown keys
        included).  Used to write a derived C{process.json}; treat it as
        read-only.  It takes no part in equality, hashing or C{repr}.
    """

    args: tuple[str, ...]
    cwd: str
    env: tuple[str, ...] = ()
    terminal: bool = False
    console_size: ConsoleSize | None = None
    user: User | None = None
    capabilities: dict[str, tuple[str, ...]] | None = field(
        default=None, hash=False
    )
    apparmor_profile: str | None = None
    selinux_label: str | None = None
    oom_score_adj: int = 0
    no_new_privileges: bool = False
    rlimits: tuple[Rlimit, ...] = ()
    exec: bool = False
    exit_fifo: str | None = None
    attach_socket: str | None = None
    open_tty: bool = False
    open_stdin: bool = False
    isulad_stdin: str | None = None
    isulad_stdout: str | None = None
    isulad_stderr: str | None = None
    resize_fifo: str | None = None
    runtime_args: tuple[str, ...] = ()
    root_uid: int = 0
    root_gid: int = 0
    log_path: str | None = None
    log_maxfile: int = 0
    log_maxsize: int = 0
    control_fifo: str | None = None
    checkpoint: str | None = None
    runtime: str | None = None
    systemd_cgroup: bool = False
    no_pivot_root: bool = False
    raw: Mapping[str, Any] = field(
        default_factory=dict, compare=False, hash=False, repr=False
    )


# ---------------------------------------------------------------------------
# Typed accessors.  Each takes the containing JSON object, the key, and the
# path of the containing object ("" for the top level).


def _join(parent: str, key: str) -> str:
    """
    @return: The dotted path of C{key} inside the object at C{parent}.
    """
    return f"{parent}.{key}" if parent else key


def _describe(value: object) -> str:
    """
    Render a JSON value for an error message, on one line and bounded.

    @param value: A value produced by L{json.loads}.
    @return: Its JSON text, shortened with C{"..."} if long.
    """
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):  # pragma: no cover - json.loads output
        text = repr(value)
    if len(text) > _MAX_VALUE_REPR:
        text = text[: _MAX_VALUE_REPR - 3] + "..."
    return text


def _fail(path: str, problem: str) -> NoReturn:
    """
    Raise a L{ConfigError} about field C{path}.

    @param path: The JSON path at fault.
    @param problem: What is wrong, e.g. C{"is required"}.
    @raise ConfigError: Always.
    """
    raise ConfigError(f'{_SOURCE}: field "{path}" {problem}', path)


def _wrongType(path: str, expected: str, value: object) -> NoReturn:
    """
    Raise a L{ConfigError} saying C{path} has the wrong type.

    @param path: The JSON path at fault.
    @param expected: The expected type with its article, e.g. C{"a string"}.
    @param value: The value actually found.
    @raise ConfigError: Always.
    """
    _fail(path, f"must be {expected}, got {_describe(value)}")


def _checkString(value: object, path: str) -> str:
    """
    @return: C{value} if it is a string.
    @raise ConfigError: Otherwise.
    """
    if not isinstance(value, str):
        _wrongType(path, "a string", value)
    return value


def _checkInt(value: object, path: str, minimum: int | None, maximum: int | None) -> int:
    """
    @param minimum: Smallest accepted value, or L{None} for no bound.
    @param maximum: Largest accepted value, or L{None} for no bound.
    @return: C{value} if it is an integer (not a boolean, not a float)
        within the bounds.
    @raise ConfigError: Otherwise.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        _wrongType(path, "an integer", value)
    if minimum is not None and value < minimum:
        if maximum is None:
            _fail(path, f"must be >= {minimum}, got {value}")
        _fail(path, f"must be in {minimum}..{maximum}, got {value}")
    if maximum is not None and value > maximum:
        if minimum is None:
            _fail(path, f"must be <= {maximum}, got {value}")
        _fail(path, f"must be in {minimum}..{maximum}, got {value}")
    return value


def _optString(obj: Mapping[str, Any], key: str, parent: str = "") -> str | None:
    """
    @return: The string at C{obj[key]}, or L{None} if missing or null.
    @raise ConfigError: If present with another type.
    """
    value = obj.get(key)
    if value is None:
        return None
    return _checkString(value, _join(parent, key))


def _optBool(obj: Mapping[str, Any], key: str, parent: str = "") -> bool:
    """
    @return: The boolean at C{obj[key]}, or C{False} if missing or null.
    @raise ConfigError: If present with another type (integers included).
    """
    value = obj.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        _wrongType(_join(parent, key), "a boolean", value)
    return value


def _optInt(
    obj: Mapping[str, Any],
    key: str,
    parent: str = "",
    minimum: int | None = None,
    maximum: int | None = None,
) -> int:
    """
    @return: The integer at C{obj[key]}, or 0 if missing or null.
    @raise ConfigError: If present with another type or out of bounds.
    """
    value = obj.get(key)
    if value is None:
        return 0
    return _checkInt(value, _join(parent, key), minimum, maximum)


def _optList(obj: Mapping[str, Any], key: str, parent: str = "") -> list[Any]:
    """
    @return: The list at C{obj[key]}, or an empty list if missing or null.
    @raise ConfigError: If present with another type.
    """
    value = obj.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        _wrongType(_join(parent, key), "a list", value)
    return value


def _optObject(
    obj: Mapping[str, Any], key: str, parent: str = ""
) -> dict[str, Any] | None:
    """
    @return: The object at C{obj[key]}, or L{None} if missing or null.
    @raise ConfigError: If present with another type.
    """
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, dict):
        _wrongType(_join(parent, key), "an object", value)
    return value


def _optStringList(
    obj: Mapping[str, Any], key: str, parent: str = ""
) -> tuple[str, ...]:
    """
    @return: The strings of the list at C{obj[key]} (empty if missing or
        null).
    @raise ConfigError: If it is not a list or an element is not a string;
        the error names the element, e.g. C{"env[0]"}.
    """
    path = _join(parent, key)
    return tuple(
        _checkString(item, f"{path}[{index}]")
        for index, item in enumerate(_optList(obj, key, parent))
    )


# ---------------------------------------------------------------------------
# Nested objects.


def _consoleSize(top: Mapping[str, Any]) -> ConsoleSize | None:
    """
    @return: The C{consoleSize} object, or L{None} if absent.
    """
    obj = _optObject(top, "consoleSize")
    if obj is None:
        return None
    return ConsoleSize(
        height=_optInt(obj, "height", "consoleSize", 0, _UINT16_MAX),
        width=_optInt(obj, "width", "consoleSize", 0, _UINT16_MAX),
    )


def _user(top: Mapping[str, Any]) -> User | None:
    """
    @return: The C{user} object, or L{None} if absent.
    """
    obj = _optObject(top, "user")
    if obj is None:
        return None
    gids = tuple(
        _checkInt(item, f"user.additionalGids[{index}]", 0, _UINT32_MAX)
        for index, item in enumerate(_optList(obj, "additionalGids", "user"))
    )
    return User(
        uid=_optInt(obj, "uid", "user", 0, _UINT32_MAX),
        gid=_optInt(obj, "gid", "user", 0, _UINT32_MAX),
        additionalGids=gids,
        username=_optString(obj, "username", "user"),
    )


def _capabilities(top: Mapping[str, Any]) -> dict[str, tuple[str, ...]] | None:
    """
    @return: The capability sets present in C{capabilities}, or L{None} if
        the key is absent.  Unknown sets are ignored.
    """
    obj = _optObject(top, "capabilities")
    if obj is None:
        return None
    return {
        name: _optStringList(obj, name, "capabilities")
        for name in CAPABILITY_SETS
        if obj.get(name) is not None
    }


def _rlimits(top: Mapping[str, Any]) -> tuple[Rlimit, ...]:
    """
    @return: The C{rlimits} entries.  Each must be an object with a string
        C{type}; C{soft} and C{hard} default to 0.
    """
    result = []
    for index, entry in enumerate(_optList(top, "rlimits")):
        path = f"rlimits[{index}]"
        if not isinstance(entry, dict):
            _wrongType(path, "an object", entry)
        kind = _optString(entry, "type", path)
        if kind is None:
            _fail(f"{path}.type", "is required")
        result.append(
            Rlimit(
                type=kind,
                soft=_optInt(entry, "soft", path, 0, _UINT64_MAX),
                hard=_optInt(entry, "hard", path, 0, _UINT64_MAX),
            )
        )
    return tuple(result)


# ---------------------------------------------------------------------------
# Entry points.


def _rejectConstant(name: str) -> NoReturn:
    """
    C{parse_constant} hook for L{json.loads}: refuse C{NaN} and
    C{Infinity}, which are not JSON.

    @raise ValueError: Always.
    """
    raise ValueError(f"{name} is not valid JSON")


def _decode(data: bytes | str) -> Any:
    """
    Parse JSON text.

    @param data: The file content; bytes must be UTF-8 (a BOM is refused).
    @return: The parsed value.
    @raise ConfigError: If C{data} is not valid JSON.
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"{_SOURCE}: invalid JSON: not UTF-8 at byte {e.start}"
            ) from e
    else:
        text = data
    try:
        return json.loads(text, parse_constant=_rejectConstant)
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"{_SOURCE}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}"
        ) from e
    except (ValueError, RecursionError) as e:
        raise ConfigError(f"{_SOURCE}: invalid JSON: {e}") from e


def parseProcessState(data: bytes | str) -> ProcessState:
    """
    Parse the content of a C{process.json}.

    @param data: The JSON text, as UTF-8 bytes or as a string.
    @return: The parsed state; L{ProcessState.raw} is the parsed object.
    @raise ConfigError: If the text is not JSON, the top level is not an
        object, C{args} or C{cwd} is missing, or any known field has the
        wrong type or is out of range.
    """
    top = _decode(data)
    if not isinstance(top, dict):
        raise ConfigError(
            f"{_SOURCE}: top level must be a JSON object, got {_describe(top)}"
        )

    args = top.get("args")
    if args is None:
        _fail("args", "is required")
    if not isinstance(args, list):
        _wrongType("args", "a list of strings", args)
    if not args:
        _fail("args", "must not be empty")
    cwd = top.get("cwd")
    if cwd is None:
        _fail("cwd", "is required")

    return ProcessState(
        args=_optStringList(top, "args"),
        cwd=_checkString(cwd, "cwd"),
        env=_optStringList(top, "env"),
        terminal=_optBool(top, "terminal"),
        console_size=_consoleSize(top),
        user=_user(top),
        capabilities=_capabilities(top),
        apparmor_profile=_optString(top, "apparmorProfile"),
        selinux_label=_optString(top, "selinuxLabel"),
        oom_score_adj=_optInt(top, "oomScoreAdj"),
        no_new_privileges=_optBool(top, "noNewPrivileges"),
        rlimits=_rlimits(top),
        exec=_optBool(top, "exec"),
        exit_fifo=_optString(top, "exit_fifo"),
        attach_socket=_optString(top, "attach_socket"),
        open_tty=_optBool(top, "open_tty"),
        open_stdin=_optBool(top, "open_stdin"),
        isulad_stdin=_optString(top, "isuladStdin"),
        isulad_stdout=_optString(top, "isuladStdout"),
        isulad_stderr=_optString(top, "isuladStderr"),
        resize_fifo=_optString(top, "resizeFifo"),
        runtime_args=_optStringList(top, "runtimeArgs"),
        root_uid=_optInt(top, "rootUID"),
        root_gid=_optInt(top, "rootGID"),
        log_path=_optString(top, "logPath"),
        log_maxfile=_optInt(top, "logMaxfile", minimum=0, maximum=_INT32_MAX),
        log_maxsize=_optInt(top, "logMaxsize", minimum=0, maximum=_INT64_MAX),
        control_fifo=_optString(top, "control_fifo"),
        checkpoint=_optString(top, "checkpoint"),
        runtime=_optString(top, "runtime"),
        systemd_cgroup=_optBool(top, "systemdCgroup"),
        no_pivot_root=_optBool(top, "noPivotRoot"),
        raw=top,
    )


def loadProcessState(path: str = "process.json") -> ProcessState:
    """
    Read and parse a C{process.json} file.

    @param path: The file to read; by default C{process.json} in the
        current directory (the shim's workdir), as isulad-shim does.
    @return: The parsed state.
    @raise ConfigError: If the file cannot be read (L{ConfigError.field} is
        L{None}) or its content is invalid (see L{parseProcessState}).
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        reason = e.strerror or str(e)
        raise ConfigError(f"{_SOURCE}: cannot read {path}: {reason}") from e
    return parseProcessState(data)
