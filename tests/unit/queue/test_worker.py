from __future__ import annotations

import threading
import time

from dicomnode.config import WorkerSettings
from dicomnode.db import jobs
from dicomnode.db.engine import transaction
from dicomnode.db.models import Job, JobState, Series, Study
from dicomnode.queue.doorbell import Doorbell
from dicomnode.queue.worker import Worker, _Heartbeat


def queue_one(sessions) -> int:
    with transaction(sessions) as s:
        study = Study(study_uid="1.2")
        s.add(study)
        s.flush()
        series = Series(study_id=study.id, series_uid="1.2.3")
        s.add(series)
        s.flush()
        job = jobs.enqueue(s, series, route="r", model="m", version="1", max_attempts=2)
        assert job is not None
        s.flush()
        return job.id


def claimed(sessions) -> jobs.Claim:
    queue_one(sessions)
    claim = jobs.claim(sessions, "w", 1.0)
    assert claim is not None
    return claim


def test_heartbeat_renews_while_the_job_progresses(sessions) -> None:
    claim = claimed(sessions)
    beat = _Heartbeat(sessions, claim, lease_seconds=1.0)
    beat.start()
    try:
        for _ in range(10):  # 2 s: twice the lease
            beat.progress()
            time.sleep(0.2)
        assert not beat.lost.is_set()
        assert jobs.reap_expired(sessions) == 0
    finally:
        beat.done.set()
        beat.join()


def test_heartbeat_lets_a_stuck_job_go(sessions) -> None:
    claim = claimed(sessions)
    beat = _Heartbeat(sessions, claim, lease_seconds=1.0)
    beat.start()
    assert beat.lost.wait(5)  # no progress for a lease: it stops renewing
    beat.join()
    time.sleep(1.1)
    assert jobs.reap_expired(sessions) == 1
    with sessions() as s:
        assert s.get(Job, claim.job_id).state == JobState.QUEUED


def test_doorbell_counts_rings_so_none_is_missed() -> None:
    bell = Doorbell()
    seen = bell.rings
    bell.ring()  # rings after the look, before the wait
    assert bell.wait(seen, timeout=5)  # returns at once
    assert not bell.wait(bell.rings, timeout=0.05)  # nothing new: times out


class FinishingPipeline:
    """Stands in for the model pipeline: this test is about when a worker looks."""

    def __init__(self, sessions) -> None:
        self.sessions = sessions
        self.ran: list[int] = []

    def run(self, claim: jobs.Claim, should_stop) -> dict[str, float]:
        self.ran.append(claim.job_id)
        return {}


def test_an_idle_worker_wakes_when_work_is_queued(sessions) -> None:
    bell, stop = Doorbell(), threading.Event()
    pipeline = FinishingPipeline(sessions)
    settings = WorkerSettings(poll_seconds=30)  # without the bell, a 30 s wait
    worker = Worker(sessions, pipeline, settings, stop, 0, bell)  # type: ignore[arg-type]
    thread = threading.Thread(target=worker.run_forever)
    thread.start()
    try:
        time.sleep(0.3)  # the worker found nothing and is waiting
        job_id = queue_one(sessions)
        started = time.monotonic()
        bell.ring()
        while not pipeline.ran and time.monotonic() - started < 5:
            time.sleep(0.01)
        assert pipeline.ran == [job_id]
    finally:
        stop.set()
        bell.ring()  # as Node.stop does
        thread.join(5)
    assert not thread.is_alive()
