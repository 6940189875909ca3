"""``dicomnode destinations list`` and ``destinations echo``: real databases, real SCPs."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.db import Delivery, DeliveryState, Series, make_engine, migrate, transaction, utcnow
from dicomnode.db import jobs as queue
from dicomnode.pipeline import encode
from dicomnode.store import Ingestor, Spool
from tests.conftest import free_port, wait_for
from tests.dcmtk import STORESCP
from tests.factories import ct_series
from tests.integration.counting_scp import CountingSCP
from tests.unit.cli.test_main import one_line_error, run

CONFIG_HEADER = ["NAME", "AE", "TITLE", "ADDRESS", "TLS", "COMMITMENT", "TIMEOUT"]


def _config(tmp_path: Path, db_url: str, scp_port: int, closed_port: int) -> str:
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    config = tmp_path / "node.toml"
    config.write_text(
        f"""
[database]
url = "{db_url}"
[storage]
path = "spool"
[listener]
ae_title = "MYNODE"
[[destinations]]
name = "pacs"
ae_title = "COUNTER"
host = "127.0.0.1"
port = {scp_port}
timeout_seconds = 5
[[destinations]]
name = "archive"
ae_title = "ARCHIVE"
host = "127.0.0.1"
port = {closed_port}
timeout_seconds = 2.5
storage_commitment = true
[[destinations]]
name = "secure"
ae_title = "SECURE"
host = "127.0.0.1"
port = {closed_port}
tls_ca = "ca.pem"
"""
    )
    return str(config)


@pytest.fixture
def scp() -> Iterator[CountingSCP]:
    with CountingSCP("COUNTER") as server:
        yield server


def _jobs(tmp_path: Path, sessions: sessionmaker[Session], n: int) -> list[int]:
    """Receive one series through the Ingestor and queue ``n`` jobs for it."""
    datasets = ct_series(np.zeros((2, 8, 8)), patient_id="PID-SECRET-9")
    ingestor = Ingestor(Spool(tmp_path / "spool"), sessions)
    for ds in datasets:
        ingestor.store(encode(ds), calling_ae="SCANNER")
    ids = []
    with transaction(sessions) as s:
        series = s.scalars(select(Series)).one()
        for k in range(n):
            job = queue.enqueue(s, series, route="r", model=f"m{k}", version="1", max_attempts=3)
            assert job is not None
            ids.append(job.id)
    return ids


def test_list(
    tmp_path: Path, db_url: str, sessions: sessionmaker[Session], capsys: pytest.CaptureFixture[str]
) -> None:
    j1, j2, j3, j4 = _jobs(tmp_path, sessions, 4)
    earlier, later = utcnow() - timedelta(hours=2), utcnow() - timedelta(minutes=5)
    with transaction(sessions) as s:
        # What the worker writes while it sends (pipeline deliveries), as rows.
        s.add_all([
            Delivery(job_id=j1, destination="pacs", state=DeliveryState.SENT, attempts=1,
                     sent_at=earlier),
            Delivery(job_id=j2, destination="pacs", state=DeliveryState.SENT, attempts=2,
                     sent_at=later),
            Delivery(job_id=j3, destination="pacs", state=DeliveryState.PENDING, attempts=1,
                     last_error="association aborted by the peer\ndetail"),
            Delivery(job_id=j1, destination="archive", state=DeliveryState.FAILED, attempts=3,
                     last_error="cannot connect to 127.0.0.1:1"),
            Delivery(job_id=j2, destination="archive", state=DeliveryState.FAILED, attempts=4,
                     last_error="out of resources (0xA700)\nsecond line"),
            Delivery(job_id=j4, destination="old-pacs", state=DeliveryState.SENT, attempts=1,
                     sent_at=earlier),
        ])  # fmt: skip
    config = _config(tmp_path, db_url, free_port(), free_port())

    code, out, err = run(capsys, "--config", config, "destinations", "list", "--json")
    assert code == 0 and not err
    assert "PID-SECRET-9" not in out
    records = {r["name"]: r for r in json.loads(out)}
    assert list(records) == ["pacs", "archive", "secure", "old-pacs"]
    pacs, archive, secure, old = records.values()
    assert pacs["configured"] is True and pacs["ae_title"] == "COUNTER"
    assert pacs["host"] == "127.0.0.1" and pacs["timeout_seconds"] == 5
    assert pacs["tls"] is False and pacs["storage_commitment"] is False
    assert (pacs["sent"], pacs["pending"], pacs["failed"]) == (2, 1, 0)
    assert pacs["last_sent_at"].startswith(later.isoformat()[:19])
    assert pacs["last_error"] == "association aborted by the peer"
    assert archive["storage_commitment"] is True and archive["timeout_seconds"] == 2.5
    assert (archive["sent"], archive["pending"], archive["failed"]) == (0, 0, 2)
    assert archive["last_sent_at"] is None
    assert archive["last_error"] == "out of resources (0xA700)"  # the newest, first line
    assert secure["tls"] is True and secure["sent"] == 0 and secure["last_error"] is None
    assert old["configured"] is False and old["ae_title"] is None and old["sent"] == 1

    code, out, err = run(capsys, "--config", config, "destinations", "list")
    assert code == 0 and not err
    header, *rows = out.splitlines()
    assert header.split() == [*CONFIG_HEADER, "SENT", "PENDING", "FAILED", "LAST", "SENT",
                              "LAST", "ERROR"]  # fmt: skip
    cells = [r.split() for r in rows]
    assert cells[0][:9] == ["pacs", "COUNTER", f"127.0.0.1:{pacs['port']}", "off", "off", "5s",
                            "2", "1", "0"]  # fmt: skip
    assert rows[0].endswith("association aborted by the peer")
    assert cells[1][3:9] == ["off", "on", "2.5s", "0", "0", "2"]
    assert cells[1][9] == "-" and rows[1].endswith("out of resources (0xA700)")
    assert cells[2][3:9] == ["on", "off", "30s", "0", "0", "0"]
    assert cells[3][:3] == ["old-pacs", "(not", "configured)"]
    assert "second line" not in out and "detail" not in out


@pytest.mark.system
def test_list_without_a_database(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Config only, a one-line note on stderr, exit 0: missing, empty or unreachable."""
    missing = tmp_path / "missing" / "node.db"
    old = tmp_path / "old.db"
    engine = make_engine(f"sqlite:///{old}")
    migrate.upgrade(engine, "0004")
    engine.dispose()
    closed = free_port()
    cases = [
        (f"sqlite:///{missing}", "database not found"),
        (f"sqlite:///{old}", "run `dicomnode db upgrade`"),
        (f"postgresql+psycopg://postgres@127.0.0.1:{closed}/none", "OperationalError"),
    ]
    for url, reason in cases:
        config = _config(tmp_path, url, free_port(), free_port())
        code, out, err = run(capsys, "--config", config, "destinations", "list")
        assert code == 0, err
        note = one_line_error(err)
        assert note.startswith("dicomnode: note: no delivery statistics (") and reason in note
        header, *rows = out.splitlines()
        assert header.split() == CONFIG_HEADER
        assert [r.split()[0] for r in rows] == ["pacs", "archive", "secure"]
        code, out, err = run(capsys, "--config", config, "destinations", "list", "--json")
        assert code == 0 and one_line_error(err) == note
        records = json.loads(out)
        assert [r["name"] for r in records] == ["pacs", "archive", "secure"]
        assert "sent" not in records[0]
    assert not missing.exists()  # looking did not create an empty database


