from __future__ import annotations

import sys
from datetime import datetime, timedelta

import pytest
from sqlalchemy import select, update

from dicomnode.db import (
    Delivery,
    Job,
    JobState,
    Output,
    Series,
    database_now,
    jobs,
    models,
    transaction,
    utcnow,
)
from dicomnode.db.models import JobEvent
from dicomnode.errors import JobStateError
from tests.conftest import wait_for
from tests.factories import add_series


@pytest.fixture
def series_id(sessions) -> int:
    with transaction(sessions) as s:
        return add_series(s).id


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
        s.execute(update(Job).values(run_after=utcnow() - timedelta(seconds=1)))
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


def last_event_at(sessions, job_id: int) -> datetime:
    with sessions() as s:
        return s.scalars(
            select(JobEvent.at).where(JobEvent.job_id == job_id).order_by(JobEvent.id.desc())
        ).first()


def test_updated_at_is_the_database_time_of_the_latest_change(sessions, series_id: int) -> None:
    # Each is compared with a time its own transaction stamped elsewhere: had the
    # model's onupdate filled it in, it would hold this process's clock instead.
    job_id = add_job(sessions, series_id, "m", max_attempts=2)
    claim = jobs.claim(sessions, "w1", 60)
    assert jobs.heartbeat(sessions, claim, 60)
    job = state(sessions, job_id)
    assert job.updated_at == job.heartbeat_at
    with transaction(sessions) as s:
        jobs.merge_timings(s, claim, {"load_s": 1.0})
        now = database_now(s)
    assert state(sessions, job_id).updated_at == now
    got = jobs.fail(sessions, claim, "hiccup", retryable=True, base_seconds=0.001)
    assert got == JobState.QUEUED
    assert state(sessions, job_id).updated_at == last_event_at(sessions, job_id)
    with transaction(sessions) as s:
        s.execute(update(Job).values(run_after=utcnow() - timedelta(seconds=1)))
    claim = jobs.claim(sessions, "w1", 60)
    assert jobs.fail(sessions, claim, "bad input", retryable=False, base_seconds=1) == "failed"
    job = state(sessions, job_id)
    assert job.updated_at == job.finished_at == last_event_at(sessions, job_id)

    other = add_job(sessions, series_id, "n")
    assert jobs.claim(sessions, "dead-worker", 60) is not None
    with transaction(sessions) as s:
        s.execute(update(Job).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    assert jobs.reap_expired(sessions) == 1
    assert state(sessions, other).updated_at == last_event_at(sessions, other)


def test_retry_delay_grows_and_is_capped() -> None:
    for attempt in range(1, 8):
        step = min(3600, 10 * 2 ** (attempt - 1))
        delay = jobs.retry_delay(attempt, 10)
        assert step / 2 <= delay <= step
    assert jobs.retry_delay(50, 10) <= 3600


def history(sessions, job_id: int) -> list[tuple[str | None, str, int, str | None]]:
    with sessions() as s:
        rows = s.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id))
        return [(e.from_state, e.to_state, e.attempt, e.worker) for e in rows]


