"""docs/configuration.md is generated from the settings model and must stay in step."""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from dicomnode.config import Settings, load_settings
from dicomnode.config import settings as settings_module
from dicomnode.config.fields import build, field_doc
from dicomnode.config.reference import (
    REGENERATE,
    REQUIRED,
    UNSET,
    Table,
    env_settable,
    render_markdown,
    tables,
)
from dicomnode.errors import ConfigError
from tests.conftest import REPO

DOC = REPO / "docs" / "configuration.md"
ROW = re.compile(r"^\| `(?P<key>[^`]+)` \| (?P<type>.*?) \| (?P<default>.*?) \| (?P<env>.*?) \| ")


def _sections(text: str) -> dict[str, str]:
    """Split the document at its ## and ### headings: title -> body."""
    parts = re.split(r"^#{2,3} (.+)$", text, flags=re.M)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def _rows(body: str) -> dict[str, dict[str, str]]:
    out = {}
    for line in body.splitlines():
        m = ROW.match(line)
        if m:
            out[m["key"]] = {k: m[k] for k in ("type", "default", "env")}
    return out


def _unwrap(cell: str) -> str:
    cell = cell.replace("\\|", "|")
    if cell.startswith("`` ") and cell.endswith(" ``"):
        return cell[3:-3]
    return cell[1:-1] if cell.startswith("`") else cell


def _field_default(fld: dataclasses.Field[Any]) -> Any:
    if fld.default is not dataclasses.MISSING:
        return fld.default
    if fld.default_factory is not dataclasses.MISSING:
        return fld.default_factory()
    return dataclasses.MISSING


def _expected_tables(root: type = Settings) -> dict[str, type]:
    """Walk the settings independently of the module under test: title -> dataclass."""
    out: dict[str, type] = {}

    def walk(cls: type, path: str) -> None:
        out[path] = cls
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.metadata.get("internal"):
                continue
            tp = hints[f.name]
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            inner = args[0] if typing.get_origin(tp) is not dict and len(args) == 1 else tp
            if dataclasses.is_dataclass(inner):
                walk(inner, f"{path}.{f.name}" if path else f.name)  # type: ignore[arg-type]

    walk(root, "")
    out.pop("")
    return out


@pytest.fixture(scope="module")
def doc() -> str:
    return DOC.read_text(encoding="utf-8")


def test_the_document_is_up_to_date(doc: str) -> None:
    assert doc == render_markdown(), (
        f"docs/configuration.md is out of date with dicomnode/config/settings.py; run {REGENERATE}"
    )


