"""Retention: delete received instances (and our results) once nobody needs them.

A series may be deleted only when it is complete and every job it has is over:

* **done**: its jobs all ended done or cancelled (or no route matched it); deleted
  ``retention.done_days`` after the last one ended;
* **failed**: a job of it failed; kept ``retention.failed_days``, for a retry;
* anything else (still receiving, a job queued, running, waiting for another model
  or sending) is never deleted, by the schedule or by the emergency cleanup.

The **emergency cleanup** runs when the spool's disk has less free space than
``retention.emergency_free_mb``: it deletes *done* series ahead of schedule, the
oldest first, until there is enough again. It never deletes a failed one: the
listener's own watermark (``storage.min_free_mb``, status 0xA700) is the safe
answer to a disk that is still full then, because senders retry later and nothing
acknowledged is lost.

Each series is deleted in its own transaction, which locks the series and its jobs
and checks again that it may go, so that a late image (the series re-opens) or an
admin's retry racing with the sweep wins. Rows go first, files after the commit: a
crash in between leaves files without rows, which the orphan sweep removes. The
series, study, job and audit rows stay (``Series.purged_at`` says when), so
``dicomnode studies show`` still tells the whole story.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import and_, case, delete, func, select
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.config import RetentionSettings, StorageSettings
from dicomnode.db import (
    Delivery,
    Instance,
    Job,
    JobState,
    Output,
    Series,
    SeriesState,
    Study,
    audit,
    commitment,
    purge,
    queries,
    read_only,
    transaction,
    utcnow,
)
from dicomnode.store.spool import Spool

log = logging.getLogger(__name__)

ACTIVE = (JobState.QUEUED, JobState.RUNNING, JobState.SENDING)
DONE, FAILED = "done", "failed"


@dataclass(frozen=True)
class Candidate:
    """A series that retention may delete, and why."""

    series_id: int
    series_uid: str
    study_uid: str
    kind: str  # "done" or "failed"
    ended_at: datetime  # when its last job ended (or it completed)
    due_at: datetime  # when the schedule deletes it
    instances: int
    size_bytes: int  # its instances' and its results' files
    jobs: int

    def record(self) -> dict[str, Any]:
        """Return it as a JSON-ready mapping.

        Returns
        -------
        dict[str, Any]
            Its fields.
        """
        return asdict(self)


@dataclass
class Report:
    """What a retention run deleted (or, dry, would delete)."""

    dry_run: bool
    free_bytes: int
    emergency_below_bytes: int
    deleted: list[dict[str, Any]] = field(default_factory=list)
    freed_bytes: int = 0
    still_short: bool = False  # the emergency cleanup ran out of series it may delete

    @property
    def emergency(self) -> bool:
        """Whether the disk was below the emergency threshold when the run began."""
        return bool(self.emergency_below_bytes) and self.free_bytes < self.emergency_below_bytes


def classify(
    states: Iterable[JobState],
    last_finished: datetime | None,
    completed_at: datetime | None,
    last_received_at: datetime,
) -> tuple[str, datetime] | None:
    """Tell whether a complete series may be deleted: its kind and since when it ended.

    Parameters
    ----------
    states : Iterable[JobState]
        The states of all its jobs.
    last_finished : datetime or None
        When its last job ended.
    completed_at, last_received_at : datetime
        When it completed and when its last image arrived.

    Returns
    -------
    tuple[str, datetime] or None
        ``("done" | "failed", ended_at)``, or None when it must be kept (a job is
        still queued, running or sending).
    """
    states = list(states)
    if any(s in ACTIVE for s in states):
        return None
    ended = max(t for t in (last_finished, completed_at, last_received_at) if t is not None)
    return (FAILED if JobState.FAILED in states else DONE), ended


def _due(kind: str, ended: datetime, retention: RetentionSettings) -> datetime:
    days = retention.failed_days if kind == FAILED else retention.done_days
    return ended + timedelta(days=days)


def candidates(session: Session, retention: RetentionSettings) -> list[Candidate]:
    """List every complete series that may be deleted, the longest ended first.

    One aggregate query, whatever the number of series.

    Parameters
    ----------
    session : Session
        A session.
    retention : RetentionSettings
        ``done_days`` and ``failed_days``, for the due dates.

    Returns
    -------
    list[Candidate]
        Due or not: the caller decides (the schedule takes the due ones, the emergency
        cleanup the done ones).
    """
    job_stats = (
        select(
            Job.series_id.label("series_id"),
            func.count().label("jobs"),
            func.sum(case((Job.state.in_(ACTIVE), 1), else_=0)).label("active"),
            func.sum(case((Job.state == JobState.FAILED, 1), else_=0)).label("failed"),
            func.max(Job.finished_at).label("last_finished"),
        )
        .group_by(Job.series_id)
        .subquery()
    )
    files = (
        select(
            Instance.series_id.label("series_id"),
            func.count().label("instances"),
            func.sum(Instance.size_bytes).label("size_bytes"),
        )
        .group_by(Instance.series_id)
        .subquery()
    )
    # A delivery the PACS has not confirmed yet (storage commitment) may still need the
    # results re-sent: its series is kept as if its job were still running.
    # A filter, not another outer join: beside the big aggregates PostgreSQL planned
    # that join as a nested loop (0.9 s became 41 s for 20,000 series).
    awaiting = (
        select(Job.series_id).join(Delivery, Delivery.job_id == Job.id).where(commitment.awaiting())
    )
    results = (
        select(
            Job.series_id.label("series_id"),
            func.sum(Output.size_bytes).label("size_bytes"),
        )
        .join(Job, Output.job_id == Job.id)
        .group_by(Job.series_id)
        .subquery()
    )
    query = (
        select(
            Series.id,
            Series.series_uid,
            Study.study_uid,
            Series.completed_at,
            Series.last_received_at,
            job_stats.c.jobs,
            job_stats.c.active,
            job_stats.c.failed,
            job_stats.c.last_finished,
            files.c.instances,
            files.c.size_bytes,
            results.c.size_bytes.label("result_bytes"),
        )
        .join(Study, Series.study_id == Study.id)
        .outerjoin(job_stats, job_stats.c.series_id == Series.id)
        .outerjoin(files, files.c.series_id == Series.id)
        .outerjoin(results, results.c.series_id == Series.id)
        .where(
            and_(Series.state == SeriesState.COMPLETE, Series.purged_at.is_(None)),
            func.coalesce(job_stats.c.active, 0) == 0,
            Series.id.not_in(awaiting),
        )
    )
    found: list[Candidate] = []
    for row in session.execute(query):
        # MAX() keeps the column's type (UTCDateTime): aware on both databases.
        states = [JobState.FAILED] if row.failed else []
        verdict = classify(states, row.last_finished, row.completed_at, row.last_received_at)
        if verdict is None:
            continue
        kind, ended = verdict
        found.append(
            Candidate(
                series_id=row.id,
                series_uid=row.series_uid,
                study_uid=row.study_uid,
                kind=kind,
                ended_at=ended,
                due_at=_due(kind, ended, retention),
                instances=int(row.instances or 0),
                size_bytes=int(row.size_bytes or 0) + int(row.result_bytes or 0),
                jobs=int(row.jobs or 0),
            )
        )
    found.sort(key=lambda c: (c.ended_at, c.series_id))
    return found


def delete_series(
    sessions: sessionmaker[Session],
    spool: Spool,
    candidate: Candidate,
    reason: str,
    actor: str,
    rules: RetentionSettings | None = None,
) -> int | None:
    """Delete one series' instances and its jobs' results, if it may still go.

    Parameters
    ----------
    sessions : sessionmaker[Session]
        Database sessions.
    spool : Spool
        Where the files lie.
    candidate : Candidate
        The series, as :func:`candidates` found it.
    reason : str
        For the audit trail: ``scheduled`` or ``emergency`` and the rule.
    actor : str
        Who deletes: the scheduler's process, or the admin running ``purge``.
    rules : RetentionSettings, optional
        For a scheduled deletion: it must still be due by these rules (a failed job
        retried meanwhile may have ended done just now). None for the emergency
        cleanup, which takes done series whenever they ended.

    Returns
    -------
    int or None
        Bytes freed (on the database's count), or None when the series changed
        meanwhile (a late image re-opened it, a job was retried) and was kept.
    """
    now = utcnow()
    with transaction(sessions) as session:
        series = session.scalars(
            select(Series).where(Series.id == candidate.series_id).with_for_update()
        ).first()
        if series is None or series.purged_at is not None or series.state != SeriesState.COMPLETE:
            return None
        jobs = session.scalars(
            select(Job).where(Job.series_id == series.id).with_for_update()
        ).all()
        last = max((j.finished_at for j in jobs if j.finished_at is not None), default=None)
        verdict = classify(
            (j.state for j in jobs), last, series.completed_at, series.last_received_at
        )
        if verdict is None or (candidate.kind == DONE and verdict[0] != DONE):
            return None
        if rules is not None and _due(*verdict, rules) > now:
            return None
        job_ids = [j.id for j in jobs]
        if job_ids and session.scalar(
            select(func.count()).where(Delivery.job_id.in_(job_ids), commitment.awaiting())
        ):
            return None
        paths = list(
            session.execute(
                select(Instance.path, Instance.size_bytes).where(Instance.series_id == series.id)
            )
        )
        results = list(
            session.execute(
                select(Output.path, Output.size_bytes).where(
                    Output.job_id.in_([j.id for j in jobs])
                )
            )
        )
        session.execute(delete(Instance).where(Instance.series_id == series.id))
        # instance_count stays: how many were received is part of the series' story;
        # store.ingest counts afresh should the PACS send the series again.
        series.purged_at = now
        size = sum(int(s) for _, s in paths) + sum(int(s) for _, s in results)
        audit.record(
            session,
            "instances-deleted",
            actor=actor,
            study_uid=candidate.study_uid,
            series_uid=series.series_uid,
            count=len(paths),
            size_bytes=size,
            detail=f"{reason}; {len(results)} result file(s) too",
            at=now,
        )
    for path, _ in [*paths, *results]:
        try:
            spool.remove(path)
        except OSError as exc:  # the rows are gone; the orphan sweep gets the file later
            log.error("retention: cannot delete a file of series_uid=%s: %s", candidate.series_uid,
                      exc.strerror)  # fmt: skip
    for folder in sorted({Path(p).parent for p, _ in [*paths, *results]}, reverse=True):
        _remove_empty_parents(spool, folder / "x")
    log.info(
        "retention deleted series_uid=%s instances=%d results=%d bytes=%d reason=%s",
        candidate.series_uid,
        len(paths),
        len(results),
        size,
        reason,
    )
    return size


def _remove_empty_parents(spool: Spool, relative: Path) -> None:
    # incoming/<study>/<series>/ and results/<study>/<series>/: drop them once empty,
    # so the spool's folders keep matching what the database holds.
    for parent in list(relative.parents)[:2]:
        if len(parent.parts) < 2:
            return  # never the area itself (incoming/, results/)
        try:
            (spool.root / parent).rmdir()
        except OSError:
            return  # not empty (or already gone)


def run(
    sessions: sessionmaker[Session],
    spool: Spool,
    retention: RetentionSettings,
    storage: StorageSettings,
    *,
    dry_run: bool = False,
    actor: str = "retention",
) -> Report:
    """Delete what is due, and more (done series only) while the disk is below the threshold.

    Parameters
    ----------
    sessions : sessionmaker[Session]
        Database sessions.
    spool : Spool
        The spool.
    retention : RetentionSettings
        The rules.
    storage : StorageSettings
        For the default emergency threshold (twice ``min_free_mb``).
    dry_run : bool
        Only report what would go (the emergency part as if each deletion freed the
        bytes the database counts for it).
    actor : str
        Recorded in the audit trail.

    Returns
    -------
    Report
        What went.
    """
    now = utcnow()
    with read_only(sessions)() as session:  # the aggregate runs without the write lock
        found = candidates(session, retention)
    threshold = retention.emergency_free_bytes(storage)
    report = Report(dry_run=dry_run, free_bytes=spool.free_bytes(), emergency_below_bytes=threshold)

    def take(candidate: Candidate, why: str, emergency: bool = False) -> None:
        if dry_run:
            freed: int | None = candidate.size_bytes
        else:
            try:
                freed = delete_series(
                    sessions, spool, candidate, why, actor, None if emergency else retention
                )
            except Exception as exc:  # a deadlock, a lost connection: the next series may go
                log.error(
                    "retention: series_uid=%s not deleted: %s",
                    candidate.series_uid,
                    type(exc).__name__,
                )
                return
        if freed is not None:
            if not dry_run:
                from dicomnode import metrics  # prometheus_client: only once it deletes

                metrics.retention_deleted(why.split(":", 1)[0], freed)
            report.freed_bytes += freed
            report.deleted.append({**candidate.record(), "reason": why})

    rest: list[Candidate] = []
    for candidate in found:
        if candidate.due_at <= now:
            take(candidate, f"scheduled: {candidate.kind}, {candidate.kind}_days elapsed")
        else:
            rest.append(candidate)
    if report.emergency:
        free = report.free_bytes + report.freed_bytes if dry_run else spool.free_bytes()
        for candidate in rest:
            if free >= threshold:
                break
            if candidate.kind != DONE:
                continue  # failed ones wait for their admin, whatever the disk says
            before = report.freed_bytes
            take(candidate, "emergency: free space below retention.emergency_free_mb", True)
            free = free + report.freed_bytes - before if dry_run else spool.free_bytes()
        report.still_short = free < threshold
        if report.still_short and not dry_run:
            log.error(
                "retention: the spool's disk is still below retention.emergency_free_mb "
                "(%d MiB free) and nothing else may be deleted: failed series are kept for "
                "retention.failed_days (`dicomnode purge --dry-run` lists what is due)",
                free // 2**20,
            )
    return report


@dataclass(frozen=True)
class JobPurge:
    """What ``dicomnode jobs purge`` deleted (or would delete, in a dry run)."""

    jobs: tuple[queries.JobView, ...]  # read before their rows went
    files: list[str]  # result files only these jobs named, spool-relative
    kept: int  # aged jobs kept because a storage commitment is still awaited


def purge_jobs(
    sessions: sessionmaker[Session],
    spool: Spool,
    state: JobState,
    cutoff: datetime,
    *,
    dry_run: bool,
    actor: str,
) -> JobPurge:
    """Delete the rows of ended jobs that ended before ``cutoff``, and their result files.

    A job's history, output and delivery rows go with it, in one transaction with an
    audit entry, then the result files only they named (our copies of what was sent;
    nothing could refer to them any more). Received instances stay: retention deletes
    those, by its own rules. Jobs still awaiting a storage commitment are kept (see
    :func:`dicomnode.db.purge.select_ended`).

    Parameters
    ----------
    sessions : sessionmaker[Session]
        Database sessions.
    spool : Spool
        Where the result files are.
    state : JobState
        done, failed or cancelled.
    cutoff : datetime
        Jobs that ended before it.
    dry_run : bool
        Only say what would go.
    actor : str
        Who purges, for the audit entry.

    Returns
    -------
    JobPurge
        The jobs, the files and how many were kept.
    """
    if dry_run:
        with read_only(sessions)() as session:
            picked = purge.select_ended(session, state, cutoff, lock=False)
            files = purge.result_files(session, [j.id for j in picked.jobs])
            views = tuple(queries.view_of(j) for j in picked.jobs)
        return JobPurge(views, files, picked.kept)
    with transaction(sessions) as session:
        picked = purge.select_ended(session, state, cutoff, lock=True)
        views = tuple(queries.view_of(j) for j in picked.jobs)  # before the rows go
        ids = [j.id for j in picked.jobs]
        files = purge.result_files(session, ids)
        purge.delete_jobs(session, ids)
        if ids:
            audit.record(
                session,
                "admin",
                actor=actor,
                count=len(ids),
                detail=f"jobs purge --state {state.value} older than "
                f"{cutoff:%Y-%m-%d %H:%M:%S} UTC: job ids {ids[0]}..{ids[-1]}, "
                f"{len(files)} result file(s)"
                + (f"; {picked.kept} kept, storage commitment awaited" if picked.kept else ""),
            )
    # After the commit: a rollback must not have lost a file a row still names.
    for path in files:
        spool.remove(path)
    return JobPurge(views, files, picked.kept)
