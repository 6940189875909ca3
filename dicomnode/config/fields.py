"""Build frozen dataclasses from TOML tables, with one-line errors naming the key.

Used for the node's settings and for model packages. Field metadata may hold a
``check`` callable that returns a problem description or None, and a ``doc``
string that documents the key. Fields whose metadata has ``internal`` set are
not read from the TOML.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from dicomnode.errors import ConfigError

Check = Callable[[Any], str | None]


def field_doc(text: str, check: Check | None = None) -> dict[str, Any]:
    """Return dataclass field metadata with a description and an optional check.

    Parameters
    ----------
    text : str
        What the key means.
    check : callable, optional
        Returns a problem description for a bad value, or None.

    Returns
    -------
    dict[str, Any]
        Metadata for :func:`dataclasses.field`.
    """
    return {"doc": text, "check": check}


def one_of(*allowed: str) -> Check:
    """Return a check that accepts only the given strings.

    Parameters
    ----------
    *allowed : str
        The accepted values.

    Returns
    -------
    Check
        The check.
    """

    def check(value: str) -> str | None:
        return None if value in allowed else f"must be one of {', '.join(allowed)}; got {value!r}"

    return check


def positive(value: float) -> str | None:
    """Check that a number is greater than zero.

    Parameters
    ----------
    value : float
        The number.

    Returns
    -------
    str or None
        The problem, if any.
    """
    return None if value > 0 else f"must be greater than 0, got {value}"


def type_name(tp: Any) -> str:
    """Describe a type hint the way an error message should.

    Parameters
    ----------
    tp : Any
        A type hint.

    Returns
    -------
    str
        For example "an integer" or "a list".
    """
    if tp is Path:
        return "a path string"
    if tp is bool:
        return "true or false"
    origin = typing.get_origin(tp)
    if origin is list:
        return "a list"
    if origin is dict:
        return "a table"
    if dataclasses.is_dataclass(tp):
        return "a table"
    return {int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _convert(tp: Any, value: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert it."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(options[0], value, key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: must be a table, got {type(value).__name__}")
        return build(tp, value, key)  # type: ignore[arg-type]
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: must be a list, got {type(value).__name__}")
        return [_convert(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: must be a table, got {type(value).__name__}")
        return dict(value)
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, int | float) and not isinstance(value, bool),
        str: isinstance(value, str),
        Path: isinstance(value, str),
    }.get(tp, True)
    if not ok:
        raise ConfigError(f"{key}: must be {type_name(tp)}, got {value!r}")
    if tp is float:
        return float(value)
    if tp is Path:
        return Path(value)
    return value


def build(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    """Validate ``data`` against the dataclass ``cls`` and construct it.

    Parameters
    ----------
    cls : type
        A dataclass whose type hints say what each key holds.
    data : Mapping[str, Any]
        The TOML table.
    prefix : str
        Dotted path of the table, used in error messages.

    Returns
    -------
    Any
        An instance of ``cls``.

    Raises
    ------
    ConfigError
        For an unknown key, a missing required key, a value of the wrong type, or a
        value its check refuses; the message starts with the full key.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    for key in data:
        if key not in fields:
            where = f"{prefix}.{key}" if prefix else key
            raise ConfigError(f"{where}: unknown key (known: {', '.join(sorted(fields))})")
    kwargs: dict[str, Any] = {}
    for name, fld in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in data:
            if fld.default is dataclasses.MISSING and fld.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{key}: required key is missing")
            continue
        value = _convert(hints[name], data[name], key)
        check: Check | None = fld.metadata.get("check")
        if check is not None and value is not None:
            problem = check(value)
            if problem:
                raise ConfigError(f"{key}: {problem}")
        kwargs[name] = value
    return cls(**kwargs)
