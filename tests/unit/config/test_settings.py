from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from dicomnode.config import (
    Settings,
    documented_keys,
    load_settings,
    parse_settings,
)
from dicomnode.errors import ConfigError
from tests.conftest import REPO

EXAMPLE = REPO / "config.example.toml"

MINIMAL = {
    "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242}],
    "routes": [{"name": "r", "match": {"Modality": "CT"}, "models": ["m"], "send_to": ["pacs"]}],
}


def error_for(data: dict, environ: dict | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        parse_settings(data, environ=environ or {})
    message = str(info.value)
    assert "\n" not in message, "errors must be one line"
    return message


def test_defaults_without_a_file(tmp_path: Path) -> None:
    settings = load_settings(None, environ={})
    assert isinstance(settings, Settings)
    assert settings.listener.ae_title == "DICOMNODE"
    assert settings.listener.port == 11112
    assert settings.database.url.startswith("sqlite:///")
    assert settings.completion.quiet_seconds == 30


def test_example_config_is_valid_and_documents_every_key() -> None:
    settings = load_settings(EXAMPLE, environ={})
    assert settings.routes[0].name == "chest-ct-lungs"
    assert settings.routes[0].models == ["lung-unet2d"]
    assert settings.destination("pacs").port == 4242
    text = EXAMPLE.read_text()
    # Every key must appear in the example, set or commented out, with its section.
    for key in documented_keys():
        section, name = key.split(".")
        assert re.search(rf"^\[+{section}\]+", text, re.M), f"section {section} missing"
        assert re.search(rf"^#?\s*{name}\s*=", text, re.M), f"{key} not documented"


def test_example_config_defaults_match_the_code() -> None:
    data = tomllib.loads(EXAMPLE.read_text())
    defaults = Settings()
    for section in ("listener", "completion", "worker", "outputs", "logging"):
        for key, value in data[section].items():
            assert getattr(getattr(defaults, section), key) == value, f"{section}.{key}"


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    cfg = tmp_path / "etc" / "node.toml"
    cfg.parent.mkdir()
    cfg.write_text('[storage]\npath = "spool"\n[database]\nurl = "sqlite:///db/x.db"\n')
    settings = load_settings(cfg, environ={})
    assert settings.storage.path == cfg.parent / "spool"
    assert settings.database.url == f"sqlite:///{cfg.parent / 'db/x.db'}"


def test_config_path_from_environment(tmp_path: Path) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text('[listener]\nae_title = "FROMENV"\n')
    assert (
        load_settings(None, environ={"DICOMNODE_CONFIG": str(cfg)}).listener.ae_title == "FROMENV"
    )


def test_environment_overrides_the_file() -> None:
    env = {"DICOMNODE_LISTENER_PORT": "104", "DICOMNODE_DATABASE_URL": "postgresql+psycopg://x/y"}
    settings = parse_settings({"listener": {"port": 11112}}, environ=env)
    assert settings.listener.port == 104
    assert settings.database.url == "postgresql+psycopg://x/y"


@pytest.mark.parametrize(
    ("data", "environ", "expected"),
    [
        ({"listener": {"aetitle": "X"}}, {}, r"^listener\.aetitle: unknown key"),
        ({"lisener": {}}, {}, r"^lisener: unknown key"),
        ({"listener": {"port": 70000}}, {}, r"^listener\.port: must be between 1 and 65535"),
        ({"listener": {"port": "104"}}, {}, r"^listener\.port: must be an integer"),
        ({"listener": {"port": True}}, {}, r"^listener\.port: must be an integer"),
        ({"listener": {"ae_title": "A" * 17}}, {}, r"^listener\.ae_title: must be a DICOM AE"),
        ({"listener": {"ae_title": "BAD\\AE"}}, {}, r"^listener\.ae_title: must be a DICOM AE"),
        ({"listener": []}, {}, r"^listener: must be a table"),
        ({"database": {"url": "mysql://x"}}, {}, r"^database\.url: must be a sqlite"),
        ({"completion": {"quiet_seconds": -1}}, {}, r"^completion\.quiet_seconds: must be 0 or"),
        ({"worker": {"device": "tpu"}}, {}, r"^worker\.device: must be one of auto, cpu, cuda"),
        ({"worker": {"count": 0}}, {}, r"^worker\.count: must be greater than 0"),
        ({"outputs": {"uid_root": "1.2.x."}}, {}, r"^outputs\.uid_root: must be a UID prefix"),
        ({"logging": {"level": "LOUD"}}, {}, r"^logging\.level: must be one of"),
        ({}, {"DICOMNODE_LISTENER_PORTT": "1"}, r"^DICOMNODE_LISTENER_PORTT: unknown setting"),
        ({}, {"DICOMNODE_NOPE_X": "1"}, r"^DICOMNODE_NOPE_X: unknown setting"),
        ({}, {"DICOMNODE_LISTENER_PORT": "abc"}, r"^DICOMNODE_LISTENER_PORT: must be an integer"),
    ],
)
def test_bad_settings_name_the_key(data: dict, environ: dict, expected: str) -> None:
    assert re.search(expected, error_for(data, environ))


def with_route(**route: object) -> dict:
    base = dict(MINIMAL["routes"][0])
    base.update(route)
    return {**MINIMAL, "routes": [base]}


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (with_route(match={"Modalty": "CT"}), r"^routes\[0\]\.match: 'Modalty' is not a DICOM"),
        (with_route(match={"Modality": "re:(CT"}), r"^routes\[0\]\.match: Modality: bad regular"),
        (with_route(match={"Modality": 3}), r"^routes\[0\]\.match: Modality: values must be"),
        (with_route(send_to=["nowhere"]), r"^routes\[0\]\.send_to: unknown destination 'nowhere'"),
        (with_route(models=[]), r"^routes\[0\]\.models: a route needs at least one model"),
        (with_route(name="bad name!"), r"^routes\[0\]\.name: must be a name"),
        (with_route(colour="x"), r"^routes\[0\]\.colour: unknown key"),
        (
            {**MINIMAL, "destinations": MINIMAL["destinations"] * 2},
            r"^destinations\[1\]\.name: duplicate destination 'pacs'",
        ),
        (
            {**MINIMAL, "destinations": [{"name": "pacs", "ae_title": "PACS", "port": 4242}]},
            r"^destinations\[0\]\.host: required key is missing",
        ),
        ({**MINIMAL, "routes": {"name": "r"}}, r"^routes: must be a list"),
    ],
)
def test_bad_routes_and_destinations(data: dict, expected: str) -> None:
    assert re.search(expected, error_for(data))


