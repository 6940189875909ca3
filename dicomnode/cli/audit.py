"""``dicomnode audit export``: the audit trail as CSV or JSON, for the hospital's records."""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from dicomnode.cli.arguments import add_when, closed_set, positive_int
from dicomnode.cli.database import with_session
from dicomnode.db import audit

event_name = closed_set("audit event", audit.EVENTS)


def _cell(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


def write(rows: Iterator[dict[str, Any]], fmt: str, stream: TextIO) -> int:
    """Write entries as CSV, a JSON array or JSON lines, one at a time.

    Parameters
    ----------
    rows : Iterator[dict[str, Any]]
        Entries, as :func:`dicomnode.db.audit.entries` yields them.
    fmt : str
        ``csv``, ``json`` or ``jsonl``.
    stream : TextIO
        Where to.

    Returns
    -------
    int
        How many entries were written.
    """
    count = 0
    if fmt == "csv":
        writer = csv.DictWriter(stream, fieldnames=audit.FIELDS, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(v) for k, v in row.items()})
            count += 1
        return count
    if fmt == "json":
        stream.write("[")
    for row in rows:
        if fmt == "json":
            stream.write(",\n  " if count else "\n  ")
        stream.write(json.dumps({k: _cell(v) for k, v in row.items()}))
        if fmt == "jsonl":
            stream.write("\n")
        count += 1
    if fmt == "json":
        stream.write("\n]\n" if count else "]\n")
    return count


def export(session: Any, args: argparse.Namespace) -> int:
    """Export the audit trail (``dicomnode audit export``).

    Parameters
    ----------
    session : Session
        Database session.
    args : argparse.Namespace
        ``since``, ``until``, ``event``, ``study``, ``job``, ``format`` and ``output``.

    Returns
    -------
    int
        Exit code 0.
    """
    rows = audit.entries(
        session,
        since=args.since,
        until=args.until,
        events=tuple(args.event or ()),
        study_uid=args.study,
        job_id=args.job,
    )
    if args.output is None:
        write(rows, args.format, sys.stdout)
        return 0
    # Written beside the target and renamed: a half-written export never looks whole.
    target: Path = args.output
    partial = target.with_name(f".{target.name}.partial")
    try:
        with partial.open("w", encoding="utf-8", newline="") as stream:
            count = write(rows, args.format, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    print(f"exported {count} audit entr{'y' if count == 1 else 'ies'} to {target}")
    return 0


def register(sub: Any) -> None:
    """Add ``dicomnode audit`` to the parser.

    Parameters
    ----------
    sub : argparse._SubParsersAction
        The top-level subcommands.
    """
    commands = sub.add_parser(
        "audit", help="the audit trail: who sent what, which jobs ran, where results went"
    ).add_subparsers(dest="audit_command", required=True, metavar="COMMAND")
    p = commands.add_parser(
        "export",
        help="export audit entries, oldest first, as CSV or JSON",
        description="Entries name AE titles, addresses, UIDs, job ids and counts; never "
        f"patient data. Events: {', '.join(audit.EVENTS)}.",
    )
    add_when(p, "--since", "entries at or after")
    add_when(p, "--until", "entries before")
    p.add_argument(
        "--event", type=event_name, action="append", metavar="EVENT", help="only this event "
        "(repeatable)"
    )  # fmt: skip
    p.add_argument("--study", metavar="UID", help="only entries about this Study Instance UID")
    p.add_argument("--job", type=positive_int, metavar="ID", help="only entries about this job")
    p.add_argument("--format", choices=["csv", "json", "jsonl"], default="csv", help="default csv")
    p.add_argument(
        "-o", "--output", type=Path, metavar="FILE", help="write to FILE instead of stdout"
    )
    p.set_defaults(run=with_session(export))
