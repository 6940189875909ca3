"""``dicomnode status``: is the node healthy, at a glance.

Exit code 0 when healthy, 1 when something needs attention: the listener does not
answer, the spool's disk is below ``storage.min_free_mb``, deliveries have failed,
or jobs failed in the last hour. Nothing here prints patient data: job errors and
event notes carry none by design, and only job ids, models, worker ids, counts and times
are shown.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dicomnode.cli.database import open_database
from dicomnode.cli.output import format_time, print_json, print_table
from dicomnode.config import ListenerSettings, Settings
from dicomnode.db import engine as db
from dicomnode.db import health, utcnow
from dicomnode.queue import wakeup

EXIT_HEALTHY, EXIT_ATTENTION = 0, 1
STALLED_AFTER = health.STALLED_AFTER
VERIFICATION = "1.2.840.10008.1.1"


@dataclass(frozen=True)
class ListenerCheck:
    """What probing our own listener found."""

    state: str  # "up", "down" or "not checked"
    detail: str


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


def _disk(spool: Path, min_free_mb: int) -> dict[str, Any]:
    # The spool may not exist yet on a fresh install: measure the disk it will be on.
    path = spool
    while not path.exists() and path != path.parent:
        path = path.parent
    usage = shutil.disk_usage(path)
    free_mb = usage.free // 2**20
    return {
        "path": str(spool),
        "free_mb": free_mb,
        "total_mb": usage.total // 2**20,
        "min_free_mb": min_free_mb,
        "below_watermark": bool(min_free_mb) and free_mb < min_free_mb,
    }


def collect(settings: Settings) -> dict[str, Any]:
    """Gather everything ``dicomnode status`` reports, except the listener check.

    Parameters
    ----------
    settings : Settings
        Database, spool path and disk watermark.

    Returns
    -------
    dict[str, Any]
        ``workers``, ``queue``, ``oldest_queued``, ``deliveries``, ``failed_last_hour``,
        ``stalled``, ``deliveries_failed_last_day``, ``failing_destinations``,
        ``last_errors`` and ``disk``.
    """
    engine = open_database(settings)
    try:
        found = db.read(engine, health.snapshot)
        source, processes = wakeup.waiting_workers(engine, settings.storage.path)
    finally:
        engine.dispose()
    return {
        "workers": {"busy": list(found.busy), "processes": processes, "processes_source": source},
        "queue": dict(found.queue),
        "oldest_queued": None if found.oldest_queued is None else asdict(found.oldest_queued),
        "deliveries": dict(found.deliveries),
        "failed_last_hour": found.failed_last_hour,
        "stalled": found.stalled,
        "deliveries_failed_last_day": found.deliveries_failed_last_day,
        # Their fields are the keys, in order: see health.FailingDestination, FailedAttempt.
        "failing_destinations": [asdict(d) for d in found.failing_destinations],
        "last_errors": [asdict(e) for e in found.last_errors],
        "disk": _disk(settings.storage.path, settings.storage.min_free_mb),
    }


def problems(report: dict[str, Any]) -> list[str]:
    """Return what needs an admin's attention in a status report (empty when healthy).

    Parameters
    ----------
    report : dict[str, Any]
        From :func:`collect`, with ``listener``.

    Returns
    -------
    list[str]
        One line each.
    """
    found = []
    if report["listener"]["state"] == "down":
        found.append(f"listener down: {report['listener']['detail']}")
    disk = report["disk"]
    if disk["below_watermark"]:
        found.append(
            f"disk: {disk['free_mb']} MiB free, below storage.min_free_mb "
            f"({disk['min_free_mb']} MiB): the listener refuses instances"
        )
    if report["deliveries_failed_last_day"]:
        found.append(f"{report['deliveries_failed_last_day']} delivery(ies) failed")
    for d in report["failing_destinations"]:
        # Deliveries still being retried are not "failed" yet, but a destination whose
        # latest attempts all failed is unreachable now: results are not arriving.
        found.append(
            f"destination {d['destination']}: latest delivery attempts failed since "
            f"{format_time(d['since'])} ({d['deliveries']} delivery(ies)): {d['error']}"
        )
    if report["stalled"]:
        found.append(
            f"{report['stalled']} job(s) could have run for over "
            f"{int(STALLED_AFTER.total_seconds() // 60)} min and no worker took them: are "
            "workers running, and do they take these models (worker.models)?"
        )
    if report["failed_last_hour"]:
        found.append(f"{report['failed_last_hour']} job(s) failed in the last hour")
    return found


def _age(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {secs}s" if minutes else f"{secs}s"


def _print_human(report: dict[str, Any]) -> None:
    listener = report["listener"]
    print(f"{'listener':<12}{listener['state']} ({listener['detail']})")
    workers = report["workers"]
    busy = workers["busy"]
    processes = "unknown" if workers["processes"] is None else str(workers["processes"])
    print(
        f"{'workers':<12}{len(busy)} busy{' (' + ', '.join(busy) + ')' if busy else ''}; "
        f"{processes} worker process(es) waiting for work ({workers['processes_source']})"
    )
    print(f"{'queue':<12}" + "  ".join(f"{k} {v}" for k, v in report["queue"].items()))
    oldest = report["oldest_queued"]
    if oldest is not None:
        print(
            f"{'oldest':<12}job {oldest['job_id']} queued {_age(oldest['age_s'])} ago "
            f"({format_time(oldest['created_at'])})"
        )
    d = report["deliveries"]
    print(f"{'deliveries':<12}{d['pending']} pending, {d['failed']} failed")
    disk = report["disk"]
    watermark = f"watermark {disk['min_free_mb']} MiB" if disk["min_free_mb"] else "no watermark"
    print(f"{'disk':<12}{disk['free_mb']} MiB free of {disk['total_mb']} ({watermark})")
    if report["last_errors"]:
        print("last errors")
        print_table(
            ["  JOB", "MODEL", "AT", "OUTCOME", "ERROR"],
            [
                [f"  {e['job_id']}", e["model"], format_time(e["at"]), e["outcome"], e["error"]]
                for e in report["last_errors"]
            ],
        )
    if report["problems"]:
        print("needs attention")
        for line in report["problems"]:
            print(f"  {line}")
    else:
        print("healthy")


def status(settings: Settings, args: argparse.Namespace) -> int:
    """Print the node's health (``dicomnode status``).

    Parameters
    ----------
    settings : Settings
        Database, spool, listener.
    args : argparse.Namespace
        ``json``, ``no_listener`` (skip the C-ECHO, on a host without a listener) and
        ``timeout`` (seconds for the C-ECHO).

    Returns
    -------
    int
        0 when healthy, 1 when something needs attention (see the module docstring).
    """
    report = collect(settings)
    if args.no_listener:
        check = ListenerCheck("not checked", "--no-listener")
    else:
        check = check_listener(settings.listener, args.timeout)
    report = {"listener": {"state": check.state, "detail": check.detail}, **report}
    report["problems"] = problems(report)
    report["healthy"] = not report["problems"]
    report["checked_at"] = utcnow()
    if args.json:
        print_json(report)
    else:
        _print_human(report)
    return EXIT_HEALTHY if report["healthy"] else EXIT_ATTENTION
