"""The configuration reference (``docs/configuration.md``), generated from the settings.

Every table and key comes from the dataclasses of :mod:`dicomnode.config`: the
key's type from its annotation, its default from the field, its description from
the ``doc`` of its metadata (:func:`dicomnode.config.fields.field_doc`) and a table's
description from its class docstring. Fields marked ``internal`` are left out, as
the loader leaves them out. A section, key or nested table added to ``Settings``
appears here without any change to this module.

Regenerate the document after changing a setting::

    python -m dicomnode.config.reference > docs/configuration.md

``tests/unit/config/test_reference.py`` fails while the file is out of date.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import re
import sys
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicomnode.config import ENV_CONFIG, ENV_PREFIX, Settings

REGENERATE = "python -m dicomnode.config.reference > docs/configuration.md"
REQUIRED = "required"
UNSET = "unset"
NO_ENV = "-"

# The value types the environment loader (dicomnode.config.settings._env_overrides) can take
# from a variable's text: numbers and booleans (true/false, 1/0, yes/no, on/off) are
# parsed, a list of strings is split at commas, strings and paths are used as they
# are. Any other type (tables) reaches the schema as text and is refused, so those
# keys are file-only.
ENV_SCALARS: tuple[type, ...] = (bool, int, float, str, Path)

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True)
class Key:
    """One key of a configuration table, as the reference documents it.

    Parameters
    ----------
    name : str
        The key as written in TOML.
    type : str
        What it holds, in words ("integer", "list of strings", ...).
    default : str
        Its default as a TOML value, or ``required`` or ``unset``.
    description : str
        The ``doc`` of its field metadata.
    env : str or None
        The environment variable that overrides it, or None if there is none.
    """

    name: str
    type: str
    default: str
    description: str
    env: str | None


@dataclass(frozen=True)
class Table:
    """One TOML table of the configuration with its keys.

    Parameters
    ----------
    path : str
        Dotted name, e.g. ``listener`` or ``routes.requires``.
    header : str
        How the table is written in TOML, e.g. ``[listener]`` or ``[[routes]]``.
    cls : type
        The dataclass it is read into.
    keys : list[Key]
        Its keys, in declaration order.
    env_prefix : str or None
        ``DICOMNODE_<SECTION>_`` for a section the environment can override.
    parent : str or None
        The path of the enclosing table, for a nested one.
    """

    path: str
    header: str
    cls: type
    keys: list[Key]
    env_prefix: str | None
    parent: str | None = None

    @property
    def is_array(self) -> bool:
        """Return whether the table may be repeated (``[[name]]``)."""
        return self.header.startswith("[[")


def _non_optional(tp: Any) -> Any:
    """Return ``X`` for ``X | None``, else ``tp`` unchanged."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(options) == 1:
            return options[0]
    return tp


