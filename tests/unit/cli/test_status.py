"""``dicomnode status`` against real databases (SQLite and PostgreSQL) and a real listener."""

from __future__ import annotations

import json
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from dicomnode.db import Delivery, DeliveryState, Job, Series, transaction, utcnow
from dicomnode.db import jobs as queue
from dicomnode.queue import Doorbell, WakeListener
from tests.conftest import free_port
from tests.factories import add_series
from tests.unit.cli.test_main import run


def _config(tmp_path: Path, db_url: str, port: int, min_free_mb: int = 0) -> str:
    config = tmp_path / "node.toml"
    config.write_text(
        f"""
[database]
url = "{db_url}"
[storage]
path = "spool"
min_free_mb = {min_free_mb}
[listener]
host = "127.0.0.1"
port = {port}
"""
    )
    return str(config)


def _status(capsys: pytest.CaptureFixture[str], config: str, *args: str) -> tuple[int, dict]:
    # WARNING: the in-process listener's INFO lines would land on the same stderr.
    code, out, err = run(
        capsys, "--log-level", "WARNING", "--config", config, "status", "--json", "--timeout",
        "2", *args,
    )  # fmt: skip
    assert not err, err
    return code, json.loads(out)


def test_an_idle_node_is_healthy(
    tmp_path: Path, db_url: str, sessions, make_listener, capsys: pytest.CaptureFixture[str]
) -> None:
    listener = make_listener()  # AE title DICOMNODE on loopback, spool tmp_path/spool
    capsys.readouterr()  # its start-up log line, through handlers an earlier test left
    config = _config(tmp_path, db_url, listener.port)
    code, report = _status(capsys, config)
    assert code == 0 and report["healthy"] is True and report["problems"] == []
    assert report["listener"]["state"] == "up"
    assert "C-ECHO status 0x0000" in report["listener"]["detail"]
    assert report["queue"] == {s: 0 for s in report["queue"]} and len(report["queue"]) == 6
    assert report["oldest_queued"] is None
    assert report["deliveries"] == {"pending": 0, "failed": 0}
    assert report["workers"]["busy"] == [] and report["last_errors"] == []
    assert report["disk"]["free_mb"] > 0 and report["disk"]["below_watermark"] is False

    code, out, _ = run(capsys, "--log-level", "WARNING", "--config", config, "status")
    assert code == 0
    assert out.splitlines()[0].startswith("listener    up (DICOMNODE@127.0.0.1:")
    assert out.splitlines()[-1] == "healthy"


