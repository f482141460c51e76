"""A flat job-config dataclass becomes the command line: one `--kebab-case` flag per field.

Supported field types: str, int, float, bool (as `--flag/--no-flag`) and `X | None` of those.
Help text comes from `field(metadata={"help": ...})` (see `arg`); every flag shows its default.
Errors raised by the dataclass's `__post_init__` are reported as usage errors (exit status 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from collections.abc import Sequence
from typing import Any, TypeVar

T = TypeVar("T")

_SCALARS = (str, int, float, bool)
# Field names whose values may hold credentials: never logged or stored as given.
SECRET_FIELDS = frozenset({"storage_options"})


def arg(help: str, default: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with CLI help text; no default = a required flag."""
    return dataclasses.field(default=default, metadata={"help": help})


def _scalar_type(kind: Any, where: str) -> type:
    """The scalar type of `str`, `int | None`, `Optional[float]`, ...; TypeError otherwise."""
    if kind in _SCALARS:
        return kind
    origin = typing.get_origin(kind)
    if origin is typing.Union or origin is types.UnionType:
        members = [m for m in typing.get_args(kind) if m is not type(None)]
        if len(members) == 1 and len(typing.get_args(kind)) == 2 and members[0] in _SCALARS:
            return members[0]
    raise TypeError(
        f"{where}: unsupported CLI type {kind!r}; use str, int, float, bool or one of them | None"
    )


def _show(value: Any) -> str:
    """A default as the user would type it: unset, '', true/false, 0.1."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value == "":
        return "''"
    return str(value).replace("%", "%%")


def build_parser(cls: type, prog: str | None = None) -> argparse.ArgumentParser:
    """argparse parser with one flag per field of the flat dataclass `cls`."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(cls.__doc__ or "").strip(),
        allow_abbrev=False,  # `--size` must never silently match `--size-limit`
    )
    for field in dataclasses.fields(cls):
        if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            raise TypeError(f"{cls.__name__}.{field.name}: default_factory is not supported")
        # `X | None` only changes the default, which the dataclass already holds
        kind = _scalar_type(hints[field.name], f"{cls.__name__}.{field.name}")
        required = field.default is dataclasses.MISSING
        text = field.metadata.get("help", "").replace("%", "%%")  # argparse formats help with %
        text = f"{text} (required)" if required else f"{text} (default: {_show(field.default)})"
        flag = "--" + field.name.replace("_", "-")
        default = None if required else field.default
        if kind is bool:
            action = parser.add_argument(
                flag, dest=field.name, action=argparse.BooleanOptionalAction,
                required=required, default=default,
            )
            action.help = text  # Python < 3.14 would append its own "(default: ...)" otherwise
        else:
            metavar = field.name.upper()
            parser.add_argument(
                flag, dest=field.name, type=kind,
                required=required, default=default, help=text, metavar=metavar,
            )
    return parser


def parse_config(cls: type[T], argv: Sequence[str] | None = None, prog: str | None = None) -> T:
    """Parse `argv` (default: sys.argv[1:]) into the frozen dataclass `cls`.

    `--help` prints every flag with its default and exits 0; an unknown flag, a badly typed
    value or a value rejected by `cls.__post_init__` prints usage plus the reason and exits 2.
    """
    parser = build_parser(cls, prog)
    values = vars(parser.parse_args(argv))
    try:
        return cls(**values)
    except (ValueError, TypeError) as err:
        parser.error(str(err))  # exits 2 with the usage line; the message names the bad value
        raise AssertionError("unreachable") from err


def config_dict(config: Any) -> dict[str, Any]:
    """`dataclasses.asdict` without the fields that may hold credentials (for logs and manifests)."""
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in SECRET_FIELDS}


def config_json(config: Any) -> str:
    """The config as one JSON line for the log; secret-bearing fields show only their key names."""
    out = config_dict(config)
    for name in sorted(SECRET_FIELDS & {f.name for f in dataclasses.fields(config)}):
        value = getattr(config, name)
        options = parse_storage_options(value) if isinstance(value, str) else dict(value)
        out[name] = {key: "<redacted>" for key in sorted(options)}
    return json.dumps(out, sort_keys=True)


def parse_storage_options(text: str) -> dict[str, Any]:
    """`--storage-options` JSON text -> dict for fsspec; "" -> {}. ValueError names the problem."""
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        # do not echo the text: it may hold a secret key
        raise ValueError(
            f"--storage-options must be a JSON object, e.g. '{{\"anon\": true}}'; "
            f"parse error at char {err.pos}: {err.msg}"
        ) from None
    if not isinstance(value, dict):
        raise ValueError(
            f"--storage-options must be a JSON object, got a JSON {type(value).__name__}; "
            "e.g. '{\"anon\": true}'"
        )
    return value