def _table_type(tp: Any) -> tuple[type | None, bool]:
    """Return the dataclass a field holds and whether it is a list of them."""
    tp = _non_optional(tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return tp, False
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        if dataclasses.is_dataclass(item) and isinstance(item, type):
            return item, True
    return None, False


def type_label(tp: Any) -> str:
    """Describe a field's type hint for a reader of the configuration file.

    Parameters
    ----------
    tp : Any
        The type hint, e.g. ``int``, ``list[str]`` or ``Path | None``.

    Returns
    -------
    str
        For example "integer", "list of strings", "path" or "table".
    """
    tp = _non_optional(tp)
    names = {
        bool: "boolean",
        int: "integer",
        float: "number",
        str: "string",
        Path: "path",
    }
    if tp in names:
        return names[tp]
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        table, _ = _table_type(item)
        if table is not None:
            return "array of tables"
        return "list" if item is Any else f"list of {_plural(type_label(item))}"
    if origin is dict or tp is dict:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is not Any:
            return f"table of {_plural(type_label(args[1]))}"
        return "table"
    if dataclasses.is_dataclass(tp):
        return "table"
    return getattr(tp, "__name__", str(tp))


def _plural(label: str) -> str:
    return label if label.endswith("s") else label + "s"


def toml_value(value: Any) -> str:
    """Write a default value as TOML, the way it would be written in the file.

    Parameters
    ----------
    value : Any
        A default: a string, path, number, boolean, list, mapping or dataclass.

    Returns
    -------
    str
        The TOML literal, e.g. ``"var/spool"``, ``30.0``, ``[]`` or ``{ MR = 90 }``.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value), ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {
            f.name: getattr(value, f.name)
            for f in dataclasses.fields(value)
            if not f.metadata.get("internal") and getattr(value, f.name) is not None
        }
    if isinstance(value, Mapping):
        if not value:
            return "{}"
        items = ", ".join(f"{_toml_key(str(k))} = {toml_value(v)}" for k, v in value.items())
        return "{ " + items + " }"
    return json.dumps(str(value))


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key)


def default_of(fld: dataclasses.Field[Any]) -> str:
    """Return a field's default as the reference shows it.

    Parameters
    ----------
    fld : dataclasses.Field
        A settings field.

    Returns
    -------
    str
        ``required`` when it has no default, ``unset`` when it defaults to None,
        else the TOML literal of the default. A nested table's default is ``{}``:
        every key of it at its own default.
    """
    if fld.default is not dataclasses.MISSING:
        value: Any = fld.default
    elif fld.default_factory is not dataclasses.MISSING:
        value = fld.default_factory()
    else:
        return REQUIRED
    if value is None:
        return UNSET
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return "{}"
    return toml_value(value)


def env_settable(tp: Any) -> bool:
    """Return whether a key of this type can be set from an environment variable.

    Parameters
    ----------
    tp : Any
        The key's type hint.

    Returns
    -------
    bool
        True for numbers, strings, paths and lists of strings (comma-separated).
    """
    tp = _non_optional(tp)
    if tp in ENV_SCALARS:
        return True
    return typing.get_origin(tp) is list and typing.get_args(tp) == (str,)


def _is_section(tp: Any) -> bool:
    """Return whether a field of the root holds a section (a dataclass, not optional)."""
    return dataclasses.is_dataclass(tp) and isinstance(tp, type)


def _env_sections(root: type) -> list[str]:
    """Return the sections the environment can override, in the order the loader tries."""
    return [name for name, tp in typing.get_type_hints(root).items() if _is_section(tp)]


def env_name(section: str, key: str, root: type = Settings) -> str | None:
    """Return the variable ``DICOMNODE_<SECTION>_<KEY>`` if the loader maps it back.

    Parameters
    ----------
    section : str
        A section of ``root``, e.g. ``listener``.
    key : str
        One of its keys.
    root : type
        The settings dataclass; :class:`~dicomnode.config.Settings` by default.

    Returns
    -------
    str or None
        The variable name, or None where the loader would read it as a key of
        another section (one whose name is a prefix of this one's).
    """
    rest = f"{section}_{key}"
    chosen = next((s for s in _env_sections(root) if rest.startswith(s + "_")), None)
    if chosen != section:
        return None
    name = ENV_PREFIX + rest.upper()
    return None if name == ENV_CONFIG else name


def _summary(cls: type) -> str:
    """Return a class docstring as one paragraph per line; empty for a bare dataclass."""
    doc = inspect.getdoc(cls) or ""
    if doc.startswith(cls.__name__ + "("):  # the signature dataclass() writes
        return ""
    paragraphs = [" ".join(p.split()) for p in doc.split("\n\n")]
    return "\n\n".join(p for p in paragraphs if p)


def _keys(cls: type, section: str | None, root: type) -> list[Key]:
    hints = typing.get_type_hints(cls)
    out: list[Key] = []
    for fld in dataclasses.fields(cls):
        if fld.metadata.get("internal"):
            continue
        tp = hints[fld.name]
        env = None
        if section is not None and env_settable(tp):
            env = env_name(section, fld.name, root)
        out.append(
            Key(
                name=fld.name,
                type=type_label(tp),
                default=default_of(fld),
                description=" ".join(str(fld.metadata.get("doc", "")).split()),
                env=env,
            )
        )
    return out


def _walk(
    cls: type, path: str, header: str, section: str | None, parent: str | None, root: type
) -> Iterator[Table]:
    env_prefix = f"{ENV_PREFIX}{section.upper()}_" if section is not None else None
    yield Table(path, header, cls, _keys(cls, section, root), env_prefix, parent)
    hints = typing.get_type_hints(cls)
    for fld in dataclasses.fields(cls):
        if fld.metadata.get("internal"):
            continue
        inner, repeated = _table_type(hints[fld.name])
        if inner is None:
            continue
        sub = f"{path}.{fld.name}"
        yield from _walk(inner, sub, f"[[{sub}]]" if repeated else f"[{sub}]", None, path, root)


def tables(root: type = Settings) -> list[Table]:
    """Return every table of the configuration, in the order the reference lists them.

    Parameters
    ----------
    root : type
        The settings dataclass; :class:`~dicomnode.config.Settings` by default.

    Returns
    -------
    list[Table]
        Keys of ``root`` that are not tables first (the top level of the file), then
        its sections (``[listener]``, ...), then its repeated tables
        (``[[destinations]]``, ``[[routes]]``); each followed by the tables nested in
        it (``[routes.requires]``, ...).
    """
    hints = typing.get_type_hints(root)
    top = [f for f in dataclasses.fields(root) if not f.metadata.get("internal")]
    plain = {f.name for f in top if _table_type(hints[f.name])[0] is None}
    out: list[Table] = []
    if plain:
        keys = [k for k in _keys(root, None, root) if k.name in plain]
        out.append(Table("", "(top level)", root, keys, None))
    later: list[Table] = []
    for fld in top:
        inner, repeated = _table_type(hints[fld.name])
        if inner is None:
            continue
        if _is_section(hints[fld.name]):
            out.extend(_walk(inner, fld.name, f"[{fld.name}]", fld.name, None, root))
        elif repeated:
            later.extend(_walk(inner, fld.name, f"[[{fld.name}]]", None, None, root))
        else:  # an optional section (``X | None``): the loader reads no environment for it
            out.extend(_walk(inner, fld.name, f"[{fld.name}]", None, None, root))
    return out + later


def anchor(title: str) -> str:
    """Return the fragment GitHub gives a Markdown heading.

    Parameters
    ----------
    title : str
        The heading text.

    Returns
    -------
    str
        Lower case, punctuation other than ``-`` and ``_`` dropped, spaces as ``-``.
    """
    kept = re.sub(r"[^\w\- ]", "", title.strip().lower())
    return kept.replace(" ", "-")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _code(text: str) -> str:
    return f"`{text}`" if "`" not in text else f"`` {text} ``"


def _title(table: Table) -> str:
    return table.path or "top level"


INTRO = f"""\
# Configuration reference

<!-- Generated by dicomnode/config/reference.py from dicomnode/config/settings.py; do not edit.
     Regenerate: {REGENERATE} -->

This file is generated from the settings model in `dicomnode/config/settings.py`: every key, its
type, its default and its description. Do not edit it by hand; after changing a
setting, regenerate it with

```sh
{REGENERATE}
```

(`tests/unit/config/test_reference.py` fails while it is out of date).
[`config.example.toml`](../config.example.toml) is a complete, commented example.

## Where the settings come from

One TOML file, chosen in this order:

1. `dicomnode --config PATH ...` (or `-c PATH`), given before the command;
2. else the file named by `${ENV_CONFIG}`;
3. else none: the built-in defaults below.

Each value is taken from the first of these that sets it, highest first:

1. **command-line flags**: `--log-level DEBUG|INFO|WARNING|ERROR` overrides
   `logging.level` (the only setting a flag overrides);
2. **environment variables** `{ENV_PREFIX}<SECTION>_<KEY>`, the section and key in upper
   case, e.g. `{ENV_PREFIX}DATABASE_URL` for `url` in `[database]` or
   `{ENV_PREFIX}WORKER_COUNT=2`. Numbers are parsed, a list is written
   comma-separated (`{ENV_PREFIX}LISTENER_ALLOWED_CALLING_AETS=CT01,PACS`; empty for an
   empty list), strings and paths are taken as they are. Only the keys of the
   single sections (`[listener]`, `[worker]`, ...) that hold numbers, strings, paths or
   lists of strings have a variable: the column "environment" below names it, and
   a dash means the key can only be set in the file (booleans, tables, and every key
   of `[[destinations]]`, `[[routes]]` and other repeated or nested tables). A
   `{ENV_PREFIX}*` variable that names no such key stops the node like a bad key in
   the file;
3. **the configuration file**;
4. **the built-in defaults** (the "default" column).

Relative paths, and the path in a relative SQLite URL (`sqlite:///var/dicomnode.db`),
are resolved against the folder of the configuration file, so the node behaves the
same from whatever directory it is started; without a file, against the current
directory.

## Checking a configuration

An unknown key, a missing required key, a value of the wrong type or out of range,
a route naming an unknown destination or model: each stops the node before it
starts, with one line on stderr naming the key, and exit code 2:

```
$ dicomnode --config bad.toml serve
dicomnode: configuration error: routes[0].send_to: unknown destination 'pac' (known: pacs)
```

`dicomnode --config PATH config check` runs the same checks, loads every model
package and the listener's TLS files, and starts nothing:

```
$ dicomnode --config node.toml config check
configuration ok: node.toml; 2 route(s), 1 destination(s), models: lung-nodule-cnn, lung-unet2d
```

In the tables, "default" is written as it would be in the file; "required" keys must
be given, "unset" keys are off until set. A nested table (`requires`, `seg` in a route)
is written either under its own header after its `[[routes]]` entry
(`[routes.requires]`) or inline (`requires = {{ min_slices = 40 }}`).
"""


def _render_table(table: Table, children: set[str]) -> list[str]:
    level = "###" if table.parent else "##"
    lines = [f"{level} {_title(table)}", ""]
    summary = _summary(table.cls) if table.path else ""
    if summary:
        lines += [summary, ""]
    where = f"TOML: `{table.header}`" if table.path else "TOML: keys before the first table"
    if table.is_array:
        where += ", repeated once per entry"
    if table.parent:
        where += f", inside [{table.parent}](#{anchor(table.parent)})"
        if not table.is_array:
            where += f"; or inline, `{table.path.rsplit('.', 1)[1]} = {{ ... }}`"
    where += "."
    if table.env_prefix is not None:
        where += f" Environment: `{table.env_prefix}<KEY>`."
    lines += [where, ""]
    if not table.keys:
        return [*lines, "No keys.", ""]
    lines += [
        "| key | type | default | environment | description |",
        "|---|---|---|---|---|",
    ]
    for key in table.keys:
        kind = key.type
        sub = f"{table.path}.{key.name}" if table.path else key.name
        if sub in children:
            kind = f"[{kind}](#{anchor(sub)})"
        env = _code(key.env) if key.env else NO_ENV
        default = key.default if key.default in (REQUIRED, UNSET) else _code(key.default)
        lines.append(
            f"| `{key.name}` | {_cell(kind)} | {_cell(default)} | {env} | "
            f"{_cell(key.description)} |"
        )
    return [*lines, ""]


def render_markdown(root: type = Settings) -> str:
    """Return the configuration reference as a Markdown document.

    Parameters
    ----------
    root : type
        The settings dataclass; :class:`~dicomnode.config.Settings` by default.

    Returns
    -------
    str
        The hand-written introduction (where the file comes from, the precedence of
        file, environment and flags, ``dicomnode config check``, how to regenerate),
        a list of the tables, then for each table its TOML header, its environment
        variable prefix and a table of key, type, default, environment variable and
        description. Ends with a newline.
    """
    found = tables(root)
    nested = {t.path for t in found if t.parent is not None}
    lines = [INTRO, "## Tables", ""]
    for table in found:
        indent = "  " if table.parent else ""
        lines.append(f"{indent}* [{_title(table)}](#{anchor(_title(table))}): `{table.header}`")
    lines.append("")
    for table in found:
        lines += _render_table(table, nested)
    return "\n".join(lines).rstrip("\n") + "\n"


if __name__ == "__main__":
    sys.stdout.write(render_markdown())
