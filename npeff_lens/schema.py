"""The base of every config (:mod:`npeff_lens.config`, :mod:`npeff_lens.commands`): a frozen dataclass whose
fields are declared with :func:`option` (default, help line, flag, whether it is in the resume key), checked
for type and validated when built, written as JSON, and compared with a stored resume key field by field.

``ConfigError``: an invalid value, with the field, its flag and the reason as data. ``ConfigMismatchError``:
a directory holds another configuration's result; :func:`diff` / :func:`check_same` name each differing field.

This module imports nothing of the package.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import MISSING, dataclass, field
from typing import Any, ClassVar, Literal

__all__ = [
    "BaseConfig",
    "ConfigError",
    "ConfigMismatchError",
    "diff",
    "check_same",
    "option",
    "plain",
    "unwrap_optional",
]


class ConfigError(ValueError):
    """An invalid config value. ``field``: the field's name (None when the error concerns several), ``flag``: its
    command-line spelling, ``reason``: what is wrong; the message says all three on one line."""

    def __init__(self, message: str, *, field: str | None = None, flag: str | None = None, reason: str = ""):
        super().__init__(message)
        self.field, self.flag, self.reason = field, flag, reason


class ConfigMismatchError(ValueError):
    """A directory holds the result of another configuration; the message names each differing field."""


# ----------------------------------------------------------------------------------------------
# The one comparison behind every resume check (store manifests, checkpoints, run directories).
# ----------------------------------------------------------------------------------------------


def _short(value: Any, limit: int = 60) -> str:
    s = repr(value)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def diff(stored: Any, new: Any, prefix: str = "") -> list[str]:
    """Lines ``"field: stored X, now Y"`` for every (nested) field where two JSON-like values differ."""
    if isinstance(stored, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(stored) | set(new), key=str):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in stored:
                out.append(f"{name}: not in the stored configuration, now {_short(new[key])}")
            elif key not in new:
                out.append(f"{name}: stored {_short(stored[key])}, not in the new configuration")
            else:
                out += diff(stored[key], new[key], name)
        return out
    if isinstance(stored, list) and isinstance(new, list) and len(stored) == len(new) and stored != new:
        return [line for i, (a, b) in enumerate(zip(stored, new)) for line in diff(a, b, f"{prefix}.{i}")]
    if isinstance(stored, float) and isinstance(new, float) and math.isnan(stored) and math.isnan(new):
        return []
    if stored != new:
        return [f"{prefix or 'value'}: stored {_short(stored)}, now {_short(new)}"]
    return []


def check_same(stored: dict, new: dict, where: str, hint: str = "", error: type = ConfigMismatchError) -> None:
    """Raises ``error`` naming the differing fields when ``stored != new`` (both JSON-like dicts)."""
    lines = diff(stored, new)
    if lines:
        body = "\n  ".join(lines)
        raise error(f"{where} holds the result of another configuration\n  {body}" + (f"\n{hint}" if hint else ""))


# ----------------------------------------------------------------------------------------------
# Fields and the base class.
# ----------------------------------------------------------------------------------------------


def option(
    default: Any = MISSING,
    help: str = "",
    *,
    flag: str | None = None,
    resume: bool = True,
    cli: bool = True,
    positional: bool = False,
    metavar: str | None = None,
    escapes: bool = False,
    repeat: bool = False,
):
    """A documented config field. ``resume=False``: does not change the result (left out of ``key()``);
    ``cli=False``: Python only; ``flag``: the CLI spelling when it differs from the field name;
    ``escapes``: the CLI reads ``\\n`` / ``\\t`` in the value as a newline / tab; ``repeat``: a sequence field whose
    flag may be given several times, each adding its values."""
    meta = {"help": help, "flag": flag, "resume": resume, "cli": cli, "positional": positional, "metavar": metavar}
    meta.update(escapes=escapes, repeat=repeat)
    if isinstance(default, list):
        raise TypeError("use a tuple default for sequence fields (configs are frozen)")
    return field(default=default, metadata=meta)


@dataclass(frozen=True, kw_only=True)
class BaseConfig:
    """Base of every config: validation hooks, JSON round trip, resume key."""

    step: ClassVar[str] = ""

    def __post_init__(self):
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):  # JSON and kwargs give lists; configs hold tuples
                object.__setattr__(self, f.name, tuple(value))
            _check_type(self, f.name, getattr(self, f.name), hints[f.name])
        self.validate()

    def validate(self) -> None:
        """Per-config checks (subclasses); raise :class:`ConfigError` via :meth:`_fail`."""

    def _fail(self, name: str, message: str):
        flag = _flag(dataclasses.fields(self), name)
        raise ConfigError(f"{type(self).__name__}: {name} ({flag}) {message}", field=name, flag=flag, reason=message)

    def _require(self, name: str, ok: bool, message: str) -> None:
        if not ok:
            self._fail(name, f"{message}; got {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        """Every field, JSON-ready (tuples as lists)."""
        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def key(self) -> dict:
        """The fields that change the result: the resume key written into the run directory."""
        return {
            f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.metadata.get("resume", True)
        }

    @classmethod
    def from_dict(cls, data: dict):
        """The config back from :meth:`to_dict`'s JSON; an unknown field is an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{cls.__name__} has no field(s) {unknown}; valid: {sorted(names)}")
        return cls(**data)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def narrow(self, cls):
        """This config's fields of ``cls``, a config it extends (a command's step knobs, without its inputs). Not
        checked again: a config's ``validate`` includes that of the config it extends."""
        if not isinstance(self, cls):
            raise TypeError(f"{type(self).__name__} does not extend {cls.__name__}")
        narrowed = object.__new__(cls)
        for f in dataclasses.fields(cls):
            object.__setattr__(narrowed, f.name, getattr(self, f.name))
        return narrowed

    @classmethod
    def default_key(cls) -> dict:
        """The resume key's fields that have a default, at their defaults. A field added to a step keeps the old
        behaviour at its default, so a key stored before it existed stands for that default."""
        fields = dataclasses.fields(cls)
        return {f.name: plain(f.default) for f in fields if f.metadata.get("resume", True) and f.default is not MISSING}

    def check_resume(self, stored_key: dict, where: str) -> None:
        """Same key as ``stored_key`` (its absent fields at their defaults) or a :class:`ConfigMismatchError`
        naming the differing fields."""
        check_same(
            {**self.default_key(), **stored_key},
            self.key(),
            where,
            hint="rerun with the stored values to resume, or choose another output directory",
        )