def test_every_transition_is_recorded_with_its_worker(sessions, series_id: int) -> None:
    job_id = add_job(sessions, series_id, "m", max_attempts=3)
    first = jobs.claim(sessions, "w1", 60)
    jobs.fail(sessions, first, "PACS down", retryable=True, base_seconds=0.001)
    with transaction(sessions) as s:
        s.execute(update(Job).values(run_after=utcnow() - timedelta(seconds=1)))
    second = jobs.claim(sessions, "w2", 60)
    jobs.release(sessions, second)
    third = jobs.claim(sessions, "w3", 60)
    with transaction(sessions) as s:
        assert jobs.set_state(s, third, JobState.SENDING)
    with transaction(sessions) as s:
        s.execute(update(Job).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    assert jobs.reap_expired(sessions) == 1
    fourth = jobs.claim(sessions, "w4", 60)
    assert jobs.finish(sessions, fourth)
    assert history(sessions, job_id) == [
        (None, "queued", 0, None),
        ("queued", "running", 1, "w1"),
        ("running", "queued", 1, "w1"),
        ("queued", "running", 2, "w2"),
        ("running", "queued", 1, "w2"),  # released: the attempt is given back
        ("queued", "running", 2, "w3"),
        ("running", "sending", 2, "w3"),
        ("sending", "queued", 2, None),  # reaped
        ("queued", "running", 3, "w4"),
        ("running", "done", 3, "w4"),
    ]
    job = state(sessions, job_id)
    assert job.claimed_by == "w4" and job.lease_owner is None
    with sessions() as s:
        notes = s.scalars(select(JobEvent.note).where(JobEvent.job_id == job_id)).all()
    assert "PACS down" in notes and "lease of worker w3 expired" in notes


def test_a_lost_lease_changes_nothing_and_records_nothing(sessions, series_id: int) -> None:
    job_id = add_job(sessions, series_id, "m")
    claim = jobs.claim(sessions, "w1", 60)
    impostor = jobs.Claim(job_id=job_id, owner="w2", attempt=1, model="m")
    before = history(sessions, job_id)
    assert not jobs.release(sessions, impostor)
    assert jobs.fail(sessions, impostor, "x", retryable=False, base_seconds=1) == "running"
    with transaction(sessions) as s:
        assert not jobs.set_state(s, impostor, JobState.SENDING)
    assert history(sessions, job_id) == before
    assert jobs.finish(sessions, claim)


def test_cancelled_by_a_late_instance_is_recorded(sessions, series_id: int) -> None:
    job_id = add_job(sessions, series_id, "m")
    with transaction(sessions) as s:
        assert jobs.cancel_superseded(s, series_id, generation=1) == 1
    job = state(sessions, job_id)
    assert job.state == JobState.CANCELLED and job.last_error.startswith("superseded")
    assert history(sessions, job_id)[-1] == ("queued", "cancelled", 0, None)


def test_claim_honours_the_model_filters(sessions, series_id: int) -> None:
    gpu = add_job(sessions, series_id, "gpu-model")
    cpu = add_job(sessions, series_id, "cpu-model")
    assert jobs.claim(sessions, "w1", 60, only_models=["nothing-here"]) is None
    taken = jobs.claim(sessions, "w1", 60, skip_models={"gpu-model"})
    assert taken is not None and taken.job_id == cpu and taken.model == "cpu-model"
    taken = jobs.claim(sessions, "w1", 60, only_models=["gpu-model", "x"])
    assert taken is not None and taken.job_id == gpu


def test_delivery_failures_retry_for_a_time_not_a_count(sessions, series_id: int) -> None:
    job_id = add_job(sessions, series_id, "m", max_attempts=1)
    retry = jobs.DeliveryRetry(give_up_seconds=3600, max_delay_seconds=5)
    with transaction(sessions) as s:
        s.add(Delivery(job_id=job_id, destination="pacs", attempts=1))
        # Made by an earlier attempt: the claims below only re-send them.
        s.add(Output(job_id=job_id, kind="seg", sop_class_uid="1.2", sop_instance_uid="1.2.3",
                     series_uid="1.2.4", path="results/x.dcm", size_bytes=1,
                     created_at=utcnow() - timedelta(minutes=5)))  # fmt: skip
    for _ in range(3):  # well past max_attempts
        claim = jobs.claim(sessions, "w1", 60)
        # A delivery failure gives its attempt back: the budget is for making results.
        assert claim is not None and claim.attempt == 1
        got = jobs.fail(sessions, claim, "down", retryable=True, base_seconds=1, delivery=retry)
        assert got == "queued" and state(sessions, job_id).attempts == 0
        assert state(sessions, job_id).run_after <= utcnow() + timedelta(seconds=5)
        with transaction(sessions) as s:
            # A second back: SQLite's clock, which claims use, counts milliseconds only.
            s.execute(update(Job).values(run_after=utcnow() - timedelta(seconds=1)))
    # Once the destination has been failing for longer than give_up_seconds, it fails.
    with transaction(sessions) as s:
        s.execute(update(Delivery).values(created_at=utcnow() - timedelta(hours=2)))
    claim = jobs.claim(sessions, "w1", 60)
    got = jobs.fail(sessions, claim, "down", retryable=True, base_seconds=1, delivery=retry)
    assert got == "failed"
    with sessions() as s:  # nobody tries it any more, and it says so
        assert s.scalars(select(Delivery.state).where(Delivery.job_id == job_id)).all() == [
            "failed"
        ]
    # A permanent delivery error fails at once.
    job_id = add_job(sessions, series_id, "m2", max_attempts=5)
    claim = jobs.claim(sessions, "w1", 60)
    got = jobs.fail(sessions, claim, "refused", retryable=False, base_seconds=1, delivery=retry)
    assert got == "failed"


def test_admin_retry_and_cancel(sessions, series_id: int) -> None:
    job_id = add_job(sessions, series_id, "m", max_attempts=1)
    with pytest.raises(JobStateError, match="is queued; only ended jobs"):
        jobs.retry(sessions, job_id)
    claim = jobs.claim(sessions, "w1", 60)
    with transaction(sessions) as s:
        s.add(Delivery(job_id=job_id, destination="pacs", state="failed", attempts=3))
    jobs.fail(sessions, claim, "refused", retryable=False, base_seconds=1)
    job = jobs.retry(sessions, job_id, "admin alice")
    assert job.state == JobState.QUEUED and job.attempts == 0 and job.last_error is None
    with sessions() as s:
        assert s.scalars(select(Delivery.state)).all() == ["pending"]  # tried again
    # A running job is cancelled under its worker, which can change nothing after.
    claim = jobs.claim(sessions, "w2", 60)
    assert claim is not None and claim.attempt == 1
    jobs.cancel(sessions, job_id, "admin bob")
    assert not jobs.heartbeat(sessions, claim, 60)
    assert not jobs.finish(sessions, claim)
    job = state(sessions, job_id)
    assert job.state == JobState.CANCELLED and job.last_error == "cancelled by admin bob"
    with pytest.raises(JobStateError, match="already cancelled"):
        jobs.cancel(sessions, job_id)
    with pytest.raises(JobStateError, match="no job with id 999"):
        jobs.cancel(sessions, 999)
    steps = [(f, t) for f, t, _, _ in history(sessions, job_id)]
    assert steps == [
        (None, "queued"),
        ("queued", "running"),
        ("running", "failed"),
        ("failed", "queued"),
        ("queued", "running"),
        ("running", "cancelled"),
    ]
    with sessions() as s:
        notes = s.scalars(select(JobEvent.note).where(JobEvent.job_id == job_id)).all()
    assert "retried by admin alice" in notes and "cancelled by admin bob" in notes


def test_the_attempt_that_made_the_results_counts(sessions, series_id: int) -> None:
    job_id = add_job(sessions, series_id, "m", max_attempts=3)
    retry = jobs.DeliveryRetry(give_up_seconds=3600, max_delay_seconds=5)
    claim = jobs.claim(sessions, "w1", 60)
    with transaction(sessions) as s:  # the model ran in this attempt, then sending failed
        s.add(Output(job_id=job_id, kind="seg", sop_class_uid="1.2", sop_instance_uid="1.2.3",
                     series_uid="1.2.4", path="results/x.dcm", size_bytes=1))  # fmt: skip
        s.add(Delivery(job_id=job_id, destination="pacs", attempts=1))
    jobs.fail(sessions, claim, "down", retryable=True, base_seconds=1, delivery=retry)
    assert state(sessions, job_id).attempts == 1
    with transaction(sessions) as s:
        s.execute(update(Job).values(run_after=utcnow() - timedelta(seconds=1)))
    claim = jobs.claim(sessions, "w1", 60)  # this one only re-sends: it is given back
    assert claim.attempt == 2
    jobs.fail(sessions, claim, "down", retryable=True, base_seconds=1, delivery=retry)
    assert state(sessions, job_id).attempts == 1


def test_a_resend_only_attempt_that_dies_does_not_fail_the_job(sessions, series_id: int) -> None:
    job_id = add_job(sessions, series_id, "m", max_attempts=1)
    with transaction(sessions) as s:
        s.add(Output(job_id=job_id, kind="seg", sop_class_uid="1.2", sop_instance_uid="1.2.3",
                     series_uid="1.2.4", path="results/x.dcm", size_bytes=1,
                     created_at=utcnow() - timedelta(minutes=5)))  # fmt: skip
        s.get(Job, job_id).attempts = 1  # the attempt that made them, the only one allowed
    claim = jobs.claim(sessions, "w1", 60)
    assert claim.attempt == 2
    with transaction(sessions) as s:
        s.execute(update(Job).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    assert jobs.reap_expired(sessions) == 1
    job = state(sessions, job_id)
    assert job.state == JobState.QUEUED and job.attempts == 1
    claim = jobs.claim(sessions, "w1", 60)
    got = jobs.fail(sessions, claim, "internal error", retryable=True, base_seconds=0.001)
    assert got == "queued" and state(sessions, job_id).attempts == 1
    assert history(sessions, job_id)[-1] == ("running", "queued", 2, "w1")


def test_admin_retry_opens_a_fresh_delivery_window(sessions, series_id: int) -> None:
    job_id = add_job(sessions, series_id, "m", max_attempts=1)
    claim = jobs.claim(sessions, "w1", 60)
    with transaction(sessions) as s:
        s.add(Delivery(job_id=job_id, destination="pacs", attempts=9,
                       created_at=utcnow() - timedelta(days=2)))  # fmt: skip
    retry = jobs.DeliveryRetry(give_up_seconds=3600, max_delay_seconds=5)
    assert jobs.fail(sessions, claim, "down", retryable=True, base_seconds=1,
                     delivery=retry) == "failed"  # fmt: skip
    jobs.retry(sessions, job_id)
    claim = jobs.claim(sessions, "w1", 60)
    assert jobs.fail(sessions, claim, "down", retryable=True, base_seconds=1,
                     delivery=retry) == "queued"  # fmt: skip


def test_repeated_waits_for_the_same_reason_are_one_wait_in_the_history(
    sessions, series_id: int
) -> None:
    job_id = add_job(sessions, series_id, "m")
    for reason in ["waiting for lungs", "waiting for lungs", "waiting for lungs", "other"]:
        claim = jobs.claim(sessions, "w1", 60)
        assert claim is not None
        assert jobs.postpone(sessions, claim, 0, reason)
        with transaction(sessions) as s:
            # A second back: SQLite's clock, which claims use, counts milliseconds only.
            s.execute(update(Job).values(run_after=utcnow() - timedelta(seconds=1)))
    assert history(sessions, job_id) == [
        (None, "queued", 0, None),
        ("queued", "running", 1, "w1"),
        ("running", "queued", 0, "w1"),  # waiting for lungs, three times over
        ("queued", "running", 1, "w1"),
        ("running", "queued", 0, "w1"),  # other
    ]
    claim = jobs.claim(sessions, "w1", 60)
    assert jobs.finish(sessions, claim)
    assert history(sessions, job_id)[-2:] == [
        ("queued", "running", 1, "w1"),
        ("running", "done", 1, "w1"),
    ]
    job = state(sessions, job_id)
    assert job.state == JobState.DONE and job.attempts == 1


def test_retrying_a_done_job_sends_it_again_everywhere(sessions, series_id: int) -> None:
    failed_id = add_job(sessions, series_id, "failed-one", max_attempts=1)
    done_id = add_job(sessions, series_id, "done-one")
    for job_id in (failed_id, done_id):
        with transaction(sessions) as s:
            s.add(Delivery(job_id=job_id, destination="pacs", state="sent", attempts=1))
            s.add(Delivery(job_id=job_id, destination="archive", state="failed", attempts=4))
    claim = jobs.claim(sessions, "w1", 60, only_models=["failed-one"])
    jobs.fail(sessions, claim, "refused", retryable=False, base_seconds=1)
    claim = jobs.claim(sessions, "w1", 60, only_models=["done-one"])
    assert jobs.finish(sessions, claim)
    jobs.retry(sessions, failed_id)
    jobs.retry(sessions, done_id)
    with sessions() as s:
        got = {
            (d.job_id, d.destination): (d.state, d.attempts) for d in s.scalars(select(Delivery))
        }
    assert got == {
        (failed_id, "pacs"): ("sent", 1),  # it has them: only the others get them again
        (failed_id, "archive"): ("pending", 0),
        (done_id, "pacs"): ("pending", 0),  # asked for again: "send it again"
        (done_id, "archive"): ("pending", 0),
    }


def skew_process_clock(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Make this process's clock ``seconds`` off, as another host's may be.

    Every dicomnode module that imported :func:`utcnow` gets the skewed one; the
    database's own clock is left alone (SQLite's is the OS clock, not Python's).
    """
    real = models.utcnow

    def skewed() -> datetime:
        return real() + timedelta(seconds=seconds)

    for name, module in list(sys.modules.items()):
        if name.startswith("dicomnode") and getattr(module, "utcnow", None) is real:
            monkeypatch.setattr(module, "utcnow", skewed)


@pytest.mark.parametrize(
    ("worker_skew", "reaper_skew"),
    [(-200, 0), (0, 200)],
    ids=["worker-behind", "reaper-ahead"],
)
def test_a_skewed_clock_does_not_reap_a_healthy_job(
    sessions, series_id: int, monkeypatch: pytest.MonkeyPatch, worker_skew: int, reaper_skew: int
) -> None:
    with monkeypatch.context() as worker_host:
        # A node (sweep and worker) on one host, a reaper on another.
        skew_process_clock(worker_host, worker_skew)
        job_id = add_job(sessions, series_id, "m")
        claim = jobs.claim(sessions, "w1", 60)
        assert claim is not None
        assert jobs.heartbeat(sessions, claim, 60)
    with monkeypatch.context() as reaper_host:
        skew_process_clock(reaper_host, reaper_skew)
        assert jobs.reap_expired(sessions, by="reaper") == 0
    job = state(sessions, job_id)
    assert job.state == JobState.RUNNING and job.lease_owner == "w1"
    assert jobs.heartbeat(sessions, claim, 60)  # the worker still holds it


def test_a_backoff_set_by_a_clock_running_ahead_does_not_hold_the_job_back(
    sessions, series_id: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = add_job(sessions, series_id, "m")
    with monkeypatch.context() as ahead:
        skew_process_clock(ahead, 200)
        claim = jobs.claim(sessions, "w1", 60)
        assert claim is not None
        assert jobs.fail(sessions, claim, "hiccup", retryable=True, base_seconds=0.001) == "queued"
    # The back-off was a millisecond: another worker, whose clock is right, takes the
    # job at once, not 200 s later.
    taken: list[jobs.Claim | None] = []

    def claimed() -> bool:
        taken.append(jobs.claim(sessions, "w2", 60))
        return taken[-1] is not None

    assert wait_for(claimed, 10)
    assert taken[-1] is not None and taken[-1].job_id == job_id


def test_a_full_disk_is_retried_by_time_and_uses_no_attempts(sessions, series_id: int) -> None:
    job_id = add_job(sessions, series_id, "m", max_attempts=1)
    disk = jobs.ResourceRetry(
        give_up_seconds=3600, max_delay_seconds=60, condition="no space left on device"
    )
    for _ in range(3):  # more often than max_attempts allows
        claim = jobs.claim(sessions, "w1", 60)
        assert claim is not None
        error = "no space left on device in the results folder"
        got = jobs.fail(sessions, claim, error, retryable=True, base_seconds=0.001, resource=disk)
        assert got == JobState.QUEUED
        with transaction(sessions) as s:
            # A second back: SQLite's clock, which claims use, counts milliseconds only.
            s.execute(update(Job).values(run_after=utcnow() - timedelta(seconds=1)))
    assert state(sessions, job_id).attempts == 0
    with sessions() as s:
        since, count = jobs.failing_since(s, job_id, disk.condition)
    assert count == 3 and since is not None
    # The disk has been full for more than the hour: the job fails for good.
    with transaction(sessions) as s:
        for event in s.scalars(select(JobEvent)):
            event.at -= timedelta(hours=2)
    claim = jobs.claim(sessions, "w1", 60)
    got = jobs.fail(sessions, claim, disk.condition, retryable=True, base_seconds=1, resource=disk)
    assert got == JobState.FAILED


def test_another_failure_between_full_disks_starts_the_clock_again(
    sessions, series_id: int
) -> None:
    job_id = add_job(sessions, series_id, "m", max_attempts=5)
    full = "no space left on device"
    for note in (full, "PACS down", full):
        claim = jobs.claim(sessions, "w1", 60)
        jobs.fail(sessions, claim, note, retryable=True, base_seconds=0.001)
        with transaction(sessions) as s:
            # A second back: SQLite's clock, which claims use, counts milliseconds only.
            s.execute(update(Job).values(run_after=utcnow() - timedelta(seconds=1)))
    with sessions() as s:
        assert jobs.failing_since(s, job_id, full)[1] == 1
