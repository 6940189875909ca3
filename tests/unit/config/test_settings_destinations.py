"""Destination TLS and storage commitment settings: validated with one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicomnode.config import parse_settings
from dicomnode.errors import ConfigError


def settings_with(tmp_path: Path, **dest: object):
    base = {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}
    return parse_settings({"destinations": [{**base, **dest}]}, base=tmp_path, environ={})


def test_tls_files_resolve_against_the_config_folder(tmp_path: Path) -> None:
    for name in ("ca.crt", "node.crt", "node.key"):
        (tmp_path / name).write_text("x")
    dest = settings_with(
        tmp_path, tls_ca="ca.crt", tls_certificate="node.crt", tls_private_key="node.key",
        storage_commitment=True, commitment_timeout_seconds=600,
    ).destinations[0]  # fmt: skip
    assert dest.tls_ca == tmp_path / "ca.crt" and dest.tls_private_key == tmp_path / "node.key"
    assert dest.storage_commitment and dest.commitment_timeout_seconds == 600
    plain = settings_with(tmp_path).destinations[0]
    assert plain.tls_ca is None and not plain.storage_commitment
    assert plain.commitment_timeout_seconds == 3600


@pytest.mark.parametrize(
    ("dest", "message"),
    [
        ({"tls_ca": "missing.crt"}, r"^destinations\[0\]\.tls_ca: file not found: .*missing.crt$"),
        (
            {"tls_ca": "ca.crt", "tls_certificate": "ca.crt"},
            r"^destinations\[0\]\.tls_certificate: set both tls_certificate and tls_private_key",
        ),
        ({"tls_server_name": "pacs"}, r"^destinations\[0\]\.tls_server_name: needs tls_ca"),
        ({"tls_ca": "ca.crt", "tls_server_name": "a b"}, r"tls_server_name: must be a host name"),
        ({"commitment_timeout_seconds": 0}, r"commitment_timeout_seconds: must be greater than 0"),
        ({"storage_commitment": "yes"}, r"storage_commitment: must be true or false"),
    ],
)
def test_bad_destination_settings_name_the_key(tmp_path: Path, dest: dict, message: str) -> None:
    (tmp_path / "ca.crt").write_text("x")
    with pytest.raises(ConfigError, match=message):
        settings_with(tmp_path, **dest)


def test_a_destination_is_named_by_its_address(tmp_path: Path) -> None:
    (destination,) = settings_with(tmp_path).destinations
    assert destination.address == "PACS@127.0.0.1:104"