def test_list_nothing_configured(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "node.toml"
    config.write_text(f'[database]\nurl = "sqlite:///{tmp_path / "none.db"}"\n')
    code, out, err = run(capsys, "--config", str(config), "destinations", "list")
    assert code == 0 and out == "no destinations configured\n" and "note" in err
    code, out, _ = run(capsys, "--config", str(config), "destinations", "echo")
    assert code == 0 and out == "no destinations configured\n"


_OK = re.compile(r"^pacs ok \(COUNTER@127\.0\.0\.1:(\d+), (\d+) ms\)$")


@pytest.mark.system
def test_echo(tmp_path: Path, scp: CountingSCP, capsys: pytest.CaptureFixture[str]) -> None:
    closed = free_port()
    config = _config(tmp_path, "sqlite:///unused.db", scp.port, closed)
    echo = ("--config", config, "destinations", "echo")

    code, out, err = run(capsys, *echo, "pacs")
    assert code == 0 and not err
    match = _OK.match(out.strip())
    assert match is not None, out
    assert int(match.group(1)) == scp.port

    code, out, err = run(capsys, *echo, "archive")
    assert code == 1 and not err
    assert out.splitlines() == [f"archive failed: cannot connect to 127.0.0.1:{closed}"]

    code, out, err = run(capsys, *echo, "secure")  # its CA file does not load
    assert code == 1 and not err
    (line,) = out.splitlines()
    assert line.startswith("secure failed: cannot load tls_ca ca.pem: ")  # + OpenSSL's reason

    # All of them (none named), in the order of the configuration.
    code, out, err = run(capsys, *echo)
    assert code == 1 and not err
    lines = out.splitlines()
    assert len(lines) == 3 and _OK.match(lines[0])
    assert lines[1].startswith("archive failed: ") and lines[2].startswith("secure failed: ")

    code, out, _ = run(capsys, *echo, "pacs", "archive", "--json")
    assert code == 1
    ok, failed = json.loads(out)
    assert ok["name"] == "pacs" and ok["ok"] is True and ok["status"] == 0
    assert ok["ae_title"] == "COUNTER" and ok["port"] == scp.port and ok["ms"] >= 0
    assert ok["error"] is None
    assert failed["name"] == "archive" and failed["ok"] is False and failed["ms"] is None
    assert failed["error"] == f"cannot connect to 127.0.0.1:{closed}"
    code, out, _ = run(capsys, *echo, "pacs", "--json")
    assert code == 0 and [r["ok"] for r in json.loads(out)] == [True]


@pytest.mark.system
def test_echo_and_destinations_echo_print_the_same(
    tmp_path: Path, scp: CountingSCP, capsys: pytest.CaptureFixture[str]
) -> None:
    # `echo NAME` used to say "echo ok: NAME (AE@host:port)" and, on stderr, "echo
    # failed: destination NAME: ...": now it is `destinations echo NAME`, line for line.
    closed = free_port()
    config = _config(tmp_path, "sqlite:///unused.db", scp.port, closed)
    for name in ("pacs", "archive"):
        code, out, err = run(capsys, "--config", config, "destinations", "echo", name)
        single = run(capsys, "--config", config, "echo", name)
        assert single[0] == code and not err and not single[2]
        # Same line, but for the round trip's milliseconds.
        assert re.sub(r"\d+ ms", "N ms", single[1]) == re.sub(r"\d+ ms", "N ms", out)
    assert _OK.match(run(capsys, "--config", config, "echo", "pacs")[1].strip())
    code, out, _ = run(capsys, "--config", config, "echo", "archive", "--json")
    assert code == 1 and json.loads(out)[0]["error"] == f"cannot connect to 127.0.0.1:{closed}"


@pytest.mark.system
def test_echo_unknown_name(
    tmp_path: Path, scp: CountingSCP, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path, "sqlite:///unused.db", scp.port, free_port())
    code, out, err = run(capsys, "--config", config, "destinations", "echo", "pacs", "nope")
    assert code == 2 and not out  # nothing is sent before every name is known
    assert one_line_error(err) == (
        "dicomnode: configuration error: unknown destination 'nope' (known: pacs, archive, secure)"
    )


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[int]:
    """dcmtk's storescp on a free port, stopped afterwards."""
    if shutil.which(STORESCP) is None:
        pytest.skip("dcmtk storescp not installed")
    port = free_port()
    out = tmp_path / "received"
    out.mkdir()
    proc = subprocess.Popen(
        [STORESCP, "--aetitle", "DCMTK", "--output-directory", str(out), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def listening() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    try:
        assert wait_for(listening, 10), "storescp did not start"
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.system
def test_echo_dcmtk(tmp_path: Path, storescp: int, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "node.toml"
    config.write_text(
        f"""
[[destinations]]
name = "dcmtk"
ae_title = "DCMTK"
host = "127.0.0.1"
port = {storescp}
"""
    )
    code, out, err = run(capsys, "--config", str(config), "destinations", "echo", "dcmtk")
    assert code == 0 and not err
    assert re.match(rf"^dcmtk ok \(DCMTK@127\.0\.0\.1:{storescp}, \d+ ms\)$", out.strip()), out
