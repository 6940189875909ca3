"""Periodic housekeeping on APScheduler: completion sweep, lease reaper, orphan sweep."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.config import Settings
from dicomnode.db import commitment, reap_expired
from dicomnode.imaging import ModelSpec
from dicomnode.queue.completion import NotYetDue, sweep
from dicomnode.queue.study import sweep_studies
from dicomnode.queue.wakeup import Doorbell
from dicomnode.store import Spool, remove_orphans, retention

log = logging.getLogger(__name__)

ORPHAN_SWEEP_SECONDS = 3600.0
# How often overdue storage commitments are looked for; timeouts are minutes to hours.
COMMITMENT_SWEEP_SECONDS = 60.0
# How often the spool's free space is compared with retention's emergency threshold:
# a statvfs() call, while receiving at 100 MB/s fills a disk in minutes, not hours.
DISK_WATCH_SECONDS = 15.0


def _guarded(name: str, fn: Callable[[], object]) -> Callable[[], None]:
    def run() -> None:
        try:
            fn()
        except Exception:  # keep the schedule alive through a database hiccup
            log.exception("scheduled task %s failed", name)

    return run


def _sweep_and_ring(
    sessions: sessionmaker[Session],
    settings: Settings,
    models: Mapping[str, ModelSpec],
    spool: Spool,
    doorbell: Doorbell | None,
    not_yet: NotYetDue,
) -> None:
    series = sweep(sessions, settings, models, spool, not_yet=not_yet)
    # After the series: a study is complete only once all of its series are.
    studies = sweep_studies(sessions, settings, models, spool)
    if (series or studies) and doorbell is not None:
        doorbell.announce()


def _reap_and_ring(sessions: sessionmaker[Session], doorbell: Doorbell | None) -> None:
    if reap_expired(sessions, by=f"reaper {socket.gethostname()}:{os.getpid()}") and doorbell:
        doorbell.announce()  # the re-queued jobs can run now, on any worker


def _expire_and_ring(
    sessions: sessionmaker[Session], settings: Settings, doorbell: Doorbell | None
) -> None:
    timeouts = {
        d.name: d.commitment_timeout_seconds for d in settings.destinations if d.storage_commitment
    }
    if commitment.expire(sessions, timeouts) and doorbell is not None:
        doorbell.announce()  # the re-opened deliveries' jobs re-send now


def _retention(
    settings: Settings, sessions: sessionmaker[Session], spool: Spool
) -> retention.Report:
    return retention.run(
        sessions,
        spool,
        settings.retention,
        settings.storage,
        actor=f"retention {socket.gethostname()}:{os.getpid()}",
    )


class _DiskWatch:
    """Start the emergency cleanup when the spool runs low, and not in a tight loop.

    When a cleanup found nothing more it may delete, the next one waits for
    ``RETRY_SECONDS`` (or until free space drops further): what it would find is the
    same, and the listener's watermark keeps the disk safe meanwhile.
    """

    RETRY_SECONDS = 300.0

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], spool: Spool) -> None:
        self.settings, self.sessions, self.spool = settings, sessions, spool
        self._short_since: float | None = None
        self._short_free = 0

    def __call__(self) -> None:
        threshold = self.settings.retention.emergency_free_bytes(self.settings.storage)
        free = self.spool.free_bytes()
        if not threshold or free >= threshold:
            self._short_since = None
            return
        if (
            self._short_since is not None
            and time.monotonic() - self._short_since < self.RETRY_SECONDS
            and free >= self._short_free
        ):
            return
        log.warning(
            "spool below retention.emergency_free_mb (%d MiB free): emergency cleanup",
            free // 2**20,
        )
        report = _retention(self.settings, self.sessions, self.spool)
        if report.still_short:
            self._short_since, self._short_free = time.monotonic(), self.spool.free_bytes()
        else:
            self._short_since = None


def make_scheduler(
    settings: Settings,
    sessions: sessionmaker[Session],
    models: Mapping[str, ModelSpec],
    spool: Spool,
    *,
    completion: bool = True,
    doorbell: Doorbell | None = None,
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
    doorbell : Doorbell, optional
        Announced after a sweep that queued jobs or a reap that re-queued them, to
        wake idle workers here and in other processes.

    Returns
    -------
    BackgroundScheduler
        With the completion sweep, the orphan sweep, retention and its disk watch (in
        the process that runs the completion sweep), the lease reaper and, when a
        destination asks for storage commitment, the sweep for overdue commitments;
        each runs one at a time.
    """
    scheduler = BackgroundScheduler(
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30}
    )
    if completion:
        not_yet = NotYetDue()  # this process's memory of series its routes hold back
        scheduler.add_job(
            _guarded(
                "completion",
                lambda: _sweep_and_ring(sessions, settings, models, spool, doorbell, not_yet),
            ),
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
        if settings.retention.enabled:
            # With the completion sweep: one place per site (the listener's process)
            # deletes, and worker hosts sharing the spool leave it alone.
            scheduler.add_job(
                _guarded("retention", lambda: _retention(settings, sessions, spool)),
                "interval",
                minutes=settings.retention.sweep_minutes,
                next_run_time=datetime.now(UTC) + timedelta(seconds=30),
                id="retention",
            )
            if settings.retention.emergency:
                scheduler.add_job(
                    _guarded("disk-watch", _DiskWatch(settings, sessions, spool)),
                    "interval",
                    seconds=DISK_WATCH_SECONDS,
                    id="disk-watch",
                )
    scheduler.add_job(
        _guarded("reaper", lambda: _reap_and_ring(sessions, doorbell)),
        "interval",
        seconds=settings.worker.reap_seconds,
        id="lease-reaper",
    )
    if any(d.storage_commitment for d in settings.destinations):
        scheduler.add_job(
            _guarded("commitments", lambda: _expire_and_ring(sessions, settings, doorbell)),
            "interval",
            seconds=COMMITMENT_SWEEP_SECONDS,
            id="commitment-sweep",
        )
    return scheduler
