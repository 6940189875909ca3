"""Is the node healthy: what ``dicomnode status`` gathers, and what it judges wrong.

The database's figures come from :mod:`dicomnode.db.health`; this module adds what
only a host can see (the free space of the spool's disk, whether our own listener
answers, which worker processes wait for work) and decides what needs an admin's
attention. Nothing here carries patient data: job errors and event notes carry none by
design, and only job ids, models, worker ids, counts and times are reported.
"""

from __future__ import annotations

import logging
import shutil
import socket
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from dicomnode.config import ListenerSettings, Settings
from dicomnode.db import engine as db
from dicomnode.db import health as db_health
from dicomnode.db import migrate, utcnow
from dicomnode.queue import wakeup

STALLED_AFTER = db_health.STALLED_AFTER
VERIFICATION = "1.2.840.10008.1.1"
# The CLI's table format for a time (dicomnode.cli.output.format_time), which the
# problems' lines share so that a time reads the same in them as in the tables.
_TIME_FORMAT = "%Y-%m-%d %H:%M:%S"


@dataclass(frozen=True)
class ListenerCheck:
    """What probing our own listener found."""

    state: str  # "up", "down" or "not checked"
    detail: str


@dataclass(frozen=True)
class Workers:
    """Who works: workers holding a job, and worker processes waiting for one."""

    busy: tuple[str, ...]  # lease owners of running jobs, sorted
    processes: int | None  # waiting for work; None when the database does not tell us
    processes_source: str  # how they were counted (the wake-up mechanism's own words)


@dataclass(frozen=True)
class Disk:
    """Free space on the spool's disk, against ``storage.min_free_mb``."""

    path: Path  # the spool, as configured
    free_mb: int
    total_mb: int
    min_free_mb: int  # 0: no watermark
    below_watermark: bool  # the listener refuses instances


@dataclass(frozen=True)
class HealthReport:
    """Everything ``dicomnode status`` reports, taken at ``checked_at``."""

    listener: ListenerCheck
    workers: Workers
    figures: db_health.Snapshot  # the queue and delivery figures, from the database
    disk: Disk
    checked_at: datetime

    @property
    def problems(self) -> list[str]:
        """What needs an admin's attention, one line each: see :func:`problems`."""
        return problems(self)

    @property
    def healthy(self) -> bool:
        """Whether nothing needs an admin's attention."""
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        """Return the report as ``dicomnode status --json`` prints it.

        Returns
        -------
        dict[str, Any]
            ``listener``, ``workers``, ``queue``, ``oldest_queued``, ``deliveries``,
            ``failed_last_hour``, ``stalled``, ``deliveries_failed_last_day``,
            ``failing_destinations``, ``last_errors``, ``disk``, ``problems``,
            ``healthy`` and ``checked_at``, in this order; times as datetimes.
        """
        figures = self.figures
        found = self.problems
        return {
            "listener": asdict(self.listener),
            "workers": {
                "busy": list(self.workers.busy),
                "processes": self.workers.processes,
                "processes_source": self.workers.processes_source,
            },
            "queue": dict(figures.queue),
            "oldest_queued": None
            if figures.oldest_queued is None
            else asdict(figures.oldest_queued),
            "deliveries": dict(figures.deliveries),
            "failed_last_hour": figures.failed_last_hour,
            "stalled": figures.stalled,
            "deliveries_failed_last_day": figures.deliveries_failed_last_day,
            # Their fields are the keys, in order: see db_health.FailingDestination,
            # FailedAttempt.
            "failing_destinations": [asdict(d) for d in figures.failing_destinations],
            "last_errors": [asdict(e) for e in figures.last_errors],
            "disk": {**asdict(self.disk), "path": str(self.disk.path)},
            "problems": found,
            "healthy": not found,
            "checked_at": self.checked_at,
        }


