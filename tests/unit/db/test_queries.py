"""The reads behind the CLI, on SQLite and PostgreSQL: frozen views of plain values.

``db.queries`` (jobs), ``db.studies`` (studies) and ``db.health`` (status and
destinations) return what the CLI prints; these tests check what each returns, and
that no ORM row or session comes out with it.
"""

from __future__ import annotations

import dataclasses
import time
from datetime import datetime, timedelta

import pytest
from sqlalchemy import update

from dicomnode.db import (
    Delivery,
    DeliveryState,
    Instance,
    Job,
    Output,
    Series,
    SeriesState,
    audit,
    health,
    make_engine,
    migrate,
    queries,
    read,
    studies,
    transaction,
    utcnow,
)
from dicomnode.db import commitment as commitment_db
from dicomnode.db import jobs as queue
from dicomnode.errors import DatabaseNotFound, DicomnodeError
from tests.factories import add_series

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
RETRY = queue.DeliveryRetry(give_up_seconds=3600, max_delay_seconds=60)


def _plain(value: object) -> None:
    """Fail if ``value`` holds anything but plain values and frozen views."""
    if dataclasses.is_dataclass(value):
        assert type(value).__dataclass_params__.frozen, type(value)  # type: ignore[attr-defined]
        for field in dataclasses.fields(value):
            _plain(getattr(value, field.name))
    elif isinstance(value, tuple | list):
        for item in value:
            _plain(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            assert isinstance(key, str)
            _plain(item)
    else:
        assert value is None or isinstance(value, str | int | float | bool | datetime), value


def _series(sessions, study_uid: str, series_uid: str, accession: str = "ACC-1") -> int:
    with transaction(sessions) as s:
        return add_series(
            s, study_uid, series_uid, patient_id="PID-SECRET-1", accession_number=accession
        ).id


def _enqueue(sessions, series_id: int, route: str = "chest", model: str = "lung") -> int:
    with transaction(sessions) as s:
        job = queue.enqueue(
            s, s.get(Series, series_id), route=route, model=model, version="1", max_attempts=3
        )
        assert job is not None
        return job.id


def _output(session, job_id: int, sop: str, kind: str = "seg") -> None:
    session.add(Output(job_id=job_id, kind=kind, sop_class_uid=SEG, sop_instance_uid=sop,
                       series_uid=sop + ".1", path=f"out/{sop}.dcm", size_bytes=100,
                       created_at=utcnow()))  # fmt: skip


def _instance(session, series_id: int, sop: str, calling_ae: str | None, size: int) -> None:
    session.add(Instance(series_id=series_id, sop_instance_uid=sop, sop_class_uid="1.2",
                         transfer_syntax_uid="1.2.840.10008.1.2.1", path=f"in/{sop}.dcm",
                         size_bytes=size, sha256="0" * 64, calling_ae=calling_ae))  # fmt: skip


@pytest.fixture
def done_job(sessions) -> int:
    """A done job: two outputs, a confirmed, a requested and a failed commitment."""
    series_id = _series(sessions, "1.2.840.99.1", "1.2.840.99.1.1")
    job_id = _enqueue(sessions, series_id)
    claim = queue.claim(sessions, "worker-1", 60)
    assert claim is not None and claim.job_id == job_id
    with transaction(sessions) as s:
        _output(s, job_id, "1.2.9.1")
        _output(s, job_id, "1.2.9.2", kind="sr")
        now = utcnow()
        sent = {"job_id": job_id, "state": DeliveryState.SENT, "sent_at": now}
        s.add(Delivery(destination="pacs", attempts=1, confirmed_at=now, **sent))
        requested = Delivery(destination="archive", attempts=2, warning="with warning", **sent)
        s.add(requested)
        s.add(Delivery(destination="backup", attempts=1, commitment_failed="1 failed", **sent))
        s.flush()
        commitment_db.request(s, requested, "1.2.826.0.1.3680043.8.498.5")
        job = s.get(Job, job_id)
        job.timings = {"load_s": 1.5, "inference_s": 2.0}
        job.summary = {"segments": [{"label": "Lung", "volume_ml": 12.5, "mean": None}]}
    assert queue.finish(sessions, claim)
    return job_id


def test_find_jobs_returns_views_newest_first_and_filters(sessions) -> None:
    a = _series(sessions, "1.2.840.99.1", "1.2.840.99.1.1", "ACC-A")
    b = _series(sessions, "1.2.840.99.2", "1.2.840.99.2.1", "ACC-B")
    lung = _enqueue(sessions, a)
    nodule = _enqueue(sessions, a, model="nodule")
    head = _enqueue(sessions, b, route="head")
    claim = queue.claim(sessions, "w1", 60)
    assert claim is not None and claim.job_id == lung
    queue.fail(sessions, claim, "model crashed", retryable=False, base_seconds=1)
    with transaction(sessions) as s:
        old = utcnow() - timedelta(days=10)
        s.execute(update(Job).where(Job.id == lung).values(created_at=old))

    with sessions() as s:
        found = queries.find_jobs(s, limit=50)
        [failed] = queries.find_jobs(s, limit=50, state="failed")
        by_route = queries.find_jobs(s, limit=50, route="head")
        by_model = queries.find_jobs(s, limit=50, model="nodule")
        recent = queries.find_jobs(s, limit=50, since=utcnow() - timedelta(days=1))
        of_study = queries.find_jobs(s, limit=50, study_uid="1.2.840.99.1")
        of_accession = queries.find_jobs(s, limit=50, accession="ACC-B")
        one = queries.find_jobs(s, limit=1)
        with_phi = queries.find_jobs(s, limit=1, show_phi=True)
    _plain(found)
    assert [j.id for j in found] == [head, nodule, lung]
    assert failed == dataclasses.replace(
        failed, id=lung, state="failed", route="chest", model="lung", model_version="1",
        series_uid="1.2.840.99.1.1", study_uid="1.2.840.99.1", attempts=1, max_attempts=3,
        last_error="model crashed", patient_id=None, accession_number=None,
    )  # fmt: skip
    assert failed.finished_at is not None and failed.started_at is not None
    assert [j.id for j in by_route] == [head] and [j.id for j in by_model] == [nodule]
    assert [j.id for j in recent] == [head, nodule]
    assert [j.id for j in of_study] == [nodule, lung] and [j.id for j in of_accession] == [head]
    assert [j.id for j in one] == [head]
    # Patient data only when asked for.
    assert all(j.patient_id is None and j.accession_number is None for j in found)
    assert (with_phi[0].patient_id, with_phi[0].accession_number) == ("PID-SECRET-1", "ACC-B")
    with pytest.raises(dataclasses.FrozenInstanceError):
        found[0].state = "done"  # type: ignore[misc]


def test_job_detail_holds_outputs_deliveries_and_history(sessions, done_job: int) -> None:
    with sessions() as s:
        detail = queries.job_detail(s, done_job)
    _plain(detail)
    assert detail.job.id == done_job and detail.job.state == "done"
    assert [(o.kind, o.sop_instance_uid, o.path, o.size_bytes) for o in detail.outputs] == [
        ("seg", "1.2.9.1", "out/1.2.9.1.dcm", 100),
        ("sr", "1.2.9.2", "out/1.2.9.2.dcm", 100),
    ]
    by_name = {d.destination: d for d in detail.deliveries}
    assert [d.destination for d in detail.deliveries] == ["pacs", "archive", "backup"]
    assert by_name["pacs"].commitment == "confirmed"
    assert by_name["archive"].commitment == "requested"
    assert by_name["archive"].commitment_uid == "1.2.826.0.1.3680043.8.498.5"
    assert by_name["archive"].commitment_requested_at is not None
    assert by_name["archive"].warning == "with warning"
    assert by_name["backup"].commitment == "failed"
    assert all(d.state == "sent" for d in detail.deliveries)
    assert [(e.from_state, e.to_state, e.attempt, e.counted) for e in detail.history] == [
        (None, "queued", 0, True),
        ("queued", "running", 1, True),
        ("running", "done", 1, True),
    ]
    assert detail.history[1].worker == "worker-1"
    assert detail.timings == {"load_s": 1.5, "inference_s": 2.0}
    assert detail.summary["segments"][0]["label"] == "Lung"
    assert detail.claimed_by == "worker-1" and detail.lease_owner is None
    # The run began with the only claim; nothing was re-sent.
    assert detail.run_started_at == detail.history[1].at and detail.resent_at is None
    assert detail.job.patient_id is None


def test_job_detail_of_a_resent_job(sessions) -> None:
    """A re-send's claim is not the run's start, and its given-back attempt is not counted."""
    series_id = _series(sessions, "1.2.3", "1.2.3.4")
    job_id = _enqueue(sessions, series_id)
    claim = queue.claim(sessions, "worker-1", 60)
    assert claim is not None
    with transaction(sessions) as s:
        _output(s, job_id, "1.2.9.1")
        s.add(Delivery(job_id=job_id, destination="pacs", attempts=1, last_error="down"))
    queue.fail(sessions, claim, "down", retryable=True, base_seconds=1, delivery=RETRY)
    time.sleep(0.02)  # the output is older than the next claim: it only re-sends
    with transaction(sessions) as s:
        s.execute(update(Job).where(Job.id == job_id).values(run_after=utcnow()))
    claim = queue.claim(sessions, "worker-2", 60)
    assert claim is not None
    queue.fail(sessions, claim, "down", retryable=True, base_seconds=0.01, delivery=RETRY)
    with sessions() as s:
        detail = queries.job_detail(s, job_id, show_phi=True)
    claims = [e.at for e in detail.history if e.to_state == "running"]
    assert len(claims) == 2
    assert (detail.run_started_at, detail.resent_at) == (claims[0], claims[1])
    assert detail.job.started_at == claims[1]  # the row's own: the latest claim
    given_back = [(e.to_state, e.attempt) for e in detail.history if not e.counted]
    assert given_back == [("running", 2), ("queued", 2)]
    assert detail.job.attempts == 1
    assert detail.job.patient_id == "PID-SECRET-1"


def test_job_detail_of_an_unknown_job(sessions) -> None:
    with sessions() as s, pytest.raises(LookupError, match="no job with id 4711"):
        queries.job_detail(s, 4711)


def test_preview_source(sessions, done_job: int) -> None:
    with transaction(sessions) as s:
        series_id = s.get(Job, done_job).series_id
        _instance(s, series_id, "1.2.7.1", "CT01", 10)
        _instance(s, series_id, "1.2.7.2", "CT01", 10)
        _output(s, done_job, "1.2.9.3")  # a newer SEG: the one previewed
    other = _enqueue(sessions, series_id, model="nodule")
    with sessions() as s:
        source = queries.preview_source(s, done_job)
        without = queries.preview_source(s, other)
    _plain(source)
    assert source.detail.job.id == done_job
    assert source.seg_path == "out/1.2.9.3.dcm"
    assert sorted(source.instance_paths) == ["in/1.2.7.1.dcm", "in/1.2.7.2.dcm"]
    assert without.seg_path is None and without.detail.job.state == "queued"
    with sessions() as s, pytest.raises(LookupError):
        queries.preview_source(s, 4711)


@pytest.fixture
def three_studies(sessions, done_job: int) -> dict[str, int]:
    """A: complete, with the done job; B: receiving; C: purged, sharing B's accession."""
    b = _series(sessions, "1.2.840.99.2", "1.2.840.99.2.1", "ACC-DUP")
    c = _series(sessions, "1.2.840.99.3", "1.2.840.99.3.1", "ACC-DUP")
    with transaction(sessions) as s:
        a = s.get(Job, done_job).series_id
        _instance(s, a, "1.2.7.1", "CT01", 1000)
        _instance(s, a, "1.2.7.2", "CT02", 24)
        s.execute(
            update(Series)
            .where(Series.id == a)
            .values(state=SeriesState.COMPLETE, instance_count=3, completed_at=utcnow())
        )
        s.execute(
            update(Series)
            .where(Series.id == c)
            .values(state=SeriesState.COMPLETE, purged_at=utcnow(), instance_count=2)
        )
        # Retention deleted C's instance rows: only the trail still names its sender.
        audit.record(s, "instances-received", actor="CT03", study_uid="1.2.840.99.3",
                     series_uid="1.2.840.99.3.1", count=2)  # fmt: skip
    failed = _enqueue(sessions, b)
    claim = queue.claim(sessions, "w1", 60)
    assert claim is not None and claim.job_id == failed
    queue.fail(sessions, claim, "model crashed", retryable=False, base_seconds=1)
    return {"a": a, "b": b, "c": c, "done": done_job, "failed": failed}


def test_study_summaries(sessions, three_studies: dict[str, int]) -> None:
    with sessions() as s:
        found = studies.study_summaries(s)
        with_phi = studies.study_summaries(s, show_phi=True, accession="ACC-DUP")
        purged = studies.study_summaries(s, state="purged")
        limited = studies.study_summaries(s, limit=1)
    _plain(found)
    by_uid = {r.study_uid: r for r in found}
    assert set(by_uid) == {"1.2.840.99.1", "1.2.840.99.2", "1.2.840.99.3"}
    a, b, c = by_uid["1.2.840.99.1"], by_uid["1.2.840.99.2"], by_uid["1.2.840.99.3"]
    assert (a.state, a.series, a.instances) == ("complete", 1, 3)
    assert (b.state, c.state) == ("receiving", "purged")
    assert a.jobs == (("done", 1),) and b.jobs == (("failed", 1),) and c.jobs == ()
    assert a.deliveries == (("sent", 3), ("pending", 0), ("failed", 0))
    assert c.deliveries == (("sent", 0), ("pending", 0), ("failed", 0))
    assert all(r.patient_id is None and r.accession_number is None for r in found)
    assert {r.study_uid for r in with_phi} == {"1.2.840.99.2", "1.2.840.99.3"}
    assert all(r.accession_number == "ACC-DUP" for r in with_phi)
    assert all(r.patient_id == "PID-SECRET-1" for r in with_phi)
    assert [r.study_uid for r in purged] == ["1.2.840.99.3"]
    assert len(limited) == 1


def test_find_study_tells_one_study_s_story(sessions, three_studies: dict[str, int]) -> None:
    with sessions() as s:
        found = studies.find_study(s, study_uid="1.2.840.99.1")
        purged = studies.find_study(s, study_uid="1.2.840.99.3", show_phi=True)
    _plain(found)
    story = found.story
    assert story is not None and found.matches == ()
    assert (story.study_uid, story.state) == ("1.2.840.99.1", "complete")
    assert story.patient_id is None and story.accession_number is None
    [series] = story.series
    assert (series.series_uid, series.state, series.modality) == ("1.2.840.99.1.1",
                                                                   "complete", "CT")  # fmt: skip
    assert (series.instances, series.stored_instances, series.stored_bytes) == (3, 2, 1024)
    assert series.calling_aes == ("CT01", "CT02")
    assert story.first_received_at == series.first_received_at
    assert story.last_received_at == series.last_received_at
    [job] = story.jobs
    assert job.job.id == three_studies["done"] and len(job.outputs) == 2
    assert len(job.deliveries) == 3 and len(job.history) == 3
    # The queue wrote the job's start and end into the trail.
    done = three_studies["done"]
    assert [(e.event, e.job_id) for e in story.timeline] == [
        ("job-queued", done),
        ("job-ended", done),
    ]
    assert story.timeline[1].outcome == "done"
    assert isinstance(story.timeline[0], audit.Entry)

    c = purged.story
    assert c is not None and c.state == "purged"
    assert (c.patient_id, c.accession_number) == ("PID-SECRET-1", "ACC-DUP")
    [series] = c.series
    assert (series.stored_instances, series.stored_bytes) == (0, 0)
    assert series.calling_aes == ("CT03",)  # from the audit trail
    assert c.jobs == () and [e.event for e in c.timeline] == ["instances-received"]


def test_find_study_by_accession_number(sessions, three_studies: dict[str, int]) -> None:
    with sessions() as s:
        one = studies.find_study(s, accession="ACC-1")
        several = studies.find_study(s, accession="ACC-DUP")
        none = studies.find_study(s, accession="NOPE")
        unknown = studies.find_study(s, study_uid="9.9.9")
    assert one.story is not None and one.story.study_uid == "1.2.840.99.1"
    assert several.story is None
    assert sorted(m.study_uid for m in several.matches) == ["1.2.840.99.2", "1.2.840.99.3"]
    assert all(m.accession_number is None for m in several.matches)
    assert none == studies.StudyLookup(None, ()) == unknown


def test_audit_entries_are_the_export_fields() -> None:
    assert tuple(f.name for f in dataclasses.fields(audit.Entry)) == audit.FIELDS


def test_health_snapshot(sessions, three_studies: dict[str, int]) -> None:
    series_id = three_studies["a"]
    queued = _enqueue(sessions, series_id, model="other")
    running = _enqueue(sessions, series_id, model="third")
    with transaction(sessions) as s:
        # Not runnable yet: the claim below takes the other one.
        later = utcnow() + timedelta(hours=1)
        s.execute(update(Job).where(Job.id == queued).values(run_after=later))
    claim = queue.claim(sessions, "worker-9", 60)
    assert claim is not None and claim.job_id == running
    with transaction(sessions) as s:
        failed = DeliveryState.FAILED
        s.add(
            Delivery(
                job_id=three_studies["failed"], destination="pacs", state=failed, attempts=3,
                last_error="refused\nmore",
            )
        )  # fmt: skip
    with sessions() as s:
        snap = health.snapshot(s)
    _plain(snap)
    queue_depth = dict(snap.queue)
    assert list(queue_depth) == ["queued", "running", "sending", "done", "failed", "cancelled"]
    assert (queue_depth["queued"], queue_depth["running"]) == (1, 1)
    assert (queue_depth["done"], queue_depth["failed"]) == (1, 1)
    assert snap.busy == ("worker-9",)
    assert snap.oldest_queued is not None and snap.oldest_queued.job_id == queued
    assert snap.oldest_queued.age_s >= 0
    assert snap.deliveries == (("pending", 0), ("failed", 1))
    assert snap.deliveries_failed_last_day == 1 and snap.failed_last_hour == 1
    assert snap.stalled == 0
    [failing] = snap.failing_destinations
    assert (failing.destination, failing.deliveries, failing.error) == ("pacs", 1, "refused")
    assert failing.since == failing.last_failed_at
    [error] = snap.last_errors
    assert (error.job_id, error.model, error.outcome, error.error) == (
        three_studies["failed"], "lung", "failed", "model crashed",
    )  # fmt: skip


def test_delivery_statistics(sessions, done_job: int) -> None:
    series_id = _series(sessions, "1.2.840.99.5", "1.2.840.99.5.1")
    other = _enqueue(sessions, series_id)
    with transaction(sessions) as s:
        s.add(Delivery(job_id=other, destination="pacs", state=DeliveryState.FAILED,
                       attempts=2, last_error="cannot connect\nsecond line"))  # fmt: skip
    with sessions() as s:
        stats = health.delivery_statistics(s)
    _plain(stats)
    assert set(stats) == {"pacs", "archive", "backup"}
    pacs = stats["pacs"]
    assert (pacs.sent, pacs.pending, pacs.failed) == (1, 0, 1)
    assert pacs.last_sent_at is not None and pacs.last_error == "cannot connect"
    assert stats["archive"] == dataclasses.replace(
        stats["archive"], sent=1, pending=0, failed=0, last_error=None
    )
    assert health.DeliveryCounts() == health.DeliveryCounts(0, 0, 0, None, None)


def test_read_runs_one_query_in_a_session_of_its_own(engine, done_job: int) -> None:
    detail = read(engine, queries.job_detail, done_job, show_phi=True)
    assert detail.job.id == done_job and detail.job.patient_id == "PID-SECRET-1"
    with pytest.raises(LookupError):
        read(engine, queries.job_detail, 4711)


def test_delivery_statistics_at_opens_only_an_existing_current_database(
    db_url: str, done_job: int, tmp_path
) -> None:
    stats = health.delivery_statistics_at(db_url, 5)
    assert set(stats) == {"pacs", "archive", "backup"} and stats["pacs"].sent == 1
    missing = tmp_path / "missing" / "node.db"
    with pytest.raises(DatabaseNotFound, match="database not found"):
        health.delivery_statistics_at(f"sqlite:///{missing}", 5)
    assert not missing.parent.exists()  # looking did not create it


@pytest.mark.system
def test_delivery_statistics_at_refuses_an_old_schema(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    old = make_engine(url)
    migrate.upgrade(old, "0004")
    old.dispose()
    with pytest.raises(DicomnodeError, match="run `dicomnode db upgrade`"):
        health.delivery_statistics_at(url, 5)


def test_preview_source_takes_the_newest_seg_not_the_newest_output(sessions, done_job) -> None:
    with transaction(sessions) as s:
        _output(s, done_job, "1.2.9.3")
        _output(s, done_job, "1.2.9.4", kind="sr")  # newer, but not a SEG
    with sessions() as s:
        source = queries.preview_source(s, done_job)
    assert source.seg_path == "out/1.2.9.3.dcm"


def test_find_jobs_combines_its_filters(sessions) -> None:
    a = _series(sessions, "1.2.840.99.1", "1.2.840.99.1.1", "ACC-A")
    b = _series(sessions, "1.2.840.99.2", "1.2.840.99.2.1", "ACC-B")
    lung_a = _enqueue(sessions, a)
    _enqueue(sessions, a, model="nodule")
    _enqueue(sessions, b)
    with sessions() as s:
        both = queries.find_jobs(s, limit=50, study_uid="1.2.840.99.1", accession="ACC-A")
        clash = queries.find_jobs(s, limit=50, study_uid="1.2.840.99.1", accession="ACC-B")
        lung = queries.find_jobs(s, limit=50, accession="ACC-A", model="lung", state="queued")
        none_running = queries.find_jobs(s, limit=50, accession="ACC-A", state="running")
    assert len(both) == 2 and clash == () and [j.id for j in lung] == [lung_a]
    assert none_running == ()
    with sessions() as s, pytest.raises(ValueError, match="'sleeping'"):
        queries.find_jobs(s, limit=50, state="sleeping")


def test_read_s_session_only_reads_and_is_closed_after(engine, done_job: int) -> None:
    from dicomnode.db.engine import READ_ONLY

    seen: list = []

    def query(session) -> bool:
        seen.append(session)
        session.get(Job, done_job)
        return bool(session.get_bind().get_execution_options().get(READ_ONLY))

    assert read(engine, query) is True  # SQLite's deferred BEGIN: no write lock
    [session] = seen
    assert not session.in_transaction() and len(session.identity_map) == 0
