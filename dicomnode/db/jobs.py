"""The job queue: SQL that enqueues, claims, renews, finishes and retries jobs.

Every state change after a claim is guarded by ``lease_owner``: a worker that
lost its lease (it stalled, the reaper re-queued its job, another worker took it)
can no longer change the job, so a job is finished by exactly one worker.
Claims take ``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so concurrent workers never
wait on each other; on SQLite every transaction is ``BEGIN IMMEDIATE`` (see
:mod:`dicomnode.db.engine`), which serialises claims.

Every time the queue writes or compares (lease expiry, back-off, history) comes from
the database's clock (:func:`~dicomnode.db.engine.database_now`), never the process's:
a worker, a reaper and an admin command on three hosts then agree on when a lease
lapses, however far apart their clocks are.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import case, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.db import audit
from dicomnode.db.engine import database_now, transaction
from dicomnode.db.models import (
    Delivery,
    DeliveryState,
    Job,
    JobEvent,
    JobState,
    Output,
    Series,
)
from dicomnode.errors import JobStateError, first_line

log = logging.getLogger(__name__)

ACTIVE_STATES = (JobState.RUNNING, JobState.SENDING)


@dataclass(frozen=True)
class Claim:
    """A job this worker holds the lease on."""

    job_id: int
    owner: str
    attempt: int
    model: str = ""


def record_event(
    session: Session,
    job: Job,
    to_state: JobState,
    *,
    from_state: JobState | None,
    worker: str | None = None,
    note: str | None = None,
    at: datetime | None = None,
) -> None:
    """Append a transition to the job's history, inside the transaction that makes it.

    Parameters
    ----------
    session : Session
        The open transaction that changes the job.
    job : Job
        The job (already flushed, so it has an id).
    to_state : JobState
        The state it moves to.
    from_state : JobState or None
        The state it leaves; None when it is created.
    worker : str, optional
        The worker that made the change.
    note : str, optional
        Why, in one line without PHI.
    at : datetime, optional
        When; now by the database's clock if omitted.
    """
    at = at or database_now(session)
    session.add(
        JobEvent(
            job_id=job.id,
            at=at,
            from_state=None if from_state is None else from_state.value,
            to_state=to_state.value,
            attempt=job.attempts,
            worker=worker,
            note=note,
        )
    )
    if from_state is None or to_state in FINAL_STATES:
        # The audit trail keeps the start and the end of every job; the steps between
        # are in job_events, which `jobs purge` may remove with the job.
        series = session.get(Series, job.series_id)
        # The first line only: a model's error may carry its own traceback below it.
        first = first_line(note or "")
        ended = f" attempt {job.attempts}" + (f": {first}" if first else "")
        audit.record(
            session,
            "job-queued" if from_state is None else "job-ended",
            outcome="success" if from_state is None else to_state.value,
            actor=worker,
            job_id=job.id,
            study_uid=series.study.study_uid if series is not None else None,
            series_uid=series.series_uid if series is not None else None,
            detail=f"{job.model} {job.model_version} route {job.route}"
            + ("" if from_state is None else ended),
            at=at,
        )


def idempotency_key(series_uid: str, generation: int, route: str, model: str, version: str) -> str:
    """Return the key that makes the same work impossible to queue twice.

    Parameters
    ----------
    series_uid : str
        The input series.
    generation : int
        How often the series was re-opened by late instances.
    route : str
        The route that asked for the job.
    model, version : str
        The model package.

    Returns
    -------
    str
        The key.
    """
    return f"{series_uid}/{generation}/{route}/{model}/{version}"


def enqueue(
    session: Session,
    series: Series,
    *,
    route: str,
    model: str,
    version: str,
    max_attempts: int,
    priority: int = 0,
    selection: dict[str, Any] | None = None,
) -> Job | None:
    """Queue a job unless the same work is already queued or done.

    Parameters
    ----------
    session : Session
        An open transaction.
    series : Series
        The input series.
    route, model, version : str
        What to run and why.
    max_attempts : int
        Attempts before the job fails for good.
    priority : int
        Higher runs first.
    selection : dict, optional
        For a study-scope route: why ``series`` was chosen among the study's.

    Returns
    -------
    Job or None
        The new job, or None when its idempotency key already exists.
    """
    key = idempotency_key(series.series_uid, series.generation, route, model, version)
    if session.scalar(select(Job.id).where(Job.idempotency_key == key)) is not None:
        return None
    now = database_now(session)
    job = Job(
        series_id=series.id,
        route=route,
        model=model,
        model_version=version,
        generation=series.generation,
        idempotency_key=key,
        state=JobState.QUEUED,
        priority=priority,
        attempts=0,
        max_attempts=max_attempts,
        run_after=now,
        created_at=now,
        updated_at=now,
        timings={},
        summary={},
        selection=selection,
    )
    session.add(job)
    session.flush()
    note = f"route {route}" + (" (study scope: series chosen)" if selection else "")
    record_event(session, job, JobState.QUEUED, from_state=None, note=note, at=now)
    return job


URGENT = 10  # Job.priority of an urgent route's jobs; normal ones are 0


def claim(
    sessions: sessionmaker[Session],
    owner: str,
    lease_seconds: float,
    starvation_seconds: float = 600.0,
    *,
    only_models: Collection[str] = (),
    skip_models: Collection[str] = (),
) -> Claim | None:
    """Claim the most urgent runnable job, taking a lease on it.

    Urgent jobs go first, oldest first; a normal job that has waited longer than
    ``starvation_seconds`` counts as urgent, so urgent traffic delays normal work
    but never holds it back indefinitely.

    Parameters
    ----------
    sessions : sessionmaker[Session]
        Database sessions.
    owner : str
        This worker's id, recorded as the lease owner.
    lease_seconds : float
        How long the lease lasts before it must be renewed.
    starvation_seconds : float
        Age at which a normal job is treated as urgent.
    only_models : Collection[str]
        Claim only jobs of these models (a GPU host's share); empty means any.
    skip_models : Collection[str]
        Leave jobs of these models to others (this process runs as many as it may).

    Returns
    -------
    Claim or None
        The claimed job, or None when nothing is runnable.
    """
    with transaction(sessions) as session:
        now = database_now(session)
        starved = now - timedelta(seconds=starvation_seconds)
        effective = case((Job.created_at <= starved, URGENT), else_=Job.priority)
        query = select(Job).where(Job.state == JobState.QUEUED, Job.run_after <= now)
        if only_models:
            query = query.where(Job.model.in_(list(only_models)))
        if skip_models:
            query = query.where(Job.model.not_in(list(skip_models)))
        job = session.scalar(
            query.order_by(effective.desc(), Job.id).limit(1).with_for_update(skip_locked=True)
        )
        if job is None:
            return None
        job.state = JobState.RUNNING
        job.lease_owner = owner
        job.claimed_by = owner
        job.lease_expires_at = now + timedelta(seconds=lease_seconds)
        job.heartbeat_at = now
        job.attempts += 1
        job.started_at = now
        job.last_error = None
        job.updated_at = now
        record_event(
            session, job, JobState.RUNNING, from_state=JobState.QUEUED, worker=owner, at=now
        )
        return Claim(job_id=job.id, owner=owner, attempt=job.attempts, model=job.model)


def _owned_job(session: Session, claim: Claim) -> Job | None:
    """Return the job locked for update if ``claim`` still holds it, else None."""
    job = session.get(Job, claim.job_id, with_for_update=True, populate_existing=True)
    if job is None or job.lease_owner != claim.owner or job.state not in ACTIVE_STATES:
        return None
    return job


def heartbeat(sessions: sessionmaker[Session], claim: Claim, lease_seconds: float) -> bool:
    """Renew the lease of a running job.

    Parameters
    ----------
    sessions : sessionmaker[Session]
        Database sessions.
    claim : Claim
        The job.
    lease_seconds : float
        New lease length from now.

    Returns
    -------
    bool
        False if the lease was lost (the job was reaped or cancelled).
    """
    with transaction(sessions) as session:
        job = _owned_job(session, claim)
        if job is None:
            return False
        now = database_now(session)
        job.heartbeat_at = now
        job.lease_expires_at = now + timedelta(seconds=lease_seconds)
        # Set here, or the model's onupdate would stamp the worker's own clock.
        job.updated_at = now
        return True


def set_state(
    session: Session, claim: Claim, state: JobState, *, ended: bool = False, **values: Any
) -> bool:
    """Move a job this worker owns to ``state`` inside an open transaction.

    Parameters
    ----------
    session : Session
        An open transaction.
    claim : Claim
        The job.
    state : JobState
        The new state.
    ended : bool
        Also set ``finished_at`` (to the same time as the transition).
    **values
        Other columns to set.

    Returns
    -------
    bool
        False if the lease was lost.
    """
    job = _owned_job(session, claim)
    if job is None:
        return False
    before = job.state
    now = database_now(session)
    job.state = state
    job.updated_at = now
    if ended:
        job.finished_at = now
    for key, value in values.items():
        setattr(job, key, value)
    note = values.get("last_error")
    record_event(session, job, state, from_state=before, worker=claim.owner, note=note, at=now)
    return True


def merge_timings(session: Session, claim: Claim, timings: dict[str, float]) -> None:
    """Add stage timings to a job's record.

    Parameters
    ----------
    session : Session
        An open transaction.
    claim : Claim
        The job.
    timings : dict[str, float]
        Seconds per stage.
    """
    job = session.get(Job, claim.job_id)
    if job is not None:
        job.timings = {**(job.timings or {}), **{k: round(v, 3) for k, v in timings.items()}}
        # By the database's clock, not the model's onupdate (this process's clock).
        job.updated_at = database_now(session)


def finish(
    sessions: sessionmaker[Session],
    claim: Claim,
    state: JobState = JobState.DONE,
    reason: str | None = None,
) -> bool:
    """End a job: done, or cancelled with a reason.

    Parameters
    ----------
    sessions : sessionmaker[Session]
        Database sessions.
    claim : Claim
        The job.
    state : JobState
        ``done`` or ``cancelled``.
    reason : str, optional
        Why (kept in ``last_error`` for the CLI).

    Returns
    -------
    bool
        False if the lease had been lost (another worker owns the job now).
    """
    with transaction(sessions) as session:
        return set_state(
            session,
            claim,
            state,
            ended=True,
            lease_owner=None,
            lease_expires_at=None,
            last_error=reason,
        )


def cancel_superseded(session: Session, series_id: int, generation: int) -> int:
    """Cancel the queued jobs of a series that a late instance has re-opened.

    Running jobs find out themselves at their next start (see the pipeline); queued
    ones are cancelled here so that they never run on a half-received series.

    Parameters
    ----------
    session : Session
        The open transaction that re-opens the series.
    series_id : int
        The series.
    generation : int
        Its new generation; queued jobs of older generations are cancelled.

    Returns
    -------
    int
        How many jobs were cancelled.
    """
    reason = "superseded: a late instance re-opened the series"
    queued = session.scalars(
        select(Job)
        .where(
            Job.series_id == series_id,
            Job.generation < generation,
            Job.state == JobState.QUEUED,
        )
        .with_for_update(skip_locked=True)
    ).all()
    _cancel_queued(session, queued, reason)
    return len(queued)


REPLACED = "superseded: the study was re-opened and another series chosen"


def _queue_afresh(job: Job, now: datetime) -> None:
    """Put an ended job back in the queue with all its attempts, runnable now."""
    job.state = JobState.QUEUED
    job.attempts = 0
    job.run_after = now
    job.finished_at = None
    job.last_error = None
    job.updated_at = now


def requeue_replaced(
    session: Session,
    series: Series,
    *,
    route: str,
    model: str,
    version: str,
    selection: dict[str, Any] | None,
) -> Job | None:
    """Queue again a study-scope job that a choice now undone had cancelled.

    A re-opened study may choose series B over A (A's queued job is cancelled), then,
    re-opened once more, A again: A's job has the same idempotency key, so
    :func:`enqueue` queues nothing, and without this the study would get no job.

    Parameters
    ----------
    session : Session
        The transaction that completes the study.
    series : Series
        The chosen series.
    route, model, version : str
        The job's route and model.
    selection : dict, optional
        The new choice's reasons.

    Returns
    -------
    Job or None
        The job queued again, or None when there is no such cancelled job.
    """
    key = idempotency_key(series.series_uid, series.generation, route, model, version)
    job = session.scalar(
        select(Job)
        .where(Job.idempotency_key == key, Job.state == JobState.CANCELLED)
        .with_for_update()
    )
    if job is None or job.last_error != REPLACED:
        return None
    now = database_now(session)
    _queue_afresh(job, now)
    job.selection = selection
    record_event(
        session, job, JobState.QUEUED, from_state=JobState.CANCELLED,
        note="study re-opened: this series chosen again", at=now,
    )  # fmt: skip
    return job


def cancel_replaced(session: Session, study_id: int, route: str, model: str, keep: int) -> int:
    """Cancel a study-scope route's queued jobs of ``model`` in a study, but for ``keep``.

    A re-opened study may choose another input series; the jobs queued for the
    earlier choice must not run too. Running ones finish (their results stay valid
    for the series they ran on).

    Parameters
    ----------
    session : Session
        The open transaction that queued job ``keep``.
    study_id : int
        The study.
    route, model : str
        The route and the model.
    keep : int
        The job queued for the new choice.

    Returns
    -------
    int
        How many jobs were cancelled.
    """
    reason = REPLACED
    queued = session.scalars(
        select(Job)
        .join(Series, Series.id == Job.series_id)
        .where(
            Series.study_id == study_id,
            Job.route == route,
            Job.model == model,
            Job.id != keep,
            Job.state == JobState.QUEUED,
        )
        # Only the job rows: on PostgreSQL a plain FOR UPDATE would lock the joined
        # series too, and skip the jobs whose series the listener holds just then.
        .with_for_update(of=Job, skip_locked=True)
    ).all()
    _cancel_queued(session, queued, reason)
    return len(queued)


def _cancel_queued(session: Session, queued: Sequence[Job], reason: str) -> None:
    if not queued:
        return  # the usual case: no need to ask the database for the time
    now = database_now(session)
    for job in queued:
        job.state = JobState.CANCELLED
        job.last_error = reason
        job.finished_at = now
        job.updated_at = now
        record_event(
            session, job, JobState.CANCELLED, from_state=JobState.QUEUED, note=reason, at=now
        )


def retry_delay(attempt: int, base_seconds: float, cap_seconds: float = 3600.0) -> float:
    """Return the backoff before the next attempt: exponential with full jitter.

    Parameters
    ----------
    attempt : int
        The attempt that just failed (1 for the first).
    base_seconds : float
        Delay scale after the first attempt.
    cap_seconds : float
        Upper bound.

    Returns
    -------
    float
        Seconds to wait, at least half the exponential step so retries do spread out.
    """
    step = min(cap_seconds, base_seconds * 2 ** min(max(attempt - 1, 0), 30))
    return step / 2 + random.uniform(0, step / 2)


@dataclass(frozen=True)
class DeliveryRetry:
    """How a job whose results could not be delivered is retried.

    Delivery failures are retried for a time, not a number of attempts: a PACS down
    for a night must get its results in the morning, and re-sending stored objects
    costs nothing like re-running a model.
    """

    give_up_seconds: float
    max_delay_seconds: float


@dataclass(frozen=True)
class ResourceRetry:
    """How a job is retried that failed for want of something the node itself lacks.

    A full disk is not the job's fault, and it lasts until space is freed (retention,
    an admin), not a number of attempts: like a destination that is down, it is retried
    for a time, and those attempts do not use up the model's attempt budget.
    """

    give_up_seconds: float
    max_delay_seconds: float
    # The errors' common beginning ("no space left on device"): the failures in a row
    # that start with it tell how long the condition has lasted.
    condition: str


def fail(
    sessions: sessionmaker[Session],
    claim: Claim,
    error: str,
    *,
    retryable: bool,
    base_seconds: float,
    delivery: DeliveryRetry | None = None,
    resource: ResourceRetry | None = None,
) -> JobState:
    """Record a failed attempt: re-queue with backoff, or fail for good.

    Parameters
    ----------
    sessions : sessionmaker[Session]
        Database sessions.
    claim : Claim
        The job.
    error : str
        One line, no PHI; shown by the CLI.
    retryable : bool
        Whether another attempt may succeed.
    base_seconds : float
        Backoff scale.
    delivery : DeliveryRetry, optional
        Set when only delivery failed: the job is retried until its oldest
        undelivered destination has been failing for ``give_up_seconds``, however
        many attempts that takes.
    resource : ResourceRetry, optional
        Set when the node lacked a resource (its disk was full): the job is retried
        until its attempts have been failing that way for ``give_up_seconds``, and
        those attempts are given back.

    Returns
    -------
    JobState
        ``queued`` (will retry) or ``failed``; the job's current state if the lease
        was lost.
    """
    with transaction(sessions) as session:
        # Locked, so that a reaper or another worker cannot change it between check and write.
        job = _owned_job(session, claim)
        if job is None:
            current = session.get(Job, claim.job_id)
            return current.state if current is not None else JobState.FAILED
        now = database_now(session)
        before = job.state
        job.last_error = error
        job.lease_owner = None
        job.lease_expires_at = None
        resend_only = _resend_only(session, job)
        give_back = False
        if retryable and delivery is not None:
            since = session.scalar(
                select(func.min(Delivery.created_at)).where(
                    Delivery.job_id == job.id, Delivery.state != DeliveryState.SENT
                )
            )
            failing = (now - since).total_seconds() if since is not None else 0.0
            retry = failing < delivery.give_up_seconds
            delay = retry_delay(
                _delivery_tries(session, job.id), base_seconds, delivery.max_delay_seconds
            )
            # An attempt that only re-sent stored results is given back, like a
            # release: ``attempts`` counts tries at making the results, and a PACS
            # that is down must not use them up (each delivery row counts its own).
            give_back = retry and resend_only
        elif retryable and resource is not None:
            since, earlier = failing_since(session, job.id, resource.condition)
            since, tries = since or now, earlier + 1
            retry = (now - since).total_seconds() < resource.give_up_seconds
            delay = retry_delay(tries, base_seconds, resource.max_delay_seconds)
            # The model may have run, but what failed is the node, not the job: the
            # attempt is given back so that a disk full for a night cannot use them up.
            give_back = retry
        elif retryable and resend_only:
            # The results exist; a hiccup while re-sending them (the database, say)
            # must not fail a job whose model budget was spent making them.
            retry, give_back = True, True
            delay = retry_delay(job.attempts, base_seconds)
        else:
            retry = retryable and job.attempts < job.max_attempts
            delay = retry_delay(job.attempts, base_seconds)
        if retry:
            job.state = JobState.QUEUED
            job.run_after = now + timedelta(seconds=delay)
        else:
            job.state = JobState.FAILED
            job.finished_at = now
            # Nobody retries these deliveries now (until an admin retries the job, which
            # re-opens them): say so, rather than leave them looking on their way.
            session.execute(
                update(Delivery)
                .where(Delivery.job_id == job.id, Delivery.state == DeliveryState.PENDING)
                .values(state=DeliveryState.FAILED)
            )
        record_event(
            session, job, job.state, from_state=before, worker=claim.owner, note=error, at=now
        )
        if give_back:
            job.attempts -= 1  # after the event, which records the attempt that ran
        # Last: the queries above flushed the job's earlier changes, and an UPDATE that
        # leaves updated_at out gets the model's onupdate, this process's clock.
        job.updated_at = now
        return job.state


def failing_since(session: Session, job_id: int, condition: str) -> tuple[datetime | None, int]:
    """Return since when a job's latest attempts have failed with ``condition``, and how many did.

    The job's history is read back from the newest event: claims are skipped, failures
    whose note starts with ``condition`` belong to the run, anything else ends it.

    Parameters
    ----------
    session : Session
        An open session.
    job_id : int
        The job.
    condition : str
        The failures' common beginning, e.g. ``no space left on device``.

    Returns
    -------
    tuple[datetime or None, int]
        When the first failure of the run was recorded (by the database's clock) and how
        many there were; ``(None, 0)`` when the latest attempt did not fail that way.
    """
    since: datetime | None = None
    count = 0
    events = session.execute(
        select(JobEvent.at, JobEvent.to_state, JobEvent.note)
        .where(JobEvent.job_id == job_id)
        .order_by(JobEvent.id.desc())
    )
    for at, to_state, note in events:
        if to_state == JobState.RUNNING:
            continue
        if to_state != JobState.QUEUED or not (note or "").startswith(condition):
            break
        since, count = at, count + 1
    return since, count


def _resend_only(session: Session, job: Job) -> bool:
    """Return whether the job's results were made by an earlier attempt than this one."""
    if job.started_at is None:
        return False
    earlier = session.scalar(
        select(func.count(Output.id)).where(
            Output.job_id == job.id, Output.created_at < job.started_at
        )
    )
    return bool(earlier)


def _delivery_tries(session: Session, job_id: int) -> int:
    tries = session.scalar(
        select(func.max(Delivery.attempts)).where(
            Delivery.job_id == job_id, Delivery.state != DeliveryState.SENT
        )
    )
    return int(tries or 1)


def release(sessions: sessionmaker[Session], claim: Claim) -> bool:
    """Give a job back untouched (the worker is shutting down).

    The attempt does not count: the job did not fail, it was interrupted.

    Parameters
    ----------
    sessions : sessionmaker[Session]
        Database sessions.
    claim : Claim
        The job.

    Returns
    -------
    bool
        False if the lease had already been lost.
    """
    return _give_back(sessions, claim, 0.0, "released: worker stopping", error=None)


def postpone(sessions: sessionmaker[Session], claim: Claim, seconds: float, reason: str) -> bool:
    """Put a job back to wait for something else (another model's verdict).

    Like :func:`release`, the attempt does not count; unlike it, the job is not
    runnable again for ``seconds``.

    Parameters
    ----------
    sessions : sessionmaker[Session]
        Database sessions.
    claim : Claim
        The job.
    seconds : float
        How long to wait.
    reason : str
        Recorded in the job's history and ``last_error``.

    Returns
    -------
    bool
        False if the lease had already been lost.
    """
    return _give_back(sessions, claim, seconds, reason, error=reason, collapse=True)


def _give_back(
    sessions: sessionmaker[Session],
    claim: Claim,
    seconds: float,
    note: str,
    error: str | None,
    collapse: bool = False,
) -> bool:
    """Re-queue a job this worker holds without counting the attempt.

    With ``collapse``, a give-back for the same reason as the job's previous one leaves
    no trace of this claim in the history: a job waiting hours for another model's
    verdict shows one wait, not two events every few seconds.
    """
    with transaction(sessions) as session:
        job = _owned_job(session, claim)
        if job is None:
            return False
        now = database_now(session)
        before = job.state
        job.state = JobState.QUEUED
        job.lease_owner = None
        job.lease_expires_at = None
        job.attempts -= 1
        job.run_after = now + timedelta(seconds=seconds)
        if error is not None:
            job.last_error = error
        job.updated_at = now
        if collapse and _repeats_last_wait(session, job.id, note):
            return True
        record_event(
            session, job, JobState.QUEUED, from_state=before, worker=claim.owner, note=note, at=now
        )
        return True


def _repeats_last_wait(session: Session, job_id: int, note: str) -> bool:
    """Drop this claim's event if the wait before it had the same reason; say whether."""
    last = session.scalars(
        select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id.desc()).limit(2)
    ).all()
    if (
        len(last) == 2
        and last[0].from_state == JobState.QUEUED
        and last[0].to_state == JobState.RUNNING
        and last[1].to_state == JobState.QUEUED
        and last[1].note == note
    ):
        session.delete(last[0])
        return True
    return False


def reap_expired(sessions: sessionmaker[Session], by: str | None = None) -> int:
    """Re-queue jobs whose worker stopped renewing its lease (it crashed or hung).

    Parameters
    ----------
    sessions : sessionmaker[Session]
        Database sessions.
    by : str, optional
        Who reaps (host and pid), recorded in the jobs' history.

    Returns
    -------
    int
        How many jobs were re-queued or, out of attempts, failed.
    """
    count = 0
    with transaction(sessions) as session:
        # The database's clock, the one that set the leases: a reaper whose own clock
        # runs ahead must not take a healthy job from its worker.
        now = database_now(session)
        expired = session.scalars(
            select(Job)
            .where(Job.state.in_(ACTIVE_STATES), Job.lease_expires_at < now)
            .with_for_update(skip_locked=True)
        ).all()
        for job in expired:
            before = job.state
            job.last_error = f"lease of worker {job.lease_owner} expired"
            job.lease_owner = None
            job.lease_expires_at = None
            resend_only = _resend_only(session, job)
            if resend_only or job.attempts < job.max_attempts:
                job.state = JobState.QUEUED
                job.run_after = now
            else:
                job.state = JobState.FAILED
                job.finished_at = now
            record_event(
                session, job, job.state, from_state=before, worker=by, note=job.last_error, at=now
            )
            if resend_only:
                job.attempts -= 1  # it was only re-sending stored results
            # Last, as in fail(): _resend_only's query flushed the changes before it.
            job.updated_at = now
            log.warning("lease expired job_id=%d state=%s", job.id, job.state)
            count += 1
    return count


FINAL_STATES = (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


def _locked(session: Session, job_id: int) -> Job:
    """Return a job locked for an admin action, or raise naming the unknown id."""
    job = session.get(Job, job_id, with_for_update=True)
    if job is None:
        raise JobStateError(f"no job with id {job_id}")
    return job


def retry(sessions: sessionmaker[Session], job_id: int, who: str = "admin") -> Job:
    """Queue an ended job again, with a fresh attempt budget (``dicomnode jobs retry``).

    A job whose results were already made only re-sends them to the destinations
    that did not take them; otherwise the model runs again.

    Parameters
    ----------
    sessions : sessionmaker[Session]
        Database sessions.
    job_id : int
        The job.
    who : str
        Recorded in the job's history.

    Returns
    -------
    Job
        The job, now queued.

    Raises
    ------
    JobStateError
        If there is no such job or it has not ended.
    """
    with transaction(sessions) as session:
        job = _locked(session, job_id)
        now = database_now(session)
        if job.state not in FINAL_STATES:
            raise JobStateError(
                f"job {job_id} is {job.state.value}; only ended jobs can be retried"
            )
        series = session.get(Series, job.series_id)
        if series is not None and series.purged_at is not None:
            raise JobStateError(
                f"job {job_id}: its series' images were deleted by retention on "
                f"{series.purged_at:%Y-%m-%d %H:%M} UTC; send the series again to re-run it"
            )
        before = job.state
        _queue_afresh(job, now)
        # A fresh delivery window too: the outage that failed the job is not held
        # against the retry an admin asked for. Retrying a job that was done means
        # "send it again" (a PACS lost it): every destination gets the stored results
        # once more, under the same UIDs, so nothing is duplicated there.
        reopen = Delivery.job_id == job_id
        if before != JobState.DONE:
            reopen = reopen & (Delivery.state != DeliveryState.SENT)
        session.execute(
            update(Delivery)
            .where(reopen)
            .values(state=DeliveryState.PENDING, created_at=now, attempts=0)
        )
        record_event(
            session, job, JobState.QUEUED, from_state=before, note=f"retried by {who}", at=now
        )
        audit.record(session, "admin", actor=who, job_id=job_id, detail=f"jobs retry {job_id}")
        return job


def cancel(sessions: sessionmaker[Session], job_id: int, who: str = "admin") -> Job:
    """Cancel a job that has not ended (``dicomnode jobs cancel``).

    A running job's worker loses its lease at its next heartbeat and abandons the
    job at its next checkpoint; nothing it does afterwards can change the job.

    Parameters
    ----------
    sessions : sessionmaker[Session]
        Database sessions.
    job_id : int
        The job.
    who : str
        Recorded in the job's history.

    Returns
    -------
    Job
        The job, now cancelled.

    Raises
    ------
    JobStateError
        If there is no such job or it has already ended.
    """
    with transaction(sessions) as session:
        job = _locked(session, job_id)
        now = database_now(session)
        if job.state in FINAL_STATES:
            raise JobStateError(f"job {job_id} is already {job.state.value}")
        before = job.state
        job.state = JobState.CANCELLED
        job.lease_owner = None
        job.lease_expires_at = None
        job.finished_at = now
        job.last_error = f"cancelled by {who}"
        job.updated_at = now
        record_event(
            session, job, JobState.CANCELLED, from_state=before, note=job.last_error, at=now
        )
        audit.record(session, "admin", actor=who, job_id=job_id, detail=f"jobs cancel {job_id}")
        return job


def get(session: Session, job_id: int) -> Job:
    """Return one job by id.

    Parameters
    ----------
    session : Session
        The session.
    job_id : int
        The job's id.

    Returns
    -------
    Job
        The job.

    Raises
    ------
    LookupError
        If there is no such job (``main`` prints it as one line, exit 1).
    """
    job = session.get(Job, job_id)
    if job is None:
        raise LookupError(f"no job with id {job_id}")
    return job
