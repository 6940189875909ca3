"""``dicomnode jobs list`` filters and ``dicomnode jobs purge``, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from dicomnode.cli.main import main
from dicomnode.db import (
    Delivery,
    DeliveryState,
    Job,
    Output,
    Series,
    commitment,
    transaction,
    utcnow,
)
from dicomnode.db import jobs as queue
from dicomnode.db.models import JobEvent
from tests.factories import add_series
from tests.unit.cli.test_main import one_line_error, run, write_config


def _series(sessions, study_uid: str, accession: str) -> int:
    with transaction(sessions) as s:
        return add_series(
            s, study_uid, f"{study_uid}.1", patient_id="PID-SECRET-7", accession_number=accession
        ).id


def _enqueue(sessions, series_id: int, route: str, model: str) -> int:
    with transaction(sessions) as s:
        job = queue.enqueue(
            s, s.get(Series, series_id), route=route, model=model, version="1", max_attempts=3
        )
        assert job is not None
        return job.id


@pytest.fixture
def filled(tmp_path: Path, db_url: str, sessions) -> tuple[str, dict[str, int]]:
    """Three jobs: done (chest/lung, 10 days old), failed (chest/nodule), queued (head/lung)."""
    a = _series(sessions, "1.2.840.99.1", "ACC-0001")
    b = _series(sessions, "1.2.840.99.2", "ACC-0002")
    done = _enqueue(sessions, a, "chest", "lung")
    claim = queue.claim(sessions, "w1", 60)
    assert claim is not None and claim.job_id == done
    with transaction(sessions) as s:
        s.add(Output(job_id=done, kind="seg", sop_class_uid="1.2", sop_instance_uid="1.2.3",
                     series_uid="1.2.4", path="out/x.dcm", size_bytes=10))  # fmt: skip
        s.add(Delivery(job_id=done, destination="pacs", state=DeliveryState.SENT, attempts=1))
    assert queue.finish(sessions, claim)
    failed = _enqueue(sessions, a, "chest", "nodule")
    claim = queue.claim(sessions, "w1", 60)
    assert claim is not None and claim.job_id == failed
    queue.fail(sessions, claim, "model crashed", retryable=False, base_seconds=1)
    queued = _enqueue(sessions, b, "head", "lung")
    with transaction(sessions) as s:
        old = utcnow() - timedelta(days=10)
        job = s.get(Job, done)
        job.created_at, job.finished_at = old, old
    config = str(write_config(tmp_path, db_url))
    return config, {"done": done, "failed": failed, "queued": queued}


def _ids(capsys: pytest.CaptureFixture[str], config: str, *args: str) -> list[int]:
    code, out, err = run(capsys, "--config", config, "jobs", "list", "--json", *args)
    assert code == 0, err
    return [r["id"] for r in json.loads(out)]


def test_list_filters(filled, capsys: pytest.CaptureFixture[str]) -> None:
    config, ids = filled
    done, failed, queued = ids["done"], ids["failed"], ids["queued"]
    assert _ids(capsys, config) == [queued, failed, done]
    assert _ids(capsys, config, "--route", "chest") == [failed, done]
    assert _ids(capsys, config, "--model", "lung") == [queued, done]
    assert _ids(capsys, config, "--route", "chest", "--model", "lung") == [done]
    assert _ids(capsys, config, "--state", "failed") == [failed]
    assert _ids(capsys, config, "--study", "1.2.840.99.2") == [queued]
    assert _ids(capsys, config, "--accession", "ACC-0001") == [failed, done]
    assert _ids(capsys, config, "--accession", "ACC-9999") == []
    assert _ids(capsys, config, "--since", "2d") == [queued, failed]
    assert _ids(capsys, config, "--since", "1w") == [queued, failed]
    assert _ids(capsys, config, "--since", "2000-01-01") == [queued, failed, done]
    since = (utcnow() - timedelta(days=5)).strftime("%Y-%m-%dT%H:%M:%S")
    assert _ids(capsys, config, "--since", since) == [queued, failed]
    assert _ids(capsys, config, "--since", "2000-01-01T00:00:00+02:00", "--limit", "1") == [queued]

    # The human table, filtered; the accession number filters but is never printed.
    code, out, _ = run(capsys, "--config", config, "jobs", "list", "--accession", "ACC-0001")
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split()[:3] == ["ID", "STATE", "MODEL"]
    assert [r.split()[:2] for r in rows] == [[str(failed), "failed"], [str(done), "done"]]
    assert "ACC-0001" not in out and "PID-SECRET-7" not in out
    code, out, _ = run(capsys, "--config", config, "jobs", "list", "--model", "none")
    assert code == 0 and out.strip() == "no jobs"


JOB_KEYS = [
    "id", "state", "route", "model", "model_version", "series_uid", "study_uid", "priority",
    "attempts", "max_attempts", "created_at", "started_at", "finished_at", "last_error",
]  # fmt: skip
DETAIL_KEYS = [
    "lease_owner", "claimed_by", "lease_expires_at", "run_after", "timings", "summary",
    "selection", "priors", "outputs", "deliveries", "history", "resent_at",
]  # fmt: skip
PHI_KEYS = ["patient_id", "accession_number"]


def test_the_json_keys_and_their_order(filled, capsys: pytest.CaptureFixture[str]) -> None:
    """``--json`` prints the keys scripts read, in the same order, patient data only asked."""
    config, ids = filled
    code, out, _ = run(capsys, "--config", config, "jobs", "list", "--json")
    assert code == 0 and [list(r) for r in json.loads(out)] == [JOB_KEYS] * 3
    code, out, _ = run(capsys, "--config", config, "jobs", "list", "--json", "--show-phi")
    records = json.loads(out)
    assert code == 0 and [list(r) for r in records] == [JOB_KEYS + PHI_KEYS] * 3
    assert {(r["patient_id"], r["accession_number"]) for r in records} == {
        ("PID-SECRET-7", "ACC-0001"),
        ("PID-SECRET-7", "ACC-0002"),
    }
    show = ("--config", config, "jobs", "show", str(ids["done"]), "--json")
    code, out, _ = run(capsys, *show)
    record = json.loads(out)
    assert code == 0 and list(record) == JOB_KEYS + DETAIL_KEYS
    assert [list(o) for o in record["outputs"]] == [
        ["kind", "sop_class_uid", "sop_instance_uid", "series_uid", "path", "size_bytes"]
    ]
    assert [list(d) for d in record["deliveries"]] == [
        ["destination", "state", "attempts", "sent_at", "last_error", "warning", "commitment",
         "commitment_uid", "commitment_requested_at", "confirmed_at", "commitment_failed"]
    ]  # fmt: skip
    assert {tuple(e) for e in record["history"]} == {
        ("at", "from", "to", "attempt", "counted", "worker", "note")
    }
    code, out, _ = run(capsys, *show, "--show-phi")
    record = json.loads(out)
    assert code == 0 and list(record) == JOB_KEYS + PHI_KEYS + DETAIL_KEYS
    assert record["accession_number"] == "ACC-0001"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--state", "sleeping"], "unknown job state 'sleeping'"),
        (["--since", "yesterday"], "bad date 'yesterday'"),
        (["--since", "2024-13-45"], "bad date '2024-13-45'"),
        (["--since", "3x"], "bad date '3x'"),
        (["--limit", "0"], "expected a whole number of at least 1"),
        (["--limit", "many"], "expected a whole number of at least 1"),
    ],
)
def test_bad_list_filters_exit_2_with_one_line(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["jobs", "list", *args])
    assert info.value.code == 2
    _, err = capsys.readouterr()
    line = one_line_error(err)
    assert line.startswith("dicomnode jobs list: error: argument") and message in line


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--state", "running", "--older-than", "30d"], "refusing to purge running jobs"),
        (["--state", "queued", "--older-than", "30d"], "refusing to purge queued jobs"),
        (["--state", "sending", "--older-than", "30d"], "refusing to purge sending jobs"),
        (["--state", "asleep", "--older-than", "30d"], "unknown job state 'asleep'"),
        (["--state", "done", "--older-than", "30 days"], "bad age '30 days'"),
        (["--state", "done"], "the following arguments are required: --older-than"),
    ],
)
def test_bad_purge_arguments_exit_2_with_one_line(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["jobs", "purge", *args])
    assert info.value.code == 2
    _, err = capsys.readouterr()
    assert message in one_line_error(err)


def _count(sessions, model: type, job_id: int) -> int:
    column = model.id if model is Job else model.job_id  # type: ignore[attr-defined]
    with sessions() as s:
        return int(s.scalar(select(func.count()).where(column == job_id)) or 0)


def test_purge(filled, sessions, capsys: pytest.CaptureFixture[str]) -> None:
    config, ids = filled
    done = ids["done"]
    purge = ("--config", config, "jobs", "purge")
    code, out, _ = run(capsys, *purge, "--state", "done", "--older-than", "30d")
    assert code == 0 and out.startswith("purged 0 done job(s)")

    code, out, _ = run(capsys, *purge, "--state", "done", "--older-than", "7d", "--dry-run")
    assert code == 0
    header, row, summary = out.splitlines()
    assert header.split() == ["ID", "STATE", "MODEL", "ROUTE", "FINISHED"]
    assert row.split()[:4] == [str(done), "done", "lung", "chest"]
    assert summary.startswith("would purge 1 done job(s)")
    assert "result file(s); received instances are left to retention" in summary
    assert _count(sessions, Job, done) == 1  # a dry run changes nothing

    code, out, _ = run(
        capsys, *purge, "--state", "done", "--older-than", "7d", "--dry-run", "--json"
    )
    record = json.loads(out)
    assert record["dry_run"] is True and record["count"] == 1
    assert [j["id"] for j in record["jobs"]] == [done]

    for model in (Job, JobEvent, Output, Delivery):
        assert _count(sessions, model, done) > 0
    # The done job's result file goes with it; one another job's output also names stays.
    spool = Path(config).parent / "spool"
    (spool / "out").mkdir(parents=True)
    (spool / "out/x.dcm").write_bytes(b"seg")
    (spool / "out/shared.dcm").write_bytes(b"sr")
    with transaction(sessions) as s:
        for job_id in (done, ids["queued"]):
            s.add(Output(job_id=job_id, kind="sr", sop_class_uid="1.2", sop_instance_uid="1.2.5",
                         series_uid="1.2.6", path="out/shared.dcm", size_bytes=2))  # fmt: skip
    code, out, _ = run(capsys, *purge, "--state", "done", "--older-than", "7d", "--json")
    assert code == 0 and json.loads(out)["count"] == 1 and json.loads(out)["files"] == 1
    assert not (spool / "out/x.dcm").exists() and (spool / "out/shared.dcm").exists()
    for model in (Job, JobEvent, Output, Delivery):
        assert _count(sessions, model, done) == 0
    # The other jobs are untouched: not done, or not old enough.
    assert _ids(capsys, config) == [ids["queued"], ids["failed"]]
    code, out, _ = run(capsys, *purge, "--state", "failed", "--older-than", "1h")
    assert code == 0 and out.startswith("purged 0 failed job(s)")
    code, out, _ = run(capsys, *purge, "--state", "failed", "--older-than", "0s")
    assert code == 0 and out.startswith("purged 1 failed job(s)")
    assert _ids(capsys, config) == [ids["queued"]]


def test_purge_keeps_jobs_whose_commitment_is_awaited_in_any_state(
    filled, sessions, capsys: pytest.CaptureFixture[str]
) -> None:
    # The failed job had sent to the PACS before it failed (another destination failed):
    # that PACS has not reported yet, and a failure it reports re-sends the results.
    config, ids = filled
    with transaction(sessions) as s:
        delivery = Delivery(
            job_id=ids["failed"], destination="pacs", state=DeliveryState.SENT, attempts=1
        )
        s.add(delivery)
        s.flush()
        commitment.request(s, delivery, "1.2.826.0.1.3680043.8.498.55")
    purge = ("--config", config, "jobs", "purge", "--state", "failed", "--older-than", "0s")
    code, out, _ = run(capsys, *purge, "--dry-run", "--json")
    assert code == 0 and json.loads(out)["count"] == 0
    assert json.loads(out)["kept_awaiting_commitment"] == 1
    code, out, _ = run(capsys, *purge)
    assert code == 0 and out.startswith("purged 0 failed job(s)")
    assert "kept 1 failed job(s) whose storage commitment is still awaited" in out
    assert _count(sessions, Job, ids["failed"]) == 1
    with transaction(sessions) as s:  # the PACS confirmed: now it may go
        s.execute(update(Delivery).values(confirmed_at=utcnow()))
    code, out, _ = run(capsys, *purge)
    assert code == 0 and out.startswith("purged 1 failed job(s)") and "kept" not in out
