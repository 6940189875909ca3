"""Completion: a series with no new instance for the quiet period is complete.

The sweep marks it complete, matches the routes against its header, and queues
one job per route and model, all in one transaction, so a crash can never leave
a series complete without its jobs.

Which series to look at is decided in SQL by each series' own modality: a series
is a candidate once it has been quiet for the shortest period that can apply to
it (its modality's, or a shorter one of a route that may match it). Routes match
on the header, which only the sweep reads, so a route that lengthens the period
is applied then. Every candidate is visited at each sweep, so series waiting for
a long period never hold back those behind them; :class:`NotYetDue` remembers the
ones found early, so that their header is not read again before they may be due.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from sqlalchemy import ColumnElement, case, literal, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.config import REGEX_PREFIX, Route, Settings
from dicomnode.db import (
    URGENT,
    Instance,
    Job,
    Series,
    SeriesState,
    Study,
    UTCDateTime,
    enqueue,
    read_only,
    requeue_replaced,
    transaction,
    utcnow,
)
from dicomnode.errors import HeaderUnavailable
from dicomnode.imaging import ModelSpec
from dicomnode.imaging.routing import matching_routes, value_matches
from dicomnode.imaging.volumetric import why_not_volumetric
from dicomnode.store import Spool

log = logging.getLogger(__name__)


def series_header(session: Session, spool: Spool, series_id: int) -> Dataset:
    """Return the header (no pixels) of a series' first instance.

    Raises
    ------
    HeaderUnavailable
        If the series has no instance, or its file cannot be read.
    """
    path = session.scalar(
        select(Instance.path)
        .where(Instance.series_id == series_id)
        .order_by(Instance.instance_number, Instance.id)
        .limit(1)
    )
    if path is None:
        raise HeaderUnavailable("series has no instances")
    try:
        return pydicom.dcmread(spool.absolute(path), stop_before_pixels=True)
    except Exception as exc:  # e.g. shared storage briefly unavailable
        raise HeaderUnavailable(type(exc).__name__) from None


def routes_in_scope(settings: Settings, scope: str) -> list[Route]:
    """Return the routes of one scope, in configuration order.

    Parameters
    ----------
    settings : Settings
        The node's routes.
    scope : str
        ``"series"`` (one job per series) or ``"study"`` (one per study).

    Returns
    -------
    list[Route]
        Those routes.
    """
    return [r for r in settings.routes if r.scope == scope]


def series_routes(settings: Settings) -> list[Route]:
    """Return the routes that run on single series (not ``scope = "study"``)."""
    return routes_in_scope(settings, "series")


def queue_route(
    session: Session,
    settings: Settings,
    models: Mapping[str, ModelSpec],
    route: Route,
    series: Series,
    selection: dict[str, Any] | None = None,
) -> list[Job]:
    """Queue one job per model of ``route`` on ``series``, unless already queued or done.

    Parameters
    ----------
    session : Session
        The transaction that completes the series (or the study).
    settings : Settings
        The worker's attempt limit.
    models : Mapping[str, ModelSpec]
        The model registry.
    route : Route
        The route: its models and priority.
    series : Series
        The input series.
    selection : dict, optional
        For a study-scope route: why this series was chosen.

    Returns
    -------
    list[Job]
        The jobs queued now (an existing idempotency key queues none).
    """
    queued = []
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
            selection=selection,
        )
        if job is None and selection is not None:
            # Chosen again after another series had replaced it: its job comes back.
            job = requeue_replaced(
                session,
                series,
                route=route.name,
                model=spec.name,
                version=spec.version,
                selection=selection,
            )
        if job is not None:
            queued.append(job)
    return queued


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


def _may_match(route: Route, modality: str | None, listed: set[str]) -> bool:
    """Return whether ``route`` may match a series of ``modality``.

    ``None`` stands for every modality without a period of its own (not in ``listed``),
    and for a series without one. Only the route's Modality rule is judged here; its
    other rules need the header.
    """
    wanted = route.match.get("Modality")
    if wanted is None:
        return True
    if modality is not None:
        return value_matches(modality, wanted)
    values = wanted if isinstance(wanted, list) else [wanted]
    return any(w.startswith(REGEX_PREFIX) or w not in listed for w in values)


def earliest_quiet(settings: Settings) -> tuple[dict[str, float], float]:
    """Return the shortest quiet period that can apply to a series, by its Modality.

    A series' period is its modality's (or the default), unless routes that match its
    header set their own (see :func:`quiet_seconds`). Which routes match is known only
    from the header, so every route that may match the modality and sets a period
    bounds it from below. A series is a candidate for the sweep once quiet this long.

    Parameters
    ----------
    settings : Settings
        The completion settings and routes.

    Returns
    -------
    tuple[dict[str, float], float]
        Seconds for each modality with a period of its own, and for all the others
        (and a series without a Modality).
    """
    completion = settings.completion
    listed = set(completion.modality_quiet_seconds)

    def earliest(modality: str | None) -> float:
        own = [
            r.quiet_seconds
            for r in series_routes(settings)
            if r.quiet_seconds is not None and _may_match(r, modality, listed)
        ]
        return min([completion.quiet_for(modality), *own])

    return {m: earliest(m) for m in sorted(listed)}, earliest(None)


@dataclass
class NotYetDue:
    """Series whose header the sweep read and found not quiet long enough for its routes.

    They stay candidates (their modality's period has passed), but their header is not
    read again, nor their row locked, until the time their routes ask for, unless a new
    instance arrives meanwhile (which changes ``last_received_at``). Kept by the process
    that sweeps; forgetting it costs only header reads.
    """

    until: dict[int, tuple[datetime, datetime]] = field(default_factory=dict)

    def waiting(self, series_id: int, last_received_at: datetime, now: datetime) -> bool:
        """Return whether the series is known not to be due yet."""
        known = self.until.get(series_id)
        return known is not None and known[0] == last_received_at and now < known[1]

    def remember(self, series_id: int, last_received_at: datetime, due: datetime | None) -> None:
        """Note when the series, as last received at ``last_received_at``, is due.

        ``None`` forgets it (it was completed, or someone else had it locked).
        """
        if due is None:
            self.until.pop(series_id, None)
        else:
            self.until[series_id] = (last_received_at, due)

    def keep(self, series_ids: set[int]) -> None:
        """Forget every series but these (the candidates of a whole sweep)."""
        self.until = {k: v for k, v in self.until.items() if k in series_ids}


def sweep(
    sessions: sessionmaker[Session],
    settings: Settings,
    models: Mapping[str, ModelSpec],
    spool: Spool,
    now: datetime | None = None,
    not_yet: NotYetDue | None = None,
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
    not_yet : NotYetDue, optional
        Series found not due at an earlier sweep (the scheduler keeps one); without it
        their headers are read again each sweep.

    Returns
    -------
    int
        How many series were completed.
    """
    now = now or utcnow()
    # Without the scheduler's, one for this sweep alone: it remembers nothing past it.
    not_yet = not_yet if not_yet is not None else NotYetDue()
    due, latest_cutoff = _due(settings, now)
    # One short read of every candidate (past its modality's period: 20,000 of them take
    # 0.1-0.2 s); then each is judged, and completed, in its own transaction. Read-only:
    # on SQLite it takes no write lock from the listener.
    with read_only(sessions)() as session:
        candidates = session.execute(
            select(Series.id, Series.last_received_at)
            # The bare range lets the (state, last_received_at) index bound the scan and
            # give the order; ``due`` then filters each series by its own period.
            .where(
                Series.state == SeriesState.RECEIVING, Series.last_received_at <= latest_cutoff, due
            )
            .order_by(Series.last_received_at)
        ).all()
    completed = 0
    for series_id, received in candidates:
        if not_yet.waiting(series_id, received, now):
            continue
        try:
            done, not_before = _complete(sessions, settings, models, spool, series_id, due, now)
        except HeaderUnavailable as exc:
            # Rolled back: the series stays receiving and the next sweep tries again, so
            # a storage hiccup never completes a series without its jobs.
            log.error("series id %d: cannot read a header for routing (%s)", series_id, exc)
            continue
        completed += done
        not_yet.remember(series_id, received, not_before)
    not_yet.keep({series_id for series_id, _ in candidates})
    return completed


def _due(settings: Settings, now: datetime) -> tuple[ColumnElement[bool], datetime]:
    """Return the SQL test of a series being a candidate, and the latest cutoff of all.

    A candidate has been quiet for the shortest period that can apply to its modality
    (:func:`earliest_quiet`), or is counted and complete for the counted period.
    """
    by_modality, others = earliest_quiet(settings)

    def cutoff(seconds: float) -> datetime:
        return now - timedelta(seconds=seconds)

    def at(seconds: float) -> ColumnElement[datetime]:
        return literal(cutoff(seconds), UTCDateTime())

    limit: ColumnElement[datetime] = at(others)
    if by_modality:
        limit = case(*((Series.modality == m, at(s)) for m, s in by_modality.items()), else_=limit)
    counted = settings.completion.counted_quiet_seconds
    due = or_(
        Series.last_received_at <= limit,
        # Every announced image is in: no need to wait the whole quiet period.
        (Series.expected_instances == Series.instance_count)
        & (Series.last_received_at <= cutoff(counted)),
    )
    shortest = min([others, counted, *by_modality.values()])
    return due, cutoff(shortest)


def _complete(
    sessions: sessionmaker[Session],
    settings: Settings,
    models: Mapping[str, ModelSpec],
    spool: Spool,
    series_id: int,
    due: ColumnElement[bool],
    now: datetime,
) -> tuple[int, datetime | None]:
    """Complete one series and queue its jobs in one transaction.

    Returns 1 if it was completed, else 0; and when its routes want it quiet for
    longer, the time they do (None otherwise).
    """
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
            return 0, None
        if series.prior:
            # Retrieved for a job's comparison: it runs no routes of its own.
            series.state = SeriesState.COMPLETE
            series.completed_at = now
            log.info("series complete series_uid=%s: a prior, no routes", series.series_uid)
            return 1, None
        header = series_header(session, spool, series.id)
        routes = matching_routes(series_routes(settings), header)
        quiet = quiet_seconds(settings, series.modality, routes)
        if series.expected_instances is not None and (
            series.instance_count == series.expected_instances
        ):
            quiet = min(quiet, settings.completion.counted_quiet_seconds)
        if series.last_received_at > now - timedelta(seconds=quiet):
            # Quiet for as long as its modality asks, not yet as long as its routes do.
            return 0, series.last_received_at + timedelta(seconds=quiet)
        series.state = SeriesState.COMPLETE
        series.completed_at = now
        if len(series_routes(settings)) < len(settings.routes):
            # The study's study-scope routes judge it again once it is quiet.
            session.execute(
                update(Study).where(Study.id == series.study_id).values(pending_since=now)
            )
        queued = 0
        skipped = why_not_volumetric(header, series.instance_count)
        if skipped is not None and routes:
            log.info(
                "series complete series_uid=%s: not a volume (%s), no jobs for routes %s",
                series.series_uid,
                skipped,
                ",".join(r.name for r in routes),
            )
            return 1, None
        for route in routes:
            queued += len(queue_route(session, settings, models, route, series))
        log.info(
            "series complete series_uid=%s instances=%d generation=%d routes=%s jobs=%d",
            series.series_uid,
            series.instance_count,
            series.generation,
            ",".join(r.name for r in routes) or "-",
            queued,
        )
        return 1, None
