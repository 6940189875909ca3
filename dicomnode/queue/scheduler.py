"""Periodic housekeeping on APScheduler: completion sweep, lease reaper, orphan sweep."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.config import Settings
from dicomnode.db.jobs import reap_expired
from dicomnode.inference.registry import ModelSpec
from dicomnode.queue.completion import sweep
from dicomnode.store.orphans import remove_orphans
from dicomnode.store.spool import Spool

log = logging.getLogger(__name__)

REAPER_SECONDS = 15.0
ORPHAN_SWEEP_SECONDS = 3600.0


def _guarded(name: str, fn: Callable[[], object]) -> Callable[[], None]:
    def run() -> None:
        try:
            fn()
        except Exception:  # keep the schedule alive through a database hiccup
            log.exception("scheduled task %s failed", name)

    return run


def make_scheduler(
    settings: Settings,
    sessions: sessionmaker[Session],
    models: Mapping[str, ModelSpec],
    spool: Spool,
    *,
    completion: bool = True,
) -> BackgroundScheduler:
    """Create (but do not start) the housekeeping scheduler.

    Parameters
    ----------
    settings : Settings
        Sweep interval and routes.
    sessions : sessionmaker[Session]
        Database sessions.
    models : Mapping[str, ModelSpec]
        The model registry.
    spool : Spool
        The spool.
    completion : bool
        Run the completion sweep; a worker-only process leaves it to the listener.

    Returns
    -------
    BackgroundScheduler
        With the completion sweep and the lease reaper; each runs one at a time.
    """
    scheduler = BackgroundScheduler(
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30}
    )
    if completion:
        scheduler.add_job(
            _guarded("completion", lambda: sweep(sessions, settings, models, spool)),
            "interval",
            seconds=settings.completion.sweep_seconds,
            id="completion-sweep",
        )
        scheduler.add_job(
            _guarded("orphans", lambda: (remove_orphans(spool, sessions), spool.clean_tmp())),
            "interval",
            seconds=ORPHAN_SWEEP_SECONDS,
            next_run_time=datetime.now(UTC) + timedelta(seconds=60),
            id="orphan-sweep",
        )
    scheduler.add_job(
        _guarded("reaper", lambda: reap_expired(sessions)),
        "interval",
        seconds=REAPER_SECONDS,
        id="lease-reaper",
    )
    return scheduler