def plain(value):
    return list(plain(v) for v in value) if isinstance(value, tuple) else value


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def unwrap_optional(tp):
    """``(inner type, optional?)`` for ``X | None``."""
    args = typing.get_args(tp)
    if (typing.get_origin(tp) in (typing.Union, types.UnionType)) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True  # our configs never mix several types with None
    return tp, False


def _check_type(cfg, name: str, value, tp) -> None:
    inner, optional = unwrap_optional(tp)
    if value is None:
        if not optional:
            cfg._fail(name, "is required")
        return
    origin = typing.get_origin(inner)
    if origin is Literal:
        if value not in typing.get_args(inner):
            cfg._fail(name, f"must be one of {list(typing.get_args(inner))}; got {value!r}")
    elif origin is tuple:
        elem = typing.get_args(inner)[0]
        if not isinstance(value, tuple) or not all(isinstance(v, elem) for v in value):
            cfg._fail(name, f"must be a sequence of {elem.__name__}; got {value!r}")
    elif inner is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            cfg._fail(name, f"must be a number; got {value!r}")
        object.__setattr__(cfg, name, float(value))
    elif inner is int:
        if isinstance(value, bool) or not isinstance(value, int):
            cfg._fail(name, f"must be an integer; got {value!r}")
    elif inner is str and isinstance(value, os.PathLike):  # a path given as a Path: kept as its text
        object.__setattr__(cfg, name, os.fspath(value))
    elif inner in (str, bool) and not isinstance(value, inner):
        cfg._fail(name, f"must be a {inner.__name__}; got {value!r}")


def _flag(fields, name: str) -> str:
    for f in fields:
        if f.name == name:
            if f.metadata.get("positional"):
                return f.name.upper()
            return f.metadata.get("flag") or "--" + f.name.replace("_", "-")
    return name
