"""``dicomnode purge``: apply the retention rules now, or show what they would delete."""

from __future__ import annotations

import argparse
from typing import Any

from dicomnode.cli.database import open_database
from dicomnode.cli.output import format_time, print_json, print_table
from dicomnode.config import Settings
from dicomnode.db import audit, session_factory
from dicomnode.store import Spool, retention


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def purge(settings: Settings, args: argparse.Namespace) -> int:
    """Run retention once (``dicomnode purge [--dry-run]``).

    Parameters
    ----------
    settings : Settings
        Database, spool and the ``[retention]`` rules.
    args : argparse.Namespace
        ``dry_run`` and ``json``.

    Returns
    -------
    int
        0; 1 when the disk is below the emergency threshold and stays there.
    """
    engine = open_database(settings)
    try:
        report = retention.run(
            session_factory(engine),
            Spool(settings.storage.path),
            settings.retention,
            settings.storage,
            dry_run=args.dry_run,
            actor=audit.admin_actor(),
        )
    finally:
        engine.dispose()
    if args.json:
        data: dict[str, Any] = {
            "dry_run": report.dry_run,
            "free_bytes": report.free_bytes,
            "emergency_below_bytes": report.emergency_below_bytes,
            "emergency": report.emergency,
            "still_short": report.still_short,
            "freed_bytes": report.freed_bytes,
            "series": report.deleted,
        }
        print_json(data)
        return 1 if report.still_short else 0
    if report.deleted:
        print_table(
            ["SERIES", "STUDY", "KIND", "ENDED", "INSTANCES", "SIZE", "REASON"],
            [
                [
                    d["series_uid"],
                    d["study_uid"],
                    d["kind"],
                    format_time(d["ended_at"]),
                    d["instances"],
                    _mib(d["size_bytes"]),
                    d["reason"],
                ]
                for d in report.deleted
            ],
        )
    verb = "would delete" if report.dry_run else "deleted"
    print(
        f"{verb} {len(report.deleted)} series, {_mib(report.freed_bytes)}; "
        f"free {_mib(report.free_bytes)}"
        + (
            f", emergency cleanup below {_mib(report.emergency_below_bytes)}"
            if report.emergency_below_bytes
            else ", emergency cleanup off"
        )
    )
    if not settings.retention.enabled:
        print("note: retention.enabled is false, so the node itself deletes nothing")
    if report.still_short:
        print(
            "still below the emergency threshold: nothing else may be deleted (failed, "
            "unprocessed and undelivered series are kept)"
        )
        return 1
    return 0
