"""Retention on real databases (SQLite and PostgreSQL) and a real spool.

Series are stored through the real ingest path; their jobs go through the real queue
functions, and only their timestamps are moved back in time. The emergency cleanup
runs on a spool whose "disk" is a quota: its free space is the quota minus the bytes
the spool's files really take, so deleting a file really frees space.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select, update

from dicomnode.config import RetentionSettings, StorageSettings
from dicomnode.db import (
    Delivery,
    DeliveryState,
    Instance,
    Job,
    JobState,
    Output,
    Series,
    SeriesState,
    jobs,
    transaction,
    utcnow,
)
from dicomnode.db.models import AuditEvent
from dicomnode.errors import JobStateError
from dicomnode.pipeline import encode
from dicomnode.store import RESULTS, Ingestor, Spool, retention
from tests.factories import ct_series
from tests.unit.cli.test_main import one_line_error, run

DAY = timedelta(days=1)
RULES = RetentionSettings(done_days=7, failed_days=30, emergency_free_mb=0)
STORAGE = StorageSettings(min_free_mb=0)


class QuotaSpool(Spool):
    """A spool on a disk of ``quota`` bytes: free space = quota - bytes of its files."""

    def __init__(self, root: Path, quota: int) -> None:
        super().__init__(root)
        self.quota = quota

    def free_bytes(self) -> int:
        used = sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())
        return self.quota - used


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool")


def receive(sessions, spool: Spool, slices: int = 3) -> tuple[str, list[str]]:
    """Store a small CT series through the ingest path; return its UID and file paths."""
    ingestor = Ingestor(spool, sessions)
    datasets = ct_series(np.zeros((slices, 16, 16)), patient_id="PHI-RET-1")
    paths = [ingestor.store(encode(ds), calling_ae="CT01").path for ds in datasets]
    return str(datasets[0].SeriesInstanceUID), paths


def complete(sessions, series_uid: str, days_ago: float) -> int:
    with transaction(sessions) as s:
        series = s.scalars(select(Series).where(Series.series_uid == series_uid)).one()
        series.state = SeriesState.COMPLETE
        series.completed_at = series.last_received_at = utcnow() - days_ago * DAY
        return series.id


def add_job(
    sessions, spool: Spool, series_id: int, state: JobState, days_ago: float = 0, model="m"
) -> int:
    """A job that really went through the queue to ``state``, ended ``days_ago``."""
    with transaction(sessions) as s:
        job = jobs.enqueue(
            s, s.get(Series, series_id), route="r", model=model, version="1", max_attempts=1
        )
        assert job is not None
        job_id = job.id
    if state == JobState.QUEUED:
        return job_id
    claim = jobs.claim(sessions, "w1", 60, only_models=[model])
    assert claim is not None and claim.job_id == job_id
    result = spool.write(Path(RESULTS, "1.2", f"{job_id}", f"{job_id}.dcm"), b"x" * 1000)
    with transaction(sessions) as s:
        s.add(
            Output(
                job_id=job_id,
                kind="seg",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4",
                sop_instance_uid=f"1.2.3.{job_id}",
                series_uid="1.2.3",
                path=result.relative_to(spool.root).as_posix(),
                size_bytes=1000,
            )
        )
        s.add(Delivery(job_id=job_id, destination="pacs", attempts=1))
    if state == JobState.SENDING:
        with transaction(sessions) as s:
            assert jobs.set_state(s, claim, JobState.SENDING)
    elif state == JobState.DONE:
        with transaction(sessions) as s:
            s.execute(update(Delivery).where(Delivery.job_id == job_id).values(state="sent"))
        assert jobs.finish(sessions, claim)
    elif state == JobState.FAILED:
        failed = jobs.fail(
            sessions, claim, "destination pacs: refused", retryable=False, base_seconds=1
        )
        assert failed == JobState.FAILED
    elif state == JobState.CANCELLED:
        assert jobs.finish(sessions, claim, JobState.CANCELLED, "superseded")
    if state in jobs.FINAL_STATES:
        with transaction(sessions) as s:
            s.execute(
                update(Job).where(Job.id == job_id).values(finished_at=utcnow() - days_ago * DAY)
            )
    return job_id


def instance_count(sessions, series_id: int) -> int:
    with sessions() as s:
        return int(s.scalar(select(func.count()).where(Instance.series_id == series_id)) or 0)


def test_done_series_is_deleted_after_done_days(sessions, spool: Spool) -> None:
    uid, paths = receive(sessions, spool)
    series_id = complete(sessions, uid, days_ago=9)
    job_id = add_job(sessions, spool, series_id, JobState.DONE, days_ago=8)
    with sessions() as s:
        result = s.scalars(select(Output.path).where(Output.job_id == job_id)).one()
    assert all((spool.root / p).exists() for p in [*paths, result])

    report = retention.run(sessions, spool, RULES, STORAGE)

    assert [d["series_uid"] for d in report.deleted] == [uid]
    assert report.deleted[0]["kind"] == "done" and report.deleted[0]["instances"] == 3
    assert not any((spool.root / p).exists() for p in [*paths, result])
    assert not (spool.root / paths[0]).parent.exists()  # the emptied series folder went too
    assert instance_count(sessions, series_id) == 0
    with sessions() as s:
        series = s.get(Series, series_id)
        assert series.purged_at is not None
        assert s.get(Job, job_id).state == JobState.DONE  # the story stays
        entry = s.scalars(select(AuditEvent).where(AuditEvent.event == "instances-deleted")).one()
        assert (entry.series_uid, entry.count, entry.actor) == (uid, 3, "retention")
        assert entry.size_bytes == report.freed_bytes > 3000
        assert "done_days" in entry.detail


def test_not_yet_due_is_kept_and_a_second_run_finds_nothing(sessions, spool: Spool) -> None:
    uid, paths = receive(sessions, spool)
    series_id = complete(sessions, uid, days_ago=3)
    add_job(sessions, spool, series_id, JobState.DONE, days_ago=2)
    old_uid, _ = receive(sessions, spool)
    complete(sessions, old_uid, days_ago=10)  # no route matched it: due after done_days

    first = retention.run(sessions, spool, RULES, STORAGE)
    second = retention.run(sessions, spool, RULES, STORAGE)

    assert [d["series_uid"] for d in first.deleted] == [old_uid]
    assert second.deleted == []
    assert all((spool.root / p).exists() for p in paths)
    assert instance_count(sessions, series_id) == 3


def test_failed_series_are_kept_for_failed_days(sessions, spool: Spool) -> None:
    recent, _ = receive(sessions, spool)
    add_job(sessions, spool, complete(sessions, recent, 20), JobState.FAILED, days_ago=10)
    old, _ = receive(sessions, spool)
    add_job(sessions, spool, complete(sessions, old, 40), JobState.FAILED, days_ago=31)

    report = retention.run(sessions, spool, RULES, STORAGE)

    assert [(d["series_uid"], d["kind"]) for d in report.deleted] == [(old, "failed")]
    assert "failed_days" in report.deleted[0]["reason"]


def test_nothing_unprocessed_or_undelivered_is_ever_deleted(tmp_path: Path, sessions) -> None:
    # A disk that is nearly full: the emergency cleanup runs and takes all it may.
    spool = QuotaSpool(tmp_path / "spool", quota=0)
    keep: dict[str, tuple[int, list[str]]] = {}
    uid, paths = receive(sessions, spool)  # still receiving, 100 days after its last image
    with transaction(sessions) as s:
        s.execute(
            update(Series)
            .where(Series.series_uid == uid)
            .values(last_received_at=utcnow() - 100 * DAY)
        )
    keep["receiving"] = (0, paths)
    for name, state in (
        ("queued", JobState.QUEUED),
        ("running", JobState.RUNNING),
        ("sending", JobState.SENDING),
    ):
        uid, paths = receive(sessions, spool)
        series_id = complete(sessions, uid, days_ago=100)
        add_job(sessions, spool, series_id, JobState.DONE, days_ago=99, model=f"done-{name}")
        add_job(sessions, spool, series_id, state, model=name)
        keep[name] = (series_id, paths)
    uid, paths = receive(sessions, spool)  # failed, not yet due: only its admin may act
    series_id = complete(sessions, uid, days_ago=10)
    add_job(sessions, spool, series_id, JobState.FAILED, days_ago=9)
    keep["failed"] = (series_id, paths)
    done_uid, done_paths = receive(sessions, spool)  # done, not due: the emergency takes it
    add_job(sessions, spool, complete(sessions, done_uid, 2), JobState.DONE, days_ago=1)
    spool.quota = spool.free_bytes() * -1 + 10**9  # so that free space is 1 GB...
    rules = RetentionSettings(done_days=7, failed_days=30, emergency_free_mb=10**6)  # ...< 1 TB

    dry = retention.run(sessions, spool, rules, STORAGE, dry_run=True)
    report = retention.run(sessions, spool, rules, STORAGE)

    for r in (dry, report):
        assert r.emergency and r.still_short
        assert [d["series_uid"] for d in r.deleted] == [done_uid]
        assert r.deleted[0]["reason"].startswith("emergency")
    assert not any((spool.root / p).exists() for p in done_paths)
    for name, (series_id, paths) in keep.items():
        assert all((spool.root / p).exists() for p in paths), name
        if series_id:
            assert instance_count(sessions, series_id) == 3, name


def test_emergency_stops_once_there_is_room_again_oldest_first(tmp_path: Path, sessions) -> None:
    spool = QuotaSpool(tmp_path / "spool", quota=0)
    uids = []
    for days in (5, 3, 1):  # done, none due yet
        uid, _ = receive(sessions, spool, slices=4)
        add_job(sessions, spool, complete(sessions, uid, days + 1), JobState.DONE, days)
        uids.append(uid)
    used = -spool.free_bytes()
    per_series = used // 3
    # Free space half a series short of the 1 MiB threshold: deleting the oldest series
    # is enough, so the younger two stay.
    spool.quota = used + 2**20 - per_series // 2
    rules = RetentionSettings(done_days=7, failed_days=30, emergency_free_mb=1)

    report = retention.run(sessions, spool, rules, STORAGE)

    assert [d["series_uid"] for d in report.deleted] == [uids[0]]  # the oldest only
    assert not report.still_short and spool.free_bytes() >= 2**20


def test_a_series_that_changed_since_it_was_listed_is_kept(sessions, spool: Spool) -> None:
    uid, paths = receive(sessions, spool)
    series_id = complete(sessions, uid, days_ago=9)
    job_id = add_job(sessions, spool, series_id, JobState.FAILED, days_ago=8)
    rules = RetentionSettings(done_days=7, failed_days=7)
    with sessions() as s:
        [candidate] = retention.candidates(s, rules)
    jobs.retry(sessions, job_id, who="admin test")  # the admin was quicker

    assert retention.delete_series(sessions, spool, candidate, "scheduled", "test") is None
    assert all((spool.root / p).exists() for p in paths)

    # A late image re-opens a listed series: it is kept too.
    uid2, paths2 = receive(sessions, spool)
    complete(sessions, uid2, days_ago=9)
    with sessions() as s:
        candidate = next(c for c in retention.candidates(s, rules) if c.series_uid == uid2)
    with transaction(sessions) as s:
        s.execute(
            update(Series).where(Series.series_uid == uid2).values(state=SeriesState.RECEIVING)
        )
    assert retention.delete_series(sessions, spool, candidate, "scheduled", "test") is None
    assert all((spool.root / p).exists() for p in paths2)


def test_a_purged_series_cannot_be_retried(sessions, spool: Spool) -> None:
    uid, _ = receive(sessions, spool)
    job_id = add_job(sessions, spool, complete(sessions, uid, 40), JobState.FAILED, days_ago=31)
    assert retention.run(sessions, spool, RULES, STORAGE).deleted
    with pytest.raises(JobStateError, match="deleted by retention"):
        jobs.retry(sessions, job_id)


def _config(tmp_path: Path, db_url: str, spool: Spool) -> str:
    path = tmp_path / "node.toml"
    path.write_text(
        f'[database]\nurl = "{db_url}"\n[storage]\npath = "{spool.root}"\nmin_free_mb = 0\n'
        "[retention]\ndone_days = 7\nfailed_days = 30\nemergency = false\n"
    )
    return str(path)


def test_purge_command_dry_run_then_for_real(
    tmp_path: Path, db_url: str, sessions, spool: Spool, capsys: pytest.CaptureFixture[str]
) -> None:
    uid, paths = receive(sessions, spool)
    add_job(sessions, spool, complete(sessions, uid, 9), JobState.DONE, days_ago=8)
    config = _config(tmp_path, db_url, spool)

    code, out, _ = run(capsys, "--config", config, "purge", "--dry-run")
    assert code == 0
    assert uid in out and "would delete 1 series" in out and "emergency cleanup off" in out
    assert "PHI-RET-1" not in out
    assert all((spool.root / p).exists() for p in paths)

    code, out, _ = run(capsys, "--config", config, "purge", "--json")
    data = json.loads(out)
    assert code == 0 and not data["dry_run"] and not data["emergency"]
    assert [d["series_uid"] for d in data["series"]] == [uid]
    assert data["freed_bytes"] == data["series"][0]["size_bytes"] > 0
    assert not any((spool.root / p).exists() for p in paths)

    code, out, _ = run(capsys, "--config", config, "purge")
    assert code == 0 and out.strip().startswith("deleted 0 series")
    with sessions() as s:
        actors = s.scalars(
            select(AuditEvent.actor).where(AuditEvent.event == "instances-deleted")
        ).all()
    assert len(actors) == 1 and actors[0].startswith("admin ")


def test_purge_on_an_unmigrated_database_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "node.toml"
    config.write_text(f'[database]\nurl = "sqlite:///{tmp_path / "empty.db"}"\n')
    code, _, err = run(capsys, "--config", str(config), "purge", "--dry-run")
    assert code != 0 and "db upgrade" in one_line_error(err)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("emergency_free_mb = 512", "must be above storage.min_free_mb"),
        ("failed_days = 1", "failed series are kept at least as long"),
        ("done_days = 0", "retention.done_days"),
        ("keep_days = 3", "retention.keep_days"),
    ],
)
def test_bad_retention_settings_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], section: str, message: str
) -> None:
    config = tmp_path / "node.toml"
    config.write_text(f"[storage]\nmin_free_mb = 1024\n[retention]\n{section}\n")
    code, _, err = run(capsys, "--config", str(config), "purge", "--dry-run")
    assert code == 2 and message in one_line_error(err)


def test_sending_delivery_keeps_series_even_when_its_other_jobs_are_old(sessions, spool) -> None:
    # A done job 100 days ago does not make a series deletable while another is sending.
    uid, _ = receive(sessions, spool)
    series_id = complete(sessions, uid, 101)
    add_job(sessions, spool, series_id, JobState.DONE, days_ago=100, model="a")
    job_id = add_job(sessions, spool, series_id, JobState.SENDING, model="b")
    with sessions() as s:
        assert s.get(Delivery, s.scalar(select(Delivery.id).where(Delivery.job_id == job_id)))
        assert retention.candidates(s, RULES) == []
        assert (
            s.scalar(select(Delivery.state).where(Delivery.job_id == job_id))
            == DeliveryState.PENDING
        )


def test_deletions_are_counted_in_the_metrics(tmp_path: Path, sessions, spool: Spool) -> None:
    pytest.importorskip("prometheus_client")
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from dicomnode.config import MetricsSettings
    from dicomnode.metrics_server import MetricsServer
    from tests.conftest import free_port

    uid, _ = receive(sessions, spool)
    add_job(sessions, spool, complete(sessions, uid, 9), JobState.DONE, days_ago=8)
    server = MetricsServer(MetricsSettings(enabled=True, port=free_port()), sessions, spool)
    server.start()
    try:
        freed = retention.run(sessions, spool, RULES, STORAGE).freed_bytes
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10) as r:
            body = r.read().decode()
    finally:
        server.stop()
    got = {
        (s.name, s.labels.get("reason")): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }
    assert got[("dicomnode_retention_deleted_series_total", "scheduled")] == 1
    assert got[("dicomnode_retention_deleted_bytes_total", "scheduled")] == freed > 0
    assert got[("dicomnode_retention_deleted_series_total", "emergency")] == 0


def test_the_disk_watch_starts_the_emergency_cleanup(tmp_path: Path, sessions) -> None:
    from dicomnode.config import parse_settings
    from dicomnode.queue.scheduler import _DiskWatch

    spool = QuotaSpool(tmp_path / "spool", quota=0)
    uid, paths = receive(sessions, spool)
    add_job(sessions, spool, complete(sessions, uid, 2), JobState.DONE, days_ago=1)
    settings = parse_settings(
        {"storage": {"min_free_mb": 0}, "retention": {"emergency_free_mb": 1}}, environ={}
    )
    spool.quota = -spool.free_bytes() + 2**20 + 1  # 1 byte above the threshold: no cleanup
    _DiskWatch(settings, sessions, spool)()
    assert all((spool.root / p).exists() for p in paths)
    spool.quota -= 2  # now below it
    _DiskWatch(settings, sessions, spool)()
    assert not any((spool.root / p).exists() for p in paths)


def test_a_series_sent_again_after_its_purge_starts_afresh(sessions, spool: Spool) -> None:
    datasets = ct_series(np.zeros((3, 16, 16)))
    ingestor = Ingestor(spool, sessions)
    for ds in datasets:
        ingestor.store(encode(ds))
    uid = str(datasets[0].SeriesInstanceUID)
    series_id = complete(sessions, uid, days_ago=9)
    add_job(sessions, spool, series_id, JobState.DONE, days_ago=8)
    assert retention.run(sessions, spool, RULES, STORAGE).deleted
    with sessions() as s:
        purged = s.get(Series, series_id)
        assert purged.instance_count == 3 and purged.generation == 0  # as received

    ingestor.store(encode(datasets[1]))  # the PACS pushes (part of) it again

    with sessions() as s:
        again = s.get(Series, series_id)
        assert again.purged_at is None and again.state == SeriesState.RECEIVING
        assert again.generation == 1 and again.instance_count == 1
    assert instance_count(sessions, series_id) == 1
    complete(sessions, uid, days_ago=9)
    with sessions() as s:  # listed again: its new copy is deleted in its turn
        assert [c.series_uid for c in retention.candidates(s, RULES)] == [uid]


def test_results_awaiting_storage_commitment_are_kept(tmp_path: Path, sessions) -> None:
    spool = QuotaSpool(tmp_path / "spool", quota=0)
    uid, paths = receive(sessions, spool)
    job_id = add_job(sessions, spool, complete(sessions, uid, 40), JobState.DONE, days_ago=31)
    with transaction(sessions) as s:
        s.execute(
            update(Delivery)
            .where(Delivery.job_id == job_id)
            .values(commitment_uid="1.2.3.999", commitment_requested_at=utcnow())
        )
    spool.quota = -spool.free_bytes() + 10**6
    rules = RetentionSettings(done_days=7, failed_days=30, emergency_free_mb=10**6)
    report = retention.run(sessions, spool, rules, STORAGE)
    assert report.deleted == [] and report.still_short
    assert all((spool.root / p).exists() for p in paths)
    with transaction(sessions) as s:  # the PACS confirmed: now it may go
        s.execute(update(Delivery).where(Delivery.job_id == job_id).values(confirmed_at=utcnow()))
    assert [d["series_uid"] for d in retention.run(sessions, spool, RULES, STORAGE).deleted] == [
        uid
    ]


def test_a_scheduled_deletion_checks_the_due_date_again(sessions, spool: Spool) -> None:
    uid, paths = receive(sessions, spool)
    job_id = add_job(sessions, spool, complete(sessions, uid, 40), JobState.FAILED, days_ago=31)
    with sessions() as s:
        [candidate] = retention.candidates(s, RULES)
    # Meanwhile an admin retried it and it ended done just now: done_days count from now.
    with transaction(sessions) as s:
        s.execute(
            update(Job).where(Job.id == job_id).values(state=JobState.DONE, finished_at=utcnow())
        )
    assert retention.delete_series(sessions, spool, candidate, "scheduled", "t", RULES) is None
    assert all((spool.root / p).exists() for p in paths)


def test_the_disk_watch_does_not_loop_when_nothing_may_go(
    tmp_path: Path, sessions, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dicomnode.config import parse_settings
    from dicomnode.queue import scheduler

    spool = QuotaSpool(tmp_path / "spool", quota=0)
    _, paths = receive(sessions, spool)  # still receiving: never deleted
    settings = parse_settings(
        {"storage": {"min_free_mb": 0}, "retention": {"emergency_free_mb": 1}}, environ={}
    )
    spool.quota = -spool.free_bytes() + 2**19  # half a MiB free: short
    runs: list[bool] = []
    real = scheduler._retention

    def counted(*args):
        report = real(*args)
        runs.append(report.still_short)
        return report

    monkeypatch.setattr(scheduler, "_retention", counted)
    watch = scheduler._DiskWatch(settings, sessions, spool)
    watch()
    watch()  # the same situation 15 s later: not searched again
    assert runs == [True]
    spool.quota -= 1000  # but the disk filled further: look again
    watch()
    assert runs == [True, True]
    assert all((spool.root / p).exists() for p in paths)