def test_every_key_of_every_table_is_documented(doc: str) -> None:
    sections = _sections(doc)
    expected = _expected_tables()
    assert {"listener", "worker", "destinations", "routes", "routes.requires"} <= set(expected)
    for title, cls in expected.items():
        assert title in sections, f"no heading for the [{title}] table"
        rows = _rows(sections[title])
        names = [f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal")]
        assert list(rows) == names, f"[{title}]: keys documented {list(rows)}, settings {names}"
        for f in dataclasses.fields(cls):
            if f.metadata.get("doc"):
                assert " ".join(f.metadata["doc"].split()) in sections[title].replace("\\|", "|")
    # Internal fields are not settings: Settings.source is not in the document.
    assert "`source`" not in doc


def test_headers_and_environment_names(doc: str) -> None:
    sections = _sections(doc)
    assert "TOML: `[listener]`. Environment: `DICOMNODE_LISTENER_<KEY>`." in sections["listener"]
    assert "TOML: `[[destinations]]`, repeated once per entry." in sections["destinations"]
    assert "`[routes.requires]`, inside [routes](#routes)" in sections["routes.requires"]
    assert _rows(sections["database"])["url"]["env"] == "`DICOMNODE_DATABASE_URL`"
    assert _rows(sections["worker"])["models"]["env"] == "`DICOMNODE_WORKER_MODELS`"
    assert _rows(sections["routes"])["name"]["env"] == "-"
    assert _rows(sections["routes"])["requires"]["type"] == "[table](#routesrequires)"
    for phrase in ("`dicomnode --config PATH ...`", "$DICOMNODE_CONFIG", "config check"):
        assert phrase in doc


def test_defaults_shown_parse_back_to_the_settings(doc: str) -> None:
    sections = _sections(doc)
    defaults = Settings()
    listener = _rows(sections["listener"])
    assert tomllib.loads(f"v = {_unwrap(listener['port']['default'])}")["v"] == 11112
    assert defaults.listener.port == 11112
    for section, key in [
        ("listener", "ae_title"),
        ("storage", "path"),
        ("database", "url"),
        ("completion", "quiet_seconds"),
        ("worker", "model_concurrency"),
        ("metrics", "enabled"),
    ]:
        shown = _unwrap(_rows(sections[section])[key]["default"])
        value = tomllib.loads(f"v = {shown}")["v"]
        cls = type(getattr(defaults, section))
        assert getattr(build(cls, {key: value}), key) == getattr(getattr(defaults, section), key)

    checked = 0
    for title, cls in _expected_tables().items():
        rows = _rows(sections[title])
        for f in dataclasses.fields(cls):
            if f.metadata.get("internal"):
                continue
            shown = rows[f.name]["default"]
            default = _field_default(f)
            if default is dataclasses.MISSING:
                assert shown == REQUIRED, f"{title}.{f.name}"
                continue
            if default is None:
                assert shown == UNSET, f"{title}.{f.name}"
                continue
            value = tomllib.loads(f"v = {_unwrap(shown)}")["v"]
            if dataclasses.is_dataclass(default):
                assert value == {}
                value = build(type(default), value)
            elif isinstance(default, Path):
                value = Path(value)
            assert value == default, f"{title}.{f.name}: shown {shown}, default {default!r}"
            checked += 1
    assert checked > 40


def _env_text(shown: str) -> str:
    value = tomllib.loads(f"v = {_unwrap(shown)}")["v"]
    if isinstance(value, list):
        return ",".join(value)
    if isinstance(value, str):
        return value
    return json.dumps(value)


def test_environment_variables_shown_are_the_ones_the_loader_reads(doc: str) -> None:
    sections = _sections(doc)
    hints = typing.get_type_hints(Settings)
    plain = load_settings(None, environ={})
    for f in dataclasses.fields(Settings):
        tp = hints[f.name]
        if f.metadata.get("internal") or not dataclasses.is_dataclass(tp):
            continue
        cls_hints = typing.get_type_hints(tp)
        for key, row in _rows(sections[f.name]).items():
            var = f"DICOMNODE_{f.name.upper()}_{key.upper()}"
            if row["env"] == "-":
                # A key the document says is file-only must really be refused from the
                # environment; if the loader learns it, make env_settable say so.
                assert not env_settable(cls_hints[key]), var
                with pytest.raises(ConfigError):
                    load_settings(None, environ={var: "true" if "bool" in row["type"] else "{}"})
                continue
            assert row["env"] == f"`{var}`"
            if row["default"] == UNSET:
                # Optional paths: a value alone may fail cross-checks (a certificate
                # without its key), so only the variable's mapping is checked here.
                assert settings_module._env_overrides({var: "x"}) == {f.name: {key: "x"}}
                continue
            # The default, written as the variable, loads as the default (paths and
            # the SQLite URL resolved alike, against the current directory).
            text = _env_text(row["default"])
            got = getattr(getattr(load_settings(None, environ={var: text}), f.name), key)
            assert got == getattr(getattr(plain, f.name), key), f"{var}={text!r}"


# A settings model with what others may add later: a new section with a nested table,
# an optional section, a top-level key, an internal field, and an array of tables
# with a nested array.


@dataclass(frozen=True)
class _Window:
    """Hours of the day."""

    start: int = field(default=22, metadata=field_doc("First hour."))
    days: list[str] = field(default_factory=lambda: ["sat", "sun"], metadata=field_doc("Days."))


@dataclass(frozen=True)
class _Retention:
    """How long things are kept."""

    done_days: float = field(default=30.0, metadata=field_doc("Keep done jobs | this long."))
    enabled: bool = field(default=True, metadata=field_doc("Purge at all."))
    window: _Window = field(default_factory=_Window, metadata=field_doc("When it runs."))
    secret: str = field(default="x", metadata={"internal": True, "doc": "not a setting"})


@dataclass(frozen=True)
class _Hop:
    via: str = field(metadata=field_doc("Next hop."))


@dataclass(frozen=True)
class _Peer:
    """A peer."""

    name: str = field(metadata=field_doc("Its name."))
    hops: list[_Hop] = field(default_factory=list, metadata=field_doc("Relays."))


@dataclass(frozen=True)
class _Root:
    version: int = field(default=1, metadata=field_doc("File format."))
    retention: _Retention = field(default_factory=_Retention)
    extra: _Window | None = field(default=None, metadata=field_doc("Optional section."))
    peers: list[_Peer] = field(default_factory=list)
    source: Path | None = field(default=None, metadata={"internal": True})


def test_new_sections_keys_and_nested_tables_are_picked_up() -> None:
    found: list[Table] = tables(_Root)
    assert [t.header for t in found] == [
        "(top level)",
        "[retention]",
        "[retention.window]",
        "[extra]",
        "[[peers]]",
        "[[peers.hops]]",
    ]
    text = render_markdown(_Root)
    sections = _sections(text)
    retention = _rows(sections["retention"])
    assert list(retention) == ["done_days", "enabled", "window"]
    assert retention["done_days"] == {
        "type": "number",
        "default": "`30.0`",
        "env": "`DICOMNODE_RETENTION_DONE_DAYS`",
    }
    assert retention["enabled"]["env"] == "`DICOMNODE_RETENTION_ENABLED`"
    assert retention["window"]["type"] == "[table](#retentionwindow)"
    assert "Keep done jobs \\| this long." in sections["retention"]
    assert "secret" not in text and "`source`" not in text
    window = _rows(sections["retention.window"])
    assert window["days"] == {"type": "list of strings", "default": '`["sat", "sun"]`', "env": "-"}
    assert _rows(sections["top level"])["version"]["env"] == "-"
    assert _rows(sections["extra"])["start"]["env"] == "-"
    assert _rows(sections["peers.hops"])["via"]["default"] == REQUIRED
    assert "TOML: `[[peers.hops]]`, repeated once per entry, inside [peers](#peers)." in text
    assert "How long things are kept." in sections["retention"]
