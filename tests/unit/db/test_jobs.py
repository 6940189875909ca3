from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select, update

from dicomnode.db import jobs
from dicomnode.db.engine import transaction
from dicomnode.db.models import Job, JobState, Series, Study, utcnow


@pytest.fixture
def series_id(sessions) -> int:
    with transaction(sessions) as s:
        study = Study(study_uid="1.2.3")
        s.add(study)
        s.flush()
        series = Series(study_id=study.id, series_uid="1.2.3.4", modality="CT")
        s.add(series)
        s.flush()
        return series.id


def add_job(sessions, series_id: int, model: str, priority: int = 0, max_attempts: int = 3) -> int:
    with transaction(sessions) as s:
        series = s.get(Series, series_id)
        job = jobs.enqueue(
            s,
            series,
            route="r",
            model=model,
            version="1",
            max_attempts=max_attempts,
            priority=priority,
        )
        assert job is not None
        return job.id


def state(sessions, job_id: int) -> Job:
    with sessions() as s:
        return s.get(Job, job_id)


def test_enqueue_is_idempotent(sessions, series_id: int) -> None:
    add_job(sessions, series_id, "m")
    with transaction(sessions) as s:
        again = jobs.enqueue(
            s, s.get(Series, series_id), route="r", model="m", version="1", max_attempts=3
        )
        assert again is None
        assert len(s.scalars(select(Job)).all()) == 1


def test_claim_takes_urgent_first_then_oldest(sessions, series_id: int) -> None:
    a = add_job(sessions, series_id, "a")
    b = add_job(sessions, series_id, "b", priority=10)
    c = add_job(sessions, series_id, "c")
    order = [jobs.claim(sessions, "w1", 60) for _ in range(3)]
    assert [x.job_id for x in order if x] == [b, a, c]
    assert jobs.claim(sessions, "w1", 60) is None
    job = state(sessions, b)
    assert job.state == JobState.RUNNING and job.lease_owner == "w1" and job.attempts == 1
    assert job.lease_expires_at > utcnow() + timedelta(seconds=50)


def test_a_long_waiting_normal_job_is_not_starved(sessions, series_id: int) -> None:
    old = add_job(sessions, series_id, "old")
    with transaction(sessions) as s:
        s.get(Job, old).created_at = utcnow() - timedelta(seconds=700)
    urgent = [add_job(sessions, series_id, f"u{i}", priority=jobs.URGENT) for i in range(3)]
    fresh = add_job(sessions, series_id, "fresh")
    order = [jobs.claim(sessions, "w1", 60, starvation_seconds=600) for _ in range(5)]
    # The starved job counts as urgent and, being the oldest, goes first; the fresh
    # normal job waits for the urgent ones.
    assert [x.job_id for x in order if x] == [old, *urgent, fresh]


def test_finish_only_by_the_lease_owner(sessions, series_id: int) -> None:
    job_id = add_job(sessions, series_id, "m")
    claim = jobs.claim(sessions, "w1", 60)
    assert claim is not None
    impostor = jobs.Claim(job_id=job_id, owner="w2", attempt=1)
    assert not jobs.finish(sessions, impostor)
    assert not jobs.heartbeat(sessions, impostor, 60)
    assert jobs.heartbeat(sessions, claim, 60)
    assert jobs.finish(sessions, claim)
    job = state(sessions, job_id)
    assert job.state == JobState.DONE and job.lease_owner is None and job.finished_at


def test_transient_failure_retries_with_backoff_then_fails(sessions, series_id: int) -> None:
    job_id = add_job(sessions, series_id, "m", max_attempts=2)
    claim = jobs.claim(sessions, "w1", 60)
    assert jobs.fail(sessions, claim, "PACS down", retryable=True, base_seconds=100) == "queued"
    job = state(sessions, job_id)
    assert job.last_error == "PACS down"
    assert job.run_after > utcnow() + timedelta(seconds=40)  # at least half the first step
    assert jobs.claim(sessions, "w1", 60) is None  # not before its time
    with transaction(sessions) as s:
        s.execute(update(Job).values(run_after=utcnow()))
    claim = jobs.claim(sessions, "w1", 60)
    assert claim is not None and claim.attempt == 2
    assert jobs.fail(sessions, claim, "PACS down", retryable=True, base_seconds=1) == "failed"
    assert state(sessions, job_id).state == JobState.FAILED


def test_permanent_failure_fails_at_once(sessions, series_id: int) -> None:
    job_id = add_job(sessions, series_id, "m", max_attempts=5)
    claim = jobs.claim(sessions, "w1", 60)
    assert jobs.fail(sessions, claim, "unreadable", retryable=False, base_seconds=1) == "failed"
    job = state(sessions, job_id)
    assert job.state == JobState.FAILED and job.attempts == 1 and job.last_error == "unreadable"


def test_release_returns_the_job_without_counting_the_attempt(sessions, series_id: int) -> None:
    job_id = add_job(sessions, series_id, "m")
    claim = jobs.claim(sessions, "w1", 60)
    jobs.release(sessions, claim)
    job = state(sessions, job_id)
    assert job.state == JobState.QUEUED and job.attempts == 0 and job.lease_owner is None


def test_reaper_requeues_expired_leases(sessions, series_id: int) -> None:
    job_id = add_job(sessions, series_id, "m")
    claim = jobs.claim(sessions, "dead-worker", 60)
    assert jobs.reap_expired(sessions) == 0
    with transaction(sessions) as s:
        s.execute(update(Job).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    assert jobs.reap_expired(sessions) == 1
    job = state(sessions, job_id)
    assert job.state == JobState.QUEUED and "dead-worker" in job.last_error
    # The dead worker can no longer finish it; a new claim can.
    assert not jobs.finish(sessions, claim)
    again = jobs.claim(sessions, "w2", 60)
    assert again is not None and again.attempt == 2


def test_retry_delay_grows_and_is_capped() -> None:
    for attempt in range(1, 8):
        step = min(3600, 10 * 2 ** (attempt - 1))
        delay = jobs.retry_delay(attempt, 10)
        assert step / 2 <= delay <= step
    assert jobs.retry_delay(50, 10) <= 3600
