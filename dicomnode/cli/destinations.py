"""``dicomnode destinations``: the configured PACS, how delivering to them goes, C-ECHO.

``destinations list`` prints the ``[[destinations]]`` of the configuration and, from
the database when it can be read, what was delivered to each: a node whose database
is down still shows its configuration (with a one-line note on stderr).
``destinations echo`` checks that each destination answers a C-ECHO.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import asdict
from datetime import datetime
from typing import Any

from dicomnode.cli.output import first_line, format_time, print_json, print_table
from dicomnode.config import Destination, Settings
from dicomnode.db import DeliveryCounts, health

log = logging.getLogger("dicomnode")

# How long `destinations list` waits for a PostgreSQL server before it gives up on
# the database part.
CONNECT_TIMEOUT_S = 5


def _config_record(destination: Destination) -> dict[str, Any]:
    return {
        "name": destination.name,
        "configured": True,
        "ae_title": destination.ae_title,
        "host": destination.host,
        "port": destination.port,
        "tls": destination.tls_ca is not None,
        "storage_commitment": destination.storage_commitment,
        "timeout_seconds": destination.timeout_seconds,
    }


def delivery_statistics(settings: Settings) -> dict[str, DeliveryCounts]:
    """Count the deliveries per destination, with the last sending and the last error.

    Parameters
    ----------
    settings : Settings
        The database.

    Returns
    -------
    dict[str, DeliveryCounts]
        Per destination name (configured or not: deliveries outlive a renamed
        destination): ``sent``, ``pending``, ``failed``, ``last_sent_at`` and
        ``last_error`` (the first line of the newest delivery's error that has one).

    Raises
    ------
    Exception
        Whatever stops the database from being read: not found, unreachable, not
        migrated (:class:`~dicomnode.errors.DicomnodeError`).
    """
    return health.delivery_statistics_at(settings.database.url, CONNECT_TIMEOUT_S)


def list_destinations(settings: Settings, args: argparse.Namespace) -> int:
    """Print the configured destinations and their deliveries (``destinations list``).

    Parameters
    ----------
    settings : Settings
        The destinations and the database.
    args : argparse.Namespace
        ``json``.

    Returns
    -------
    int
        Exit code 0, also when the database cannot be read (a note on stderr says so).
    """
    records = [_config_record(d) for d in settings.destinations]
    stats: dict[str, DeliveryCounts] | None
    try:
        stats = delivery_statistics(settings)
    except Exception as exc:
        log.debug("delivery statistics unavailable", exc_info=True)
        reason = first_line(str(exc)) or type(exc).__name__
        print(f"dicomnode: note: no delivery statistics ({reason})", file=sys.stderr)
        stats = None
    if stats is not None:
        known = {r["name"] for r in records}
        # Deliveries to a destination no longer configured still say where results went.
        records += [
            {"name": name, "configured": False, "ae_title": None, "host": None, "port": None,
             "tls": None, "storage_commitment": None, "timeout_seconds": None}
            for name in sorted(stats) if name not in known
        ]  # fmt: skip
        for r in records:
            # Its fields are the keys, in order: sent, pending, failed, last sent, error.
            r.update(asdict(stats.get(r["name"], DeliveryCounts())))
    if args.json:
        print_json(records)
        return 0
    if not records:
        print("no destinations configured")
        return 0
    headers = ["NAME", "AE TITLE", "ADDRESS", "TLS", "COMMITMENT", "TIMEOUT"]
    if stats is not None:
        headers += ["SENT", "PENDING", "FAILED", "LAST SENT", "LAST ERROR"]
    rows = []
    for r in records:
        if r["configured"]:
            row: list[Any] = [
                r["name"],
                r["ae_title"],
                f"{r['host']}:{r['port']}",
                "on" if r["tls"] else "off",
                "on" if r["storage_commitment"] else "off",
                f"{r['timeout_seconds']:g}s",
            ]
        else:
            row = [r["name"], "(not configured)", None, None, None, None]
        if stats is not None:
            last: datetime | None = r["last_sent_at"]
            row += [r["sent"], r["pending"], r["failed"], format_time(last), r["last_error"]]
        rows.append(row)
    print_table(headers, rows)
    return 0


def _echo_one(destination: Destination, calling_ae: str) -> dict[str, Any]:
    from dicomnode.send.scu import echo  # pynetdicom: only for the commands that talk DICOM

    record: dict[str, Any] = {
        "name": destination.name,
        "ae_title": destination.ae_title,
        "host": destination.host,
        "port": destination.port,
        "ok": False,
        "status": None,
        "ms": None,
        "error": None,
    }
    start = time.monotonic()
    try:
        status = echo(destination, calling_ae)
    except Exception as exc:  # one line per destination, whatever went wrong
        log.debug("echo to %s failed", destination.name, exc_info=True)
        # scu.associate already names an unreachable or unknown host in one line.
        reason = first_line(str(exc)) or type(exc).__name__
        prefix = f"destination {destination.name}: "
        record["error"] = reason.removeprefix(prefix)
        return record
    record["ms"] = round((time.monotonic() - start) * 1000, 1)
    record["status"] = status
    if status == 0:
        record["ok"] = True
    else:
        record["error"] = f"answered status 0x{status:04X}"
    return record


def echo_destinations(settings: Settings, args: argparse.Namespace) -> int:
    """C-ECHO destinations (``dicomnode destinations echo [NAME...]``).

    Parameters
    ----------
    settings : Settings
        The destinations and our AE title (``listener.ae_title``).
    args : argparse.Namespace
        ``names`` (all destinations when empty) and ``json``.

    Returns
    -------
    int
        Exit code 0 when every destination answered with success, 1 otherwise.

    Raises
    ------
    ConfigError
        For a name that is not configured, before anything is sent.
    """
    names: list[str] = args.names
    destinations = (
        [settings.destination(n) for n in dict.fromkeys(names)]
        if names
        else list(settings.destinations)
    )
    if not log.isEnabledFor(logging.DEBUG):
        # Our one line says what failed; pynetdicom's own error lines only repeat it.
        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    results = [_echo_one(d, settings.listener.ae_title) for d in destinations]
    if args.json:
        print_json(results)
    else:
        if not results:
            print("no destinations configured")
        for r in results:
            print(echo_line(r))
    return 0 if all(r["ok"] for r in results) else 1


def echo_line(record: dict[str, Any]) -> str:
    """Format one C-ECHO result, for ``destinations echo`` and ``echo`` alike.

    Parameters
    ----------
    record : dict[str, Any]
        From the echo: ``name``, ``ok``, ``ae_title``, ``host``, ``port``, ``ms`` and
        ``error``.

    Returns
    -------
    str
        ``NAME ok (AE@host:port, N ms)`` or ``NAME failed: reason``.
    """
    if record["ok"]:
        where = f"{record['ae_title']}@{record['host']}:{record['port']}"
        return f"{record['name']} ok ({where}, {record['ms']:.0f} ms)"
    return f"{record['name']} failed: {record['error']}"