def _probe_host(host: str) -> str:
    # A wildcard bind address is reached on loopback.
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def check_listener(listener: ListenerSettings, timeout: float) -> ListenerCheck:
    """C-ECHO our own listener (a TCP connect when it speaks TLS).

    The listener records no heartbeat, so asking it is the only reliable sign that
    it is up. An association it rejects (our AE title is not in
    ``allowed_calling_aets``) still proves that it answers.

    Parameters
    ----------
    listener : ListenerSettings
        Its address, port and AE title.
    timeout : float
        Seconds to wait for each step.

    Returns
    -------
    ListenerCheck
        Up or down, and how we know.
    """
    host = _probe_host(listener.host)
    where = f"{listener.ae_title}@{host}:{listener.port}"
    if listener.tls_certificate is not None:
        # Our own client would need a certificate the listener trusts; that the port
        # accepts connections is what can be checked without one.
        try:
            with socket.create_connection((host, listener.port), timeout=timeout):
                return ListenerCheck("up", f"{where} accepts connections (TLS, not echoed)")
        except OSError as exc:
            return ListenerCheck("down", f"{where}: {exc.strerror or type(exc).__name__}")
    from pynetdicom import AE  # only for this check: keeps `status --no-listener` light

    pynetdicom_log = logging.getLogger("pynetdicom")
    level = pynetdicom_log.level
    if not logging.getLogger("dicomnode").isEnabledFor(logging.DEBUG):
        # Our line says what failed; pynetdicom's own error lines only repeat it.
        pynetdicom_log.setLevel(logging.CRITICAL)
    try:
        ae = AE(ae_title=listener.ae_title)
        ae.add_requested_context(VERIFICATION)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
        ae.connection_timeout = timeout
        assoc = ae.associate(host, listener.port, ae_title=listener.ae_title)
        if assoc.is_rejected:
            return ListenerCheck("up", f"{where} answers (association rejected: our AE title)")
        if not assoc.is_established:
            return ListenerCheck("down", f"{where} does not answer")
        try:
            reply = assoc.send_c_echo()
        finally:
            assoc.release()
    finally:
        pynetdicom_log.setLevel(level)
    if "Status" not in reply:
        return ListenerCheck("down", f"{where} accepted an association but did not echo")
    return ListenerCheck("up", f"{where} C-ECHO status 0x{int(reply.Status):04X}")


def check_disk(spool: Path, min_free_mb: int) -> Disk:
    """Measure the free space of the spool's disk.

    Parameters
    ----------
    spool : Path
        The spool; it may not exist yet on a fresh install, and then the disk it will
        be on is measured.
    min_free_mb : int
        ``storage.min_free_mb``; 0 for no watermark.

    Returns
    -------
    Disk
        Free and total MiB, and whether the free space is below the watermark.
    """
    path = spool
    while not path.exists() and path != path.parent:
        path = path.parent
    usage = shutil.disk_usage(path)
    free_mb = usage.free // 2**20
    return Disk(
        path=spool,
        free_mb=free_mb,
        total_mb=usage.total // 2**20,
        min_free_mb=min_free_mb,
        below_watermark=bool(min_free_mb) and free_mb < min_free_mb,
    )


def collect(settings: Settings, listener_timeout: float | None) -> HealthReport:
    """Gather the node's health: database figures, workers, disk, then the listener.

    Parameters
    ----------
    settings : Settings
        Database, spool path, disk watermark and listener.
    listener_timeout : float or None
        Seconds for each step of the listener check; None skips the check
        (``status --no-listener``, on a host without a listener).

    Returns
    -------
    HealthReport
        The report; its ``problems`` say what needs attention.

    Raises
    ------
    DatabaseNotFound
        If the SQLite file does not exist.
    DicomnodeError
        If the schema is not at the newest migration.
    """
    # Never creates a database, and never reads an old schema: see open_current.
    engine = migrate.open_current(settings.database.url)
    try:
        found = db.read(engine, db_health.snapshot)
        source, processes = wakeup.waiting_workers(engine, settings.storage.path)
    finally:
        engine.dispose()
    disk = check_disk(settings.storage.path, settings.storage.min_free_mb)
    if listener_timeout is None:
        listener = ListenerCheck("not checked", "--no-listener")
    else:
        listener = check_listener(settings.listener, listener_timeout)
    return HealthReport(
        listener=listener,
        workers=Workers(busy=found.busy, processes=processes, processes_source=source),
        figures=found,
        disk=disk,
        checked_at=utcnow(),
    )


def problems(report: HealthReport) -> list[str]:
    """Return what needs an admin's attention in a health report (empty when healthy).

    Parameters
    ----------
    report : HealthReport
        From :func:`collect`.

    Returns
    -------
    list[str]
        One line each: the listener, the disk, failed deliveries, unreachable
        destinations, stalled jobs, then jobs failed in the last hour.
    """
    found: list[str] = []
    if report.listener.state == "down":
        found.append(f"listener down: {report.listener.detail}")
    disk = report.disk
    if disk.below_watermark:
        found.append(
            f"disk: {disk.free_mb} MiB free, below storage.min_free_mb "
            f"({disk.min_free_mb} MiB): the listener refuses instances"
        )
    figures = report.figures
    if figures.deliveries_failed_last_day:
        found.append(f"{figures.deliveries_failed_last_day} delivery(ies) failed")
    for d in figures.failing_destinations:
        # Deliveries still being retried are not "failed" yet, but a destination whose
        # latest attempts all failed is unreachable now: results are not arriving.
        found.append(
            f"destination {d.destination}: latest delivery attempts failed since "
            f"{d.since.strftime(_TIME_FORMAT)} ({d.deliveries} delivery(ies)): {d.error}"
        )
    if figures.stalled:
        found.append(
            f"{figures.stalled} job(s) could have run for over "
            f"{int(STALLED_AFTER.total_seconds() // 60)} min and no worker took them: are "
            "workers running, and do they take these models (worker.models)?"
        )
    if figures.failed_last_hour:
        found.append(f"{figures.failed_last_hour} job(s) failed in the last hour")
    return found
