"""Study completion: routes with ``scope = "study"`` run once per study, on its best series.

A study is complete when every series of it is complete (each by the series rules:
quiet, or counted) and nothing of it has arrived for the study's quiet period. The
series sweep marks a study pending whenever one of its series completes; this sweep
then judges every pending study that is quiet: for each study-scope route it gathers
the study's series, lets :mod:`dicomnode.imaging.selection` choose one, and queues the
route's jobs on it, in one transaction with the study's new state.

A late series (or a late image re-opening a series) completes again later, which marks
the study pending again: the study is re-opened and judged anew. When the choice is the
same series of the same generation, its job's idempotency key already exists and
nothing runs twice; when it differs, the new choice is queued and the jobs still queued
for the old one are cancelled.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import case, func, literal, select
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.config import Route, Settings
from dicomnode.db import (
    Instance,
    Series,
    SeriesState,
    Study,
    UTCDateTime,
    cancel_replaced,
    read_only,
    transaction,
    utcnow,
)
from dicomnode.errors import HeaderUnavailable
from dicomnode.imaging import ModelSpec
from dicomnode.imaging.selection import Candidate, choose, read_positions
from dicomnode.queue.completion import queue_route, routes_in_scope, series_header
from dicomnode.store import Spool

log = logging.getLogger(__name__)


def study_routes(settings: Settings) -> list[Route]:
    """Return the routes with ``scope = "study"``, in configuration order."""
    return routes_in_scope(settings, "study")


def study_quiet_seconds(settings: Settings) -> float:
    """Return how long a study must be quiet: the longest study route's own, or the default.

    Parameters
    ----------
    settings : Settings
        The completion settings and routes.

    Returns
    -------
    float
        Seconds.
    """
    own = [r.quiet_seconds for r in study_routes(settings) if r.quiet_seconds is not None]
    return max(own) if own else settings.completion.study_quiet_seconds


def sweep_studies(
    sessions: sessionmaker[Session],
    settings: Settings,
    models: Mapping[str, ModelSpec],
    spool: Spool,
    now: datetime | None = None,
) -> int:
    """Complete the pending studies that are quiet and queue their study-scope jobs.

    Parameters
    ----------
    sessions : sessionmaker[Session]
        Database sessions.
    settings : Settings
        Routes, quiet periods, retry settings.
    models : Mapping[str, ModelSpec]
        The model registry.
    spool : Spool
        Where the instances lie (headers are read to choose a series).
    now : datetime, optional
        The current time (for tests); the clock otherwise.

    Returns
    -------
    int
        How many studies were completed.
    """
    routes = study_routes(settings)
    if not routes:
        return 0
    now = now or utcnow()
    cutoff = now - timedelta(seconds=study_quiet_seconds(settings))
    with read_only(sessions)() as session:
        # Only pending studies are looked at (an index bounds the scan); a study with a
        # series still receiving, or quiet for too short a time, waits for a later sweep.
        pending = session.scalars(
            select(Study.id)
            .join(Series, Series.study_id == Study.id)
            .where(Study.pending_since.is_not(None))
            .group_by(Study.id)
            .having(
                func.sum(case((Series.state == SeriesState.RECEIVING, 1), else_=0)) == 0,
                func.max(Series.last_received_at) <= literal(cutoff, UTCDateTime()),
            )
            .order_by(Study.id)
        ).all()
    completed = 0
    for study_id in pending:
        try:
            completed += _complete_study(sessions, settings, models, spool, study_id, cutoff, now)
        except HeaderUnavailable as exc:
            # Rolled back: the study stays pending and the next sweep tries again.
            log.error("study id %d: cannot read a header to choose a series (%s)", study_id, exc)
    return completed


def _complete_study(
    sessions: sessionmaker[Session],
    settings: Settings,
    models: Mapping[str, ModelSpec],
    spool: Spool,
    study_id: int,
    cutoff: datetime,
    now: datetime,
) -> int:
    """Judge one study for every study-scope route and queue the chosen jobs.

    Returns 1 when the study was completed, 0 when another sweep has it or an image
    arrived since the query.
    """
    with transaction(sessions) as session:
        study = session.scalar(
            select(Study)
            .where(Study.id == study_id, Study.pending_since.is_not(None))
            .with_for_update(skip_locked=True)
        )
        if study is None:
            return 0
        series = session.scalars(
            select(Series)
            .where(Series.study_id == study_id, Series.purged_at.is_(None))
            .order_by(Series.id)
        ).all()
        # Re-check under the lock: a series may have started or re-opened meanwhile.
        if any(s.state == SeriesState.RECEIVING for s in series) or not series:
            return 0
        if max(s.last_received_at for s in series) > cutoff:
            return 0
        if study.completed_at is not None:
            study.generation += 1
        study.completed_at = now
        study.pending_since = None
        routes = study_routes(settings)
        needs_positions = any(r.select.distinct_positions for r in routes)
        candidates: dict[int, Candidate] = {}
        unreadable: list[str] = []
        for member in series:
            try:
                candidates[member.id] = _candidate(session, spool, member, needs_positions)
            except HeaderUnavailable:
                # One series that cannot be read (no instances left, a file gone) must
                # not hold back the whole study: it is listed, and never chosen.
                unreadable.append(member.series_uid)
        by_uid = {s.series_uid: s for s in series}
        selections: dict[str, Any] = {}
        queued = 0
        for route in routes:
            choice = choose(route, list(candidates.values()), unreadable)
            choice["study_generation"] = study.generation
            selections[route.name] = choice
            chosen = by_uid.get(choice["chosen"] or "")
            if chosen is None:
                log.info(
                    "study complete study_uid=%s route=%s: %s",
                    study.study_uid,
                    route.name,
                    choice["why"],
                )
                continue
            queued += _queue(session, settings, models, route, study, chosen, choice)
        study.selections = selections
        log.info(
            "study complete study_uid=%s series=%d generation=%d jobs=%d",
            study.study_uid,
            len(series),
            study.generation,
            queued,
        )
        return 1


def _queue(
    session: Session,
    settings: Settings,
    models: Mapping[str, ModelSpec],
    route: Route,
    study: Study,
    chosen: Series,
    choice: dict[str, Any],
) -> int:
    """Queue ``route``'s models on the chosen series; cancel its jobs for an older choice.

    The same series and generation as before queues nothing: its jobs stand.
    """
    queued = queue_route(session, settings, models, route, chosen, selection=choice)
    for job in queued:
        cancelled = cancel_replaced(session, study.id, route.name, job.model, job.id)
        if cancelled:
            log.info(
                "study re-opened study_uid=%s route=%s: %d queued job(s) superseded",
                study.study_uid,
                route.name,
                cancelled,
            )
    return len(queued)


def _candidate(session: Session, spool: Spool, series: Series, positions: bool) -> Candidate:
    """Gather what the selection needs about one series (its header, counts, positions)."""
    header = series_header(session, spool, series.id)
    points = None
    if positions:
        paths = session.scalars(select(Instance.path).where(Instance.series_id == series.id))
        points = read_positions(spool.absolute(p) for p in paths)
    return Candidate(
        series_uid=series.series_uid,
        header=header,
        instances=series.instance_count,
        positions=points,
    )