def test_unknown_destination_lookup_lists_known_ones() -> None:
    settings = parse_settings(MINIMAL, environ={})
    with pytest.raises(ConfigError, match=r"unknown destination 'x' \(known: pacs\)"):
        settings.destination("x")


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="configuration file not found"):
        load_settings(tmp_path / "nope.toml", environ={})
    bad = tmp_path / "bad.toml"
    bad.write_text("[listener\nport = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(bad, environ={})


def test_listener_access_and_tls_settings(tmp_path: Path) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text(
        '[listener]\nallowed_calling_aets = ["CT01"]\nallowed_networks = ["10.0.0.0/8"]\n'
        'tls_certificate = "tls/a.crt"\ntls_private_key = "tls/a.key"\n'
    )
    listener = load_settings(cfg, environ={}).listener
    assert listener.allowed_calling_aets == ["CT01"]
    assert listener.tls_certificate == tmp_path / "tls/a.crt"  # relative to the file
    env = {"DICOMNODE_LISTENER_ALLOWED_CALLING_AETS": "CT01, MR02"}
    assert load_settings(cfg, environ=env).listener.allowed_calling_aets == ["CT01", "MR02"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('allowed_networks = ["10.0.0.300/8"]', "listener.allowed_networks: must be IP networks"),
        ('allowed_calling_aets = ["A\\\\B"]', "listener.allowed_calling_aets: must be a DICOM AE"),
        ('tls_certificate = "a.crt"', "listener.tls_certificate: set both"),
        ('tls_client_ca = "ca.crt"', "listener.tls_client_ca: needs tls_certificate"),
        ("processes = 0", "listener.processes: must be greater than 0"),
    ],
)
def test_bad_listener_settings_are_named(tmp_path: Path, text: str, message: str) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text(f"[listener]\n{text}\n")
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_settings(cfg, environ={})


def test_route_content_checks_are_validated() -> None:
    def route(requires: dict) -> dict:
        return {**MINIMAL, "routes": [{**MINIMAL["routes"][0], "requires": requires}]}

    settings = parse_settings(route({"min_slices": 40, "axial": True}), environ={})
    assert settings.routes[0].requires.min_slices == 40 and settings.routes[0].requires.axial
    assert error_for(route({"model": "m"})).startswith(
        "routes[0].requires.model: 'm' is run by this route itself"
    )
    assert error_for(route({"min_volume_ml": 5})) == (
        "routes[0].requires.min_volume_ml: needs requires.model"
    )
    assert "routes[0].requires.min_slices" in error_for(route({"min_slices": -1}))
    assert "routes[0].requires.colour" in error_for(route({"colour": 1}))


@pytest.mark.parametrize(("raw", "value"), [("true", True), ("0", False), ("Yes", True)])
def test_booleans_from_the_environment(raw: str, value: bool) -> None:
    settings = load_settings(None, environ={"DICOMNODE_RETENTION_ENABLED": raw})
    assert settings.retention.enabled is value


def test_a_bad_boolean_from_the_environment_is_one_line() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, environ={"DICOMNODE_METRICS_ENABLED": "maybe"})
    assert str(info.value) == "DICOMNODE_METRICS_ENABLED: must be true or false, got 'maybe'"


def test_an_unknown_log_format_is_one_line() -> None:
    message = error_for({"logging": {"format": "xml"}})
    assert message.startswith("logging.format:") and "xml" in message


def test_the_listener_listens_on_loopback_unless_opened() -> None:
    # The Quick start runs the example: it must not open a C-STORE port to the network.
    assert Settings().listener.host == "127.0.0.1"
    assert tomllib.loads(EXAMPLE.read_text())["listener"]["host"] == "127.0.0.1"


def test_a_missing_models_folder_names_its_key(tmp_path: Path) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text('[models]\npath = "no-such-models"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, environ={})
    assert str(info.value) == f"models.path: folder not found: {tmp_path / 'no-such-models'}"
    (tmp_path / "a-file").write_text("")
    cfg.write_text('[models]\npath = "a-file"\n')
    with pytest.raises(ConfigError, match=r"^models\.path: not a folder: "):
        load_settings(cfg, environ={})
