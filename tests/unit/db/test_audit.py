"""The audit trail on SQLite and PostgreSQL: append-only in the database, exported by the CLI."""

from __future__ import annotations

import csv
import io
import json
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import delete, select, text, update
from sqlalchemy.exc import DBAPIError

from dicomnode.db import JobState, Series, Study, audit, jobs, read_only, transaction, utcnow
from dicomnode.db.models import AuditEvent
from tests.unit.cli.test_main import one_line_error, run


def add_entries(sessions) -> None:
    now = utcnow()
    with transaction(sessions) as s:
        audit.record(
            s, "instances-received", actor="CT01", peer="10.0.0.7", study_uid="1.2.3",
            series_uid="1.2.3.4", count=120, size_bytes=61_440_000, at=now - timedelta(days=3),
        )  # fmt: skip
        audit.record(
            s, "association-rejected", outcome="failure", actor="EVIL", peer="10.9.9.9",
            detail="reason calling_ae;\n called AE DICOMNODE", at=now - timedelta(hours=2),
        )  # fmt: skip
        audit.record(
            s, "results-sent", actor="worker-1", destination="pacs", peer="PACS@10.0.0.2:104",
            study_uid="1.2.3", job_id=7, count=2, at=now - timedelta(minutes=5),
        )  # fmt: skip


def test_entries_cannot_be_changed_or_removed(engine, sessions) -> None:
    add_entries(sessions)
    for statement in (
        update(AuditEvent).values(actor="someone else"),
        delete(AuditEvent),
    ):
        with pytest.raises(DBAPIError, match="append-only"), transaction(sessions) as s:
            s.execute(statement)
    if engine.dialect.name == "postgresql":
        with pytest.raises(DBAPIError, match="append-only"), engine.begin() as conn:
            conn.execute(text("TRUNCATE audit_events"))
    with sessions() as s:
        rows = s.scalars(select(AuditEvent).order_by(AuditEvent.id)).all()
    assert [r.actor for r in rows] == ["CT01", "EVIL", "worker-1"]
    assert rows[1].detail == "reason calling_ae; called AE DICOMNODE"  # one line


def test_unknown_event_is_refused(sessions) -> None:
    with pytest.raises(ValueError, match="unknown audit event"), transaction(sessions) as s:
        audit.record(s, "instances-teleported")


def test_entries_filter_and_page(sessions) -> None:
    add_entries(sessions)
    with sessions() as s:
        everything = list(audit.entries(s, batch=1))
        recent = list(audit.entries(s, since=utcnow() - timedelta(days=1)))
        study = list(audit.entries(s, study_uid="1.2.3", events=("results-sent",)))
    assert [e["event"] for e in everything] == [
        "instances-received",
        "association-rejected",
        "results-sent",
    ]
    assert [e["actor"] for e in recent] == ["EVIL", "worker-1"]
    assert [e["job_id"] for e in study] == [7]


def test_job_start_and_end_are_in_the_trail(sessions) -> None:
    with transaction(sessions) as s:
        study = Study(study_uid="1.2.9")
        s.add(study)
        s.flush()
        series = Series(study_id=study.id, series_uid="1.2.9.1")
        s.add(series)
        s.flush()
        job = jobs.enqueue(s, series, route="r", model="m", version="2", max_attempts=1)
        assert job is not None
    claim = jobs.claim(sessions, "w1", 60)
    assert claim is not None
    assert jobs.finish(sessions, claim, JobState.CANCELLED, "content check: 3 slices")
    with sessions() as s:
        rows = list(audit.entries(s, job_id=claim.job_id))
    assert [(r["event"], r["outcome"]) for r in rows] == [
        ("job-queued", "success"),
        ("job-ended", "cancelled"),
    ]
    assert rows[1]["actor"] == "w1" and rows[1]["study_uid"] == "1.2.9"
    assert "m 2 route r" in rows[1]["detail"] and "content check" in rows[1]["detail"]


def _config(tmp_path: Path, db_url: str) -> str:
    path = tmp_path / "node.toml"
    path.write_text(f'[database]\nurl = "{db_url}"\n')
    return str(path)


def test_export_csv_json_and_jsonl(
    tmp_path: Path, db_url: str, sessions, capsys: pytest.CaptureFixture[str]
) -> None:
    add_entries(sessions)
    config = _config(tmp_path, db_url)

    code, out, _ = run(capsys, "--config", config, "audit", "export", "--since", "1d")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and [r["event"] for r in rows] == ["association-rejected", "results-sent"]
    assert rows[1]["destination"] == "pacs" and rows[1]["count"] == "2"

    code, out, _ = run(capsys, "--config", config, "audit", "export", "--format", "json")
    data = json.loads(out)
    assert code == 0 and [d["actor"] for d in data] == ["CT01", "EVIL", "worker-1"]
    assert data[0]["size_bytes"] == 61_440_000 and data[0]["at"].endswith("+00:00")

    code, out, _ = run(
        capsys, "--config", config, "audit", "export", "--format", "jsonl",
        "--event", "results-sent", "--event", "instances-received", "--until", "1h",
    )  # fmt: skip
    assert code == 0 and [json.loads(x)["event"] for x in out.splitlines()] == [
        "instances-received"
    ]

    target = tmp_path / "audit.csv"
    code, out, _ = run(capsys, "--config", config, "audit", "export", "-o", str(target))
    assert code == 0 and "exported 3 audit entries" in out
    assert len(list(csv.DictReader(target.open()))) == 3
    assert not list(tmp_path.glob(".audit.csv.partial"))

    code, out, _ = run(capsys, "--config", config, "audit", "export", "--since", "2099-01-01")
    assert code == 0 and out.splitlines() == [",".join(audit.FIELDS)]


@pytest.mark.system
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--since", "yesterday"], "bad date 'yesterday'"),
        (["--event", "coffee"], "unknown audit event 'coffee'"),
        (["--job", "0"], "at least 1"),
        (["--format", "xml"], "invalid choice"),
        (["-o", "/nonexistent/dir/audit.csv"], "FileNotFoundError"),
    ],
)
def test_bad_export_arguments_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    from dicomnode.db import make_engine, migrate

    url = f"sqlite:///{tmp_path / 'node.db'}"
    engine = make_engine(url)
    migrate.upgrade(engine)
    engine.dispose()
    try:
        code, _, err = run(capsys, "--config", _config(tmp_path, url), "audit", "export", *args)
    except SystemExit as exc:  # argparse's usage errors
        code, err = int(exc.code or 0), capsys.readouterr().err
    assert code != 0 and message in one_line_error(err)


def test_a_paused_export_does_not_hold_the_database(sessions) -> None:
    add_entries(sessions)
    with read_only(sessions)() as reader:  # what `dicomnode audit export` reads with
        rows = audit.entries(reader, batch=1)
        assert next(rows)["actor"] == "CT01"  # paused mid-export, like `... | less`
        with transaction(sessions) as writer:  # the listener can still commit
            audit.record(writer, "admin", actor="other", detail="while exporting")
        assert [r["actor"] for r in rows] == ["EVIL", "worker-1", "other"]
