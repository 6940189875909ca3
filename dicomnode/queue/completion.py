"""Completion: a series with no new instance for the quiet period is complete.

The sweep marks it complete, matches the routes against its header, and queues
one job per route and model, all in one transaction, so a crash can never leave
a series complete without its jobs.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta

import pydicom
from pydicom.dataset import Dataset
from sqlalchemy import ColumnElement, or_, select
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.config import Route, Settings
from dicomnode.db.engine import transaction
from dicomnode.db.jobs import URGENT, enqueue
from dicomnode.db.models import Instance, Series, SeriesState, utcnow
from dicomnode.inference.registry import ModelSpec
from dicomnode.queue.routing import matching_routes
from dicomnode.queue.volumetric import why_not_volumetric
from dicomnode.store.spool import Spool

log = logging.getLogger(__name__)

SWEEP_BATCH = 100


class HeaderUnavailable(Exception):
    """No instance header of the series can be read right now; try the next sweep."""


def _header(session: Session, spool: Spool, series: Series) -> Dataset:
    path = session.scalar(
        select(Instance.path)
        .where(Instance.series_id == series.id)
        .order_by(Instance.instance_number, Instance.id)
        .limit(1)
    )
    if path is None:
        raise HeaderUnavailable("series has no instances")
    try:
        return pydicom.dcmread(spool.absolute(path), stop_before_pixels=True)
    except Exception as exc:  # e.g. shared storage briefly unavailable
        raise HeaderUnavailable(type(exc).__name__) from None


def quiet_seconds(settings: Settings, modality: str | None, routes: Sequence[Route]) -> float:
    """Return how long a series must be quiet before it is complete.

    The modality's period (or the default) applies, unless matching routes set their
    own: then the longest of theirs, so that no route gets a series too early.

    Parameters
    ----------
    settings : Settings
        The completion settings.
    modality : str or None
        The series' Modality.
    routes : Sequence[Route]
        The routes that match the series.

    Returns
    -------
    float
        Seconds.
    """
    base = settings.completion.quiet_for(modality)
    own = [r.quiet_seconds for r in routes if r.quiet_seconds is not None]
    return max(own) if own else base


def shortest_quiet(settings: Settings) -> float:
    """Return the shortest quiet period of any modality or route (which series to look at)."""
    periods = [settings.completion.quiet_seconds]
    periods += [float(v) for v in settings.completion.modality_quiet_seconds.values()]
    periods += [r.quiet_seconds for r in settings.routes if r.quiet_seconds is not None]
    return min(periods)


def sweep(
    sessions: sessionmaker[Session],
    settings: Settings,
    models: Mapping[str, ModelSpec],
    spool: Spool,
    now: datetime | None = None,
) -> int:
    """Complete the series that have been quiet long enough and queue their jobs.

    Parameters
    ----------
    sessions : sessionmaker[Session]
        Database sessions.
    settings : Settings
        Routes, quiet period, retry settings.
    models : Mapping[str, ModelSpec]
        The model registry.
    spool : Spool
        Where the instances lie (the header of one is read for routing).
    now : datetime, optional
        The current time (for tests); the clock otherwise.

    Returns
    -------
    int
        How many series were completed.
    """
    now = now or utcnow()
    cutoff = now - timedelta(seconds=shortest_quiet(settings))
    counted_cutoff = now - timedelta(seconds=settings.completion.counted_quiet_seconds)
    due = or_(
        Series.last_received_at <= cutoff,
        # Every announced image is in: no need to wait the whole quiet period.
        (Series.expected_instances == Series.instance_count)
        & (Series.last_received_at <= counted_cutoff),
    )
    with sessions() as session:
        candidates = session.scalars(
            select(Series.id)
            .where(Series.state == SeriesState.RECEIVING, due)
            .order_by(Series.last_received_at)
            .limit(SWEEP_BATCH)
        ).all()
    completed = 0
    for series_id in candidates:
        try:
            completed += _complete(sessions, settings, models, spool, series_id, due, now)
        except HeaderUnavailable as exc:
            # Rolled back: the series stays receiving and the next sweep tries again, so
            # a storage hiccup never completes a series without its jobs.
            log.error("series id %d: cannot read a header for routing (%s)", series_id, exc)
    return completed


def _complete(
    sessions: sessionmaker[Session],
    settings: Settings,
    models: Mapping[str, ModelSpec],
    spool: Spool,
    series_id: int,
    due: ColumnElement[bool],
    now: datetime,
) -> int:
    """Complete one series and queue its jobs in one transaction; return 1 if done."""
    with transaction(sessions) as session:
        # Re-check under the lock: an instance may have arrived since the query.
        series = session.scalar(
            select(Series)
            .where(
                Series.id == series_id,
                Series.state == SeriesState.RECEIVING,
                due,
            )
            .with_for_update(skip_locked=True)
        )
        if series is None:
            return 0
        header = _header(session, spool, series)
        routes = matching_routes(settings.routes, header)
        quiet = quiet_seconds(settings, series.modality, routes)
        if series.expected_instances is not None and (
            series.instance_count == series.expected_instances
        ):
            quiet = min(quiet, settings.completion.counted_quiet_seconds)
        if series.last_received_at > now - timedelta(seconds=quiet):
            return 0  # quiet long enough for some series, not yet for this one
        series.state = SeriesState.COMPLETE
        series.completed_at = now
        queued = 0
        skipped = why_not_volumetric(header, series.instance_count)
        if skipped is not None and routes:
            log.info(
                "series complete series_uid=%s: not a volume (%s), no jobs for routes %s",
                series.series_uid,
                skipped,
                ",".join(r.name for r in routes),
            )
            return 1
        for route in routes:
            for name in route.models:
                spec = models.get(name)
                if spec is None:  # refused at start-up; kept for safety
                    log.error("route %s names unknown model %s", route.name, name)
                    continue
                job = enqueue(
                    session,
                    series,
                    route=route.name,
                    model=spec.name,
                    version=spec.version,
                    max_attempts=settings.worker.max_attempts,
                    priority=URGENT if route.priority == "urgent" else 0,
                )
                queued += job is not None
        log.info(
            "series complete series_uid=%s instances=%d generation=%d routes=%s jobs=%d",
            series.series_uid,
            series.instance_count,
            series.generation,
            ",".join(r.name for r in routes) or "-",
            queued,
        )
        return 1
