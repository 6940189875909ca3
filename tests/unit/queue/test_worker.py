from __future__ import annotations

import errno
import threading
import time

from dicomnode.config import WorkerSettings
from dicomnode.db import Job, JobState, Series, Study, jobs, transaction
from dicomnode.queue import Doorbell, ModelSlots, Worker
from dicomnode.queue.worker import _Heartbeat


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


class ConcurrencyPipeline:
    """Holds each job a while and records the most jobs of each model seen at once."""

    def __init__(self, sessions, models: dict[int, str]) -> None:
        self.sessions = sessions
        self.models = models
        self.lock = threading.Lock()
        self.now: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.ran: list[int] = []

    def run(self, claim: jobs.Claim, should_stop) -> dict[str, float]:
        model = self.models[claim.job_id]
        with self.lock:
            self.now[model] = self.now.get(model, 0) + 1
            self.peak[model] = max(self.peak.get(model, 0), self.now[model])
        time.sleep(0.3)
        with self.lock:
            self.now[model] -= 1
            self.ran.append(claim.job_id)
        return {}


def queue_models(sessions, models: list[str]) -> dict[int, str]:
    out: dict[int, str] = {}
    with transaction(sessions) as s:
        study = Study(study_uid="1.9")
        s.add(study)
        s.flush()
        series = Series(study_id=study.id, series_uid="1.9.1")
        s.add(series)
        s.flush()
        for i, model in enumerate(models):
            job = jobs.enqueue(s, series, route=f"r{i}", model=model, version="1", max_attempts=2)
            assert job is not None
            out[job.id] = model
    return out


def test_model_concurrency_limits_one_model_not_the_others(sessions) -> None:
    models = queue_models(sessions, ["gpu", "gpu", "gpu", "cpu", "cpu", "cpu"])
    pipeline = ConcurrencyPipeline(sessions, models)
    settings = WorkerSettings(poll_seconds=0.05, model_concurrency={"gpu": 1})
    stop, bell, slots = threading.Event(), Doorbell(), ModelSlots(settings.model_concurrency)
    workers = [Worker(sessions, pipeline, settings, stop, i, bell, slots) for i in range(3)]  # type: ignore[arg-type]
    threads = [threading.Thread(target=w.run_forever) for w in workers]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 20
        while len(pipeline.ran) < len(models) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        bell.ring()
        for t in threads:
            t.join(5)
    assert sorted(pipeline.ran) == sorted(models)
    assert pipeline.peak["gpu"] == 1  # never two GPU jobs at once...
    assert pipeline.peak["cpu"] >= 2  # ...while the other threads ran CPU work beside it
    assert slots.running == {"gpu": 0, "cpu": 0}


def test_a_worker_runs_only_its_models(sessions) -> None:
    models = queue_models(sessions, ["gpu", "cpu"])
    pipeline = ConcurrencyPipeline(sessions, models)
    settings = WorkerSettings(poll_seconds=0.05, models=["cpu"])
    worker = Worker(sessions, pipeline, settings, threading.Event())  # type: ignore[arg-type]
    assert worker.run_once() and not worker.run_once()
    assert [models[j] for j in pipeline.ran] == ["cpu"]
    with sessions() as s:
        states = {s.get(Job, j).model: s.get(Job, j).state for j in models}
    assert states == {"gpu": JobState.QUEUED, "cpu": JobState.DONE}


class RaisingPipeline:
    """Fails every attempt with the given OS error (the disk, not the job)."""

    def __init__(self, error: OSError) -> None:
        self.error = error

    def run(self, claim: jobs.Claim, should_stop) -> dict[str, float]:
        raise self.error


def test_a_full_disk_anywhere_in_a_job_is_waited_out_not_counted(sessions) -> None:
    job_id = queue_one(sessions)  # max_attempts=2
    full = OSError(errno.ENOSPC, "No space left on device", "incoming/1.2/1.2.3/x.dcm")
    worker = Worker(sessions, RaisingPipeline(full), WorkerSettings(), threading.Event())  # type: ignore[arg-type]
    for _ in range(3):
        assert worker.run_once()
        with transaction(sessions) as s:
            job = s.get(Job, job_id)
            assert job.state == JobState.QUEUED and job.attempts == 0
            assert job.last_error == "no space left on device while running the job"
            job.run_after = job.created_at
    other = OSError(errno.EACCES, "Permission denied")
    worker = Worker(sessions, RaisingPipeline(other), WorkerSettings(), threading.Event())  # type: ignore[arg-type]
    assert worker.run_once()
    with sessions() as s:
        job = s.get(Job, job_id)
    assert job.attempts == 1 and job.last_error.startswith("internal error: PermissionError")
