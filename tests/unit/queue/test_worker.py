from __future__ import annotations

import time

from dicomnode.db import jobs
from dicomnode.db.engine import transaction
from dicomnode.db.models import Job, JobState, Series, Study
from dicomnode.queue.worker import _Heartbeat


def claimed(sessions) -> jobs.Claim:
    with transaction(sessions) as s:
        study = Study(study_uid="1.2")
        s.add(study)
        s.flush()
        series = Series(study_id=study.id, series_uid="1.2.3")
        s.add(series)
        s.flush()
        jobs.enqueue(s, series, route="r", model="m", version="1", max_attempts=2)
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