def test_problems_need_attention(
    tmp_path: Path, db_url: str, sessions, engine, capsys: pytest.CaptureFixture[str]
) -> None:
    with transaction(sessions) as s:
        series_id = add_series(s, patient_id="PID-SECRET-7", accession_number="ACC-7").id

    def enqueue(model: str) -> int:
        with transaction(sessions) as s:
            job = queue.enqueue(
                s, s.get(Series, series_id), route="r", model=model, version="1", max_attempts=2
            )
            assert job is not None
            return job.id

    failed = enqueue("broken")
    claim = queue.claim(sessions, "host-a:11:0:ab", 60)
    assert claim is not None
    queue.fail(sessions, claim, "weights unreadable\nsecond line", retryable=False, base_seconds=1)
    retrying = enqueue("flaky")
    claim = queue.claim(sessions, "host-a:11:0:ab", 60)
    assert claim is not None and claim.job_id == retrying
    queue.fail(sessions, claim, "PACS timed out", retryable=True, base_seconds=3600)
    running = enqueue("busy")
    assert queue.claim(sessions, "host-b:22:1:cd", 60) is not None
    with transaction(sessions) as s:
        s.add(Delivery(job_id=running, destination="pacs", state=DeliveryState.FAILED))
        s.add(Delivery(job_id=failed, destination="pacs", state=DeliveryState.PENDING))
    # A stale lease (its worker died) does not count as a live worker.
    stale = enqueue("stale")
    assert queue.claim(sessions, "host-c:33:0:ef", 60) is not None
    with transaction(sessions) as s:
        s.execute(update(Job).where(Job.id == stale).values(lease_expires_at=utcnow()))
    queued = enqueue("waiting")
    with transaction(sessions) as s:  # runnable for 20 minutes, and nobody took it
        s.execute(
            update(Job).where(Job.id == queued).values(run_after=utcnow() - timedelta(minutes=20))
        )

    # A worker process waiting for work: registered in spool/run/wake (SQLite) or
    # LISTENing (PostgreSQL).
    stop = threading.Event()
    wake = WakeListener(engine, tmp_path / "spool", Doorbell(), stop)
    wake.start()
    try:
        assert wake.ready.wait(10)
        config = _config(tmp_path, db_url, free_port(), min_free_mb=2**40)
        code, report = _status(capsys, config)
        code_human, out, err = run(capsys, "--config", config, "status", "--timeout", "2")
    finally:
        stop.set()
        wake.join(10)

    assert code == 1 and code_human == 1 and not err and report["healthy"] is False
    assert report["listener"]["state"] == "down"
    assert report["workers"]["busy"] == ["host-b:22:1:cd"]
    assert report["workers"]["processes"] == 1
    assert report["queue"] == {"queued": 2, "running": 2, "sending": 0, "done": 0,
                               "failed": 1, "cancelled": 0}  # fmt: skip
    assert report["oldest_queued"]["job_id"] == retrying
    assert report["oldest_queued"]["age_s"] >= 0
    assert report["deliveries"] == {"pending": 1, "failed": 1}
    assert report["failed_last_hour"] == 1
    assert report["disk"]["below_watermark"] is True
    errors = [(e["job_id"], e["model"], e["outcome"], e["error"]) for e in report["last_errors"]]
    assert errors == [
        (retrying, "flaky", "queued", "PACS timed out"),
        (failed, "broken", "failed", "weights unreadable"),
    ]
    problems = report["problems"]
    assert len(problems) == 5 and report["stalled"] == 1  # the retrying one waits its backoff
    assert problems[0].startswith("listener down: DICOMNODE@127.0.0.1:")
    assert problems[1].startswith("disk: ") and "below storage.min_free_mb" in problems[1]
    assert problems[2] == "1 delivery(ies) failed"
    assert problems[3].startswith("1 job(s) could have run for over 10 min and no worker")
    assert problems[4] == "1 job(s) failed in the last hour"
    assert report["oldest_queued"]["job_id"] != queued  # the newer queued job is not the oldest

    lines = out.splitlines()
    assert lines[0].startswith("listener    down (DICOMNODE@127.0.0.1:")
    assert lines[1].startswith("workers     1 busy (host-b:22:1:cd); 1 worker process(es)")
    assert lines[2] == "queue       queued 2  running 2  sending 0  done 0  failed 1  cancelled 0"
    assert lines[3].startswith(f"oldest      job {retrying} queued ")
    assert lines[4] == "deliveries  1 pending, 1 failed"
    assert "last errors" in lines and "needs attention" in lines
    assert any(line.split()[:2] == [str(failed), "broken"] for line in lines)
    # No patient data, and only the first line of an error.
    assert "PID-SECRET-7" not in out + json.dumps(report) and "ACC-7" not in out
    assert "second line" not in out


def test_no_listener_skips_the_echo(
    tmp_path: Path, db_url: str, sessions, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path, db_url, free_port())
    code, report = _status(capsys, config)
    assert code == 1 and report["listener"]["state"] == "down"
    code, report = _status(capsys, config, "--no-listener")
    assert code == 0 and report["listener"]["state"] == "not checked"
    assert report["workers"]["processes"] == 0


@pytest.mark.system
def test_status_on_an_empty_database_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path, f"sqlite:///{tmp_path / 'new.db'}", free_port())
    code, _, err = run(capsys, "--config", config, "status")
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "run `dicomnode db upgrade`" in err


