"""The CLI in-process: exit codes, one-line errors, human and JSON output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from dicomnode.cli.main import main
from dicomnode.db import (
    Delivery,
    DeliveryState,
    Job,
    Series,
    make_engine,
    migrate,
    session_factory,
    transaction,
)
from dicomnode.db import jobs as queue
from dicomnode.pipeline import encode
from dicomnode.store import Ingestor, Spool
from tests.conftest import free_port
from tests.factories import ct_series


def write_config(tmp_path: Path, db_url: str, extra: str = "") -> Path:
    config = tmp_path / "node.toml"
    config.write_text(
        f"""
[database]
url = "{db_url}"
[storage]
path = "spool"
[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = {free_port()}
timeout_seconds = 3
{extra}
"""
    )
    return config


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.system
def test_bad_config_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, "sqlite:///db.sqlite", "[listener]\nport = 0\n")
    code, _, err = run(capsys, "--config", str(config), "db", "upgrade")
    assert code == 2
    assert "listener.port: must be between 1 and 65535" in one_line_error(err)


def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "--config", str(tmp_path / "nope.toml"), "jobs", "list")
    assert code == 2 and "configuration file not found" in one_line_error(err)


@pytest.mark.system
def test_route_to_unknown_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    extra = '[[routes]]\nname = "r"\nmodels = ["no-such-model"]\nsend_to = ["pacs"]\n'
    config = write_config(tmp_path, "sqlite:///db.sqlite", extra)
    code, _, err = run(capsys, "--config", str(config), "config", "check")
    assert code == 2
    assert "routes[0].models: unknown model 'no-such-model'" in one_line_error(err)


@pytest.mark.system
def test_config_check_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, "sqlite:///db.sqlite")
    code, out, _ = run(capsys, "--config", str(config), "config", "check")
    assert code == 0 and "configuration ok" in out and "lung-unet2d" in out


def test_db_commands_on_both_databases(
    tmp_path: Path, db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = str(write_config(tmp_path, db_url))
    code, _, err = run(capsys, "--config", config, "jobs", "list")
    assert code == 1 and "run `dicomnode db upgrade`" in one_line_error(err)
    code, out, _ = run(capsys, "--config", config, "db", "upgrade")
    head = migrate.head_revision()
    assert code == 0 and f"database at revision {head} (was empty)" in out
    code, out, _ = run(capsys, "--config", config, "db", "upgrade")
    assert code == 0 and f"(was {head})" in out
    code, out, _ = run(capsys, "--config", config, "jobs", "list")
    assert code == 0 and out.strip() == "no jobs"
    code, out, _ = run(capsys, "--config", config, "jobs", "list", "--json")
    assert code == 0 and json.loads(out) == []
    code, _, err = run(capsys, "--config", config, "jobs", "show", "42")
    assert code == 1 and one_line_error(err) == "dicomnode: no job with id 42"

    # A job with a failed delivery, built with the real ingest and queue code.
    engine = make_engine(db_url)
    sessions = session_factory(engine)
    datasets = ct_series(np.zeros((2, 4, 4), np.float32))
    for ds in datasets:
        Ingestor(Spool(tmp_path / "spool"), sessions).store(encode(ds))
    with transaction(sessions) as s:
        series = s.scalars(select(Series)).one()
        job = queue.enqueue(s, series, route="r", model="m", version="1", max_attempts=1)
        assert job is not None
        job_id = job.id
    claim = queue.claim(sessions, "w", 60)
    assert claim is not None
    with transaction(sessions) as s:
        s.add(
            Delivery(
                job_id=job_id,
                destination="pacs",
                state=DeliveryState.FAILED,
                attempts=1,
                last_error="destination pacs: association rejected",
            )
        )
        s.get(Job, job_id).timings = {"load_s": 1.5, "inference_s": 20.25}
    queue.fail(sessions, claim, "destination pacs: association rejected", retryable=True,
               base_seconds=1)  # fmt: skip
    engine.dispose()

    code, out, _ = run(capsys, "--config", config, "jobs", "list")
    assert code == 0
    header, row = out.splitlines()
    assert header.split()[:3] == ["ID", "STATE", "MODEL"]
    assert row.split()[:2] == [str(job_id), "failed"]
    assert datasets[0].SeriesInstanceUID in row

    code, out, _ = run(capsys, "--config", config, "jobs", "list", "--state", "done")
    assert out.strip() == "no jobs"

    code, out, _ = run(capsys, "--config", config, "jobs", "show", str(job_id), "--json")
    record = json.loads(out)
    assert record["state"] == "failed" and record["attempts"] == 1
    assert record["last_error"] == "destination pacs: association rejected"
    assert record["timings"] == {"load_s": 1.5, "inference_s": 20.25}
    assert record["deliveries"][0]["state"] == "failed"
    assert record["study_uid"] == datasets[0].StudyInstanceUID
    assert record["claimed_by"] == "w"
    steps = [(e["from"], e["to"], e["attempt"], e["worker"]) for e in record["history"]]
    assert steps == [(None, "queued", 0, None), ("queued", "running", 1, "w"),
                     ("running", "failed", 1, "w")]  # fmt: skip

    code, out, _ = run(capsys, "--config", config, "jobs", "show", str(job_id))
    assert "error         destination pacs: association rejected" in out
    assert "inference" in out and "20.25" in out
    assert "delivery      pacs: failed after 1 attempt(s)" in out
    assert "running -> failed" in out and "on w  (destination pacs: association rejected)" in out
    # Patient identifiers are never printed unless asked for.
    assert "PID-TEST-0001" not in out and "TEST^PATIENT" not in out

    code, out, err = run(capsys, "--config", config, "jobs", "cancel", str(job_id))
    assert code == 1 and err.strip() == f"dicomnode: job {job_id} is already failed"
    code, out, _ = run(capsys, "--config", config, "jobs", "retry", str(job_id))
    assert code == 0 and out.strip() == f"job {job_id} queued again"
    code, out, _ = run(capsys, "--config", config, "jobs", "cancel", str(job_id))
    assert code == 0 and out.strip() == f"job {job_id} cancelled"
    code, out, _ = run(capsys, "--config", config, "jobs", "show", str(job_id), "--json")
    history = json.loads(out)["history"]
    assert [(e["from"], e["to"]) for e in history[-2:]] == [
        ("failed", "queued"),
        ("queued", "cancelled"),
    ]
    assert history[-1]["note"].startswith("cancelled by admin ")
    code, _, err = run(capsys, "--config", config, "jobs", "retry", "424242")
    assert code == 1 and err.strip() == "dicomnode: no job with id 424242"
    # Several ids: a bad one gets its line and the others are still acted on.
    code, out, err = run(capsys, "--config", config, "jobs", "retry", "424242", str(job_id))
    assert code == 1 and err.strip() == "dicomnode: no job with id 424242"
    assert out.strip() == f"job {job_id} queued again"


def test_bad_arguments_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["jobs", "list", "--state", "sleeping"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["jobs", "show", "not-a-number"])
    assert info.value.code == 2


@pytest.mark.system
def test_echo_failures(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = str(write_config(tmp_path, "sqlite:///db.sqlite"))
    code, _, err = run(capsys, "--config", config, "echo", "elsewhere")
    assert code == 2 and "unknown destination 'elsewhere' (known: pacs)" in one_line_error(err)
    code, out, _ = run(capsys, "--config", config, "echo", "pacs")  # nothing listens there
    assert code == 1 and out.startswith("pacs failed: cannot connect to 127.0.0.1:")


@pytest.mark.system
def test_serve_on_a_busy_port_fails_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        extra = f'[listener]\nhost = "127.0.0.1"\nport = {port}\n'
        config = write_config(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}", extra)
        code, _, err = run(capsys, "--config", str(config), "serve")
    assert code == 1
    line = [ln for ln in err.splitlines() if ln.startswith("dicomnode:")]
    assert line == [
        f"dicomnode: listener: cannot listen on 127.0.0.1:{port}: Address already in use"
    ]
    assert "Traceback" not in err


@pytest.mark.system
def test_config_check_names_a_missing_tls_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = '[listener]\ntls_certificate = "no.crt"\ntls_private_key = "no.key"\n'
    config = write_config(tmp_path, "sqlite:///db.sqlite", extra)
    code, _, err = run(capsys, "--config", str(config), "config", "check")
    assert code == 2
    assert "listener.tls_certificate: file not found" in one_line_error(err)
