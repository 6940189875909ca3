"""Workers: claim a job, keep its lease alive, run it, record the outcome."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from dicomnode.config import WorkerSettings
from dicomnode.db import Claim, JobState, jobs
from dicomnode.errors import (
    DISK_FULL,
    ContentCheckFailed,
    DeliveryFailed,
    JobError,
    JobInterrupted,
    JobSuperseded,
    ResultsDiskFull,
    Waiting,
    is_disk_full,
)
from dicomnode.pipeline import Pipeline
from dicomnode.queue.wakeup import Doorbell

log = logging.getLogger(__name__)


def worker_id(index: int = 0) -> str:
    """Return a lease-owner id that is unique across hosts and restarts.

    Parameters
    ----------
    index : int
        The worker's number within this process.

    Returns
    -------
    str
        ``host:pid:index:random``.
    """
    return f"{socket.gethostname()}:{os.getpid()}:{index}:{uuid.uuid4().hex[:8]}"


class _Heartbeat(threading.Thread):
    """Renews a job's lease while the job makes progress; sets ``lost`` when it is gone.

    The pipeline reports progress at every checkpoint (each stage, each inference
    batch). A job stuck for a whole lease (a hung network mount, a wedged GPU call)
    stops being renewed, so the reaper re-queues it for another worker instead of it
    holding the lease for ever.
    """

    def __init__(self, sessions: sessionmaker[Session], claim: Claim, lease_seconds: float) -> None:
        super().__init__(name=f"heartbeat-{claim.job_id}", daemon=True)
        self.sessions = sessions
        self.claim = claim
        self.lease_seconds = lease_seconds
        self.done = threading.Event()
        self.lost = threading.Event()
        self.last_progress = time.monotonic()

    def progress(self) -> None:
        """Record that the job is moving."""
        self.last_progress = time.monotonic()

    def run(self) -> None:
        interval = max(self.lease_seconds / 3, 0.5)
        while not self.done.wait(interval):
            if time.monotonic() - self.last_progress > self.lease_seconds:
                log.warning(
                    "job_id=%d made no progress for %.0f s; letting its lease lapse",
                    self.claim.job_id,
                    self.lease_seconds,
                )
                self.lost.set()
                return
            try:
                if not jobs.heartbeat(self.sessions, self.claim, self.lease_seconds):
                    log.warning("lease lost job_id=%d", self.claim.job_id)
                    self.lost.set()
                    return
            except Exception:  # the database may be briefly away; the lease has slack
                log.exception("heartbeat failed job_id=%d", self.claim.job_id)


class ModelSlots:
    """Per-process limits on how many jobs of one model run at once.

    ``worker.model_concurrency = { lung-unet2d = 1 }`` lets a process with four
    worker threads keep its one GPU to one job of that model while the other threads
    run CPU models. Claims go through :meth:`claim` so that two threads cannot both
    take the last free slot.

    Parameters
    ----------
    limits : dict[str, int]
        Most concurrent jobs per model; unlisted models are unlimited.
    """

    def __init__(self, limits: dict[str, int] | None = None) -> None:
        self.limits = dict(limits or {})
        self.running: dict[str, int] = {}
        self._lock = threading.Lock()

    def claim(self, take: Callable[[set[str]], Claim | None]) -> Claim | None:
        """Claim a job with ``take(models_at_their_limit)`` and count it.

        Parameters
        ----------
        take : callable
            Claims a job that is not of one of the given models, or returns None.

        Returns
        -------
        Claim or None
            What ``take`` returned.
        """
        with self._lock:
            full = {m for m, n in self.limits.items() if self.running.get(m, 0) >= n}
            claim = take(full)
            if claim is not None:
                self.running[claim.model] = self.running.get(claim.model, 0) + 1
            return claim

    def release(self, model: str) -> None:
        """Count a job of ``model`` as ended."""
        with self._lock:
            self.running[model] = max(self.running.get(model, 0) - 1, 0)


def outcome_fields(
    claim: Claim,
    outcome: str,
    started: float,
    *,
    timings: dict[str, float] | None = None,
    error: str | None = None,
) -> dict[str, Any]:
    """Return the structured fields of a job-outcome log line (``extra=`` of logging).

    The JSON log format writes them as they are; the text format has the same facts
    in the message. No patient data: ids, the model, durations, our own error text.

    Parameters
    ----------
    claim : Claim
        The job's claim.
    outcome : str
        done, retrying, failed, cancelled, postponed, released, abandoned or error.
    started : float
        ``time.perf_counter()`` when the attempt began.
    timings : dict[str, float], optional
        Seconds per stage, for a job that is done.
    error : str, optional
        Why it did not finish.

    Returns
    -------
    dict[str, Any]
        ``job_id``, ``model``, ``attempt``, ``outcome``, ``seconds``, and ``stages`` or
        ``error`` where given.
    """
    fields: dict[str, Any] = {
        "job_id": claim.job_id,
        "model": claim.model,
        "attempt": claim.attempt,
        "outcome": outcome,
        "seconds": round(time.perf_counter() - started, 3),
    }
    if timings is not None:
        fields["stages"] = {k: round(v, 3) for k, v in timings.items()}
    if error is not None:
        fields["error"] = error
    return fields


class Worker:
    """Claims and runs jobs until told to stop.

    Parameters
    ----------
    sessions : sessionmaker[Session]
        Database sessions.
    pipeline : Pipeline
        Runs one job.
    settings : WorkerSettings
        Lease, polling and retry settings.
    stop : threading.Event
        Set to stop; a running job is released at its next stage boundary.
    index : int
        The worker's number within the process.
    doorbell : Doorbell, optional
        Rung when jobs are queued in this process (and on stop), so an idle worker
        need not wait out its poll interval.
    slots : ModelSlots, optional
        Per-model limits shared by the workers of this process.
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        pipeline: Pipeline,
        settings: WorkerSettings,
        stop: threading.Event,
        index: int = 0,
        doorbell: Doorbell | None = None,
        slots: ModelSlots | None = None,
    ) -> None:
        self.sessions = sessions
        self.pipeline = pipeline
        self.settings = settings
        self.stop = stop
        self.id = worker_id(index)
        self.doorbell = doorbell or Doorbell()
        self.slots = slots or ModelSlots(settings.model_concurrency)
        self.delivery_retry = jobs.DeliveryRetry(
            give_up_seconds=settings.delivery_retry_hours * 3600,
            max_delay_seconds=settings.delivery_retry_max_seconds,
        )
        # A full disk waits as long as a destination that is down may: both are the
        # site's to fix, and neither is worth failing a job over within minutes.
        self.disk_retry = jobs.ResourceRetry(
            give_up_seconds=settings.delivery_retry_hours * 3600,
            max_delay_seconds=settings.delivery_retry_max_seconds,
            condition=DISK_FULL,
        )

    def run_forever(self) -> None:
        """Claim and run jobs until :attr:`stop` is set."""
        log.info("worker started worker_id=%s", self.id)
        while not self.stop.is_set():
            seen = self.doorbell.rings
            try:
                ran = self.run_once()
            except Exception:  # a database outage must not kill the worker thread
                log.exception("worker loop error worker_id=%s", self.id)
                ran = False
            if not ran:
                # Until the poll interval ends, new work queued here, or the stop.
                self.doorbell.wait(seen, self.settings.poll_seconds)
        log.info("worker stopped worker_id=%s", self.id)

    def run_once(self) -> bool:
        """Claim one job and run it.

        Returns
        -------
        bool
            False when no job was runnable.
        """
        claim = self.slots.claim(
            lambda full: jobs.claim(
                self.sessions,
                self.id,
                self.settings.lease_seconds,
                self.settings.starvation_seconds,
                only_models=self.settings.models,
                skip_models=full,
            )
        )
        if claim is None:
            return False
        try:
            self._run(claim)
        finally:
            self.slots.release(claim.model)
            if claim.model in self.slots.limits:
                # A slot is free: a sibling that skipped this model may claim now.
                self.doorbell.ring()
        return True

    def _run(self, claim: Claim) -> None:
        beat = _Heartbeat(self.sessions, claim, self.settings.lease_seconds)
        beat.start()
        started = time.perf_counter()
        log.info(
            "job started job_id=%d attempt=%d worker_id=%s", claim.job_id, claim.attempt, self.id
        )

        def should_stop() -> bool:
            # Asked at every checkpoint: that is progress; stop if we shut down or
            # lost the lease.
            beat.progress()
            return self.stop.is_set() or beat.lost.is_set()

        try:
            timings = self.pipeline.run(claim, should_stop)
        except JobInterrupted:
            if beat.lost.is_set():
                log.warning(
                    "job abandoned job_id=%d: lease lost",
                    claim.job_id,
                    extra=outcome_fields(claim, "abandoned", started),
                )
            elif jobs.release(self.sessions, claim):
                log.info(
                    "job released job_id=%d: worker stopping",
                    claim.job_id,
                    extra=outcome_fields(claim, "released", started),
                )
                self.doorbell.announce()  # another process's worker can take it now
            return
        except JobSuperseded as exc:
            jobs.finish(self.sessions, claim, JobState.CANCELLED, str(exc))
            log.info(
                "job cancelled job_id=%d model=%s: superseded by newer input",
                claim.job_id,
                claim.model,
                extra=outcome_fields(claim, "cancelled", started),
            )
            return
        except ContentCheckFailed as exc:
            jobs.finish(self.sessions, claim, JobState.CANCELLED, str(exc))
            log.info(
                "job cancelled job_id=%d model=%s: %s",
                claim.job_id,
                claim.model,
                exc,
                extra=outcome_fields(claim, "cancelled", started),
            )
            return
        except Waiting as exc:
            jobs.postpone(self.sessions, claim, exc.seconds, str(exc))
            log.info(
                "job postponed job_id=%d: %s",
                claim.job_id,
                exc,
                extra=outcome_fields(claim, "postponed", started),
            )
            return
        except JobError as exc:
            self._failed(claim, exc, started)
            return
        except OSError as exc:
            if not is_disk_full(exc):
                self._internal_error(claim, exc, started)
                return
            # Full elsewhere than where the results go (a model's cache, say): still the
            # disk's condition, not the job's. Not the exception's text: its file name
            # may be a path under incoming/.
            self._failed(
                claim, ResultsDiskFull("no space left on device while running the job"), started
            )
            return
        except Exception as exc:
            self._internal_error(claim, exc, started)
            return
        finally:
            beat.done.set()
        if jobs.finish(self.sessions, claim):
            stages = " ".join(f"{k}={v:.2f}" for k, v in timings.items())
            log.info(
                "job done job_id=%d attempt=%d seconds=%.1f model=%s %s",
                claim.job_id,
                claim.attempt,
                time.perf_counter() - started,
                claim.model,
                stages,
                extra=outcome_fields(claim, "done", started, timings=timings),
            )
        else:
            log.warning("job finished but lease was lost job_id=%d", claim.job_id)

    def _failed(self, claim: Claim, exc: JobError, started: float) -> None:
        """Record a failed attempt, retried by time for a destination or a full disk."""
        state = jobs.fail(
            self.sessions,
            claim,
            str(exc),
            retryable=exc.retryable,
            base_seconds=self.settings.retry_base_seconds,
            delivery=self.delivery_retry if isinstance(exc, DeliveryFailed) else None,
            resource=self.disk_retry if isinstance(exc, ResultsDiskFull) else None,
        )
        outcome = "retrying" if state == "queued" else "failed"
        log.warning(
            "job %s job_id=%d attempt=%d seconds=%.1f model=%s error=%s",
            outcome,
            claim.job_id,
            claim.attempt,
            time.perf_counter() - started,
            claim.model,
            exc,
            extra=outcome_fields(claim, outcome, started, error=str(exc)),
        )

    def _internal_error(self, claim: Claim, exc: BaseException, started: float) -> None:
        """Record an unexpected error: retried a bounded number of times.

        It is a bug or an environment problem; retrying it a bounded number of times
        neither loses the job nor loops on it forever. Its message may quote a header
        value (a patient's name, a birth date), so only the type is logged and kept; the
        traceback goes to DEBUG.
        """
        log.error(
            "job error job_id=%d model=%s: %s",
            claim.job_id,
            claim.model,
            type(exc).__name__,
            extra=outcome_fields(claim, "error", started, error=type(exc).__name__),
        )
        log.debug("job error job_id=%d", claim.job_id, exc_info=exc)
        jobs.fail(
            self.sessions,
            claim,
            f"internal error: {type(exc).__name__} (details in the DEBUG log)",
            retryable=True,
            base_seconds=self.settings.retry_base_seconds,
        )