def test_an_old_failed_delivery_is_counted_but_no_longer_a_problem(
    tmp_path: Path, db_url: str, sessions, capsys: pytest.CaptureFixture[str]
) -> None:
    with transaction(sessions) as s:
        series = add_series(s)
        job = queue.enqueue(s, series, route="r", model="m", version="1", max_attempts=1)
        assert job is not None
        s.add(Delivery(job_id=job.id, destination="pacs", state=DeliveryState.FAILED))
        job.state = "failed"
        job_id = job.id
    config = _config(tmp_path, db_url, free_port())
    _, report = _status(capsys, config, "--no-listener")
    assert report["problems"] == ["1 delivery(ies) failed"]
    with transaction(sessions) as s:
        s.execute(
            update(Job).where(Job.id == job_id).values(updated_at=utcnow() - timedelta(days=2))
        )
    code, report = _status(capsys, config, "--no-listener")
    assert code == 0 and report["problems"] == [] and report["deliveries"]["failed"] == 1


def test_an_unreachable_destination_needs_attention_until_a_delivery_succeeds(
    tmp_path: Path, db_url: str, sessions, capsys: pytest.CaptureFixture[str]
) -> None:
    with transaction(sessions) as s:
        series = add_series(s)
        job = queue.enqueue(s, series, route="r", model="m", version="1", max_attempts=5)
        assert job is not None
        job_id = job.id
    claim = queue.claim(sessions, "host-a:1:0:ab", 60)
    assert claim is not None
    error = "destination pacs: cannot connect to 127.0.0.1:4242 (Connection refused)"
    with transaction(sessions) as s:  # what the pipeline records for a failed try
        s.add(Delivery(job_id=job_id, destination="pacs", attempts=1, last_error=error))
    queue.fail(sessions, claim, error, retryable=True, base_seconds=3600)
    config = _config(tmp_path, db_url, free_port())

    # Before: "healthy", with the delivery only pending (it is being retried).
    code, report = _status(capsys, config, "--no-listener")
    assert code == 1 and report["healthy"] is False
    [failing] = report["failing_destinations"]
    assert failing["destination"] == "pacs" and failing["deliveries"] == 1
    assert failing["error"] == error
    assert report["problems"] == [
        f"destination pacs: latest delivery attempts failed since "
        f"{failing['since'].replace('T', ' ')[:19]} (1 delivery(ies)): {error}"
    ]
    assert [e["job_id"] for e in report["last_errors"]] == [job_id]
    code, out, _ = run(capsys, "--config", config, "status", "--no-listener")
    assert code == 1 and "destination pacs: latest delivery attempts failed" in out

    # The PACS is back: the re-send succeeded. Neither the destination nor the error
    # it superseded is listed any more.
    with transaction(sessions) as s:
        s.execute(
            update(Delivery)
            .where(Delivery.job_id == job_id)
            .values(
                state=DeliveryState.SENT,
                last_error=None,
                sent_at=utcnow() + timedelta(seconds=1),
                attempts=2,
            )
        )
        s.execute(update(Job).where(Job.id == job_id).values(state="done"))
    code, report = _status(capsys, config, "--no-listener")
    assert report["failing_destinations"] == [] and report["last_errors"] == []
    assert code == 0 and report["healthy"] is True


def test_a_later_delivery_to_the_same_destination_clears_it(
    tmp_path: Path, db_url: str, sessions, capsys: pytest.CaptureFixture[str]
) -> None:
    with transaction(sessions) as s:
        old = queue.enqueue(s, add_series(s), route="r", model="m", version="1", max_attempts=5)
        new = queue.enqueue(
            s, add_series(s, "1.2.9", "1.2.9.1"), route="r", model="m", version="1",
            max_attempts=5,
        )  # fmt: skip
        assert old is not None and new is not None
        s.add(Delivery(job_id=old.id, destination="pacs", last_error="destination pacs: down"))
        s.add(Delivery(job_id=new.id, destination="other", last_error="destination other: down"))
    config = _config(tmp_path, db_url, free_port())
    _, report = _status(capsys, config, "--no-listener")
    assert [d["destination"] for d in report["failing_destinations"]] == ["other", "pacs"]
    with transaction(sessions) as s:
        s.add(
            Delivery(
                job_id=new.id,
                destination="pacs",
                state=DeliveryState.SENT,
                sent_at=utcnow() + timedelta(seconds=1),
            )
        )
    _, report = _status(capsys, config, "--no-listener")
    assert [d["destination"] for d in report["failing_destinations"]] == ["other"]
