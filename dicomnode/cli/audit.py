"""``dicomnode audit``: export the audit trail as CSV or JSON, and prune what was exported.

The trail is append-only. ``audit prune`` is the one way entries leave it: only
entries older than a date, only once an export (``audit export``, kept wherever the
hospital archives its records) has been read back and found to hold every one of
them unchanged, and the prune itself is the first entry of what remains.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import itertools
import json
import os
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TextIO

from dicomnode.cli.database import open_database, read
from dicomnode.cli.output import format_time
from dicomnode.config import Settings
from dicomnode.db import audit, session_factory, utcnow
from dicomnode.db import read as read_with
from dicomnode.errors import DicomnodeError, ExportMismatch

if TYPE_CHECKING:
    from dicomnode.db import Session  # annotations only: the CLI runs no SQL


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
            writer.writerow({k: audit.export_value(v) for k, v in row.items()})
            count += 1
        return count
    if fmt == "json":
        stream.write("[")
    for row in rows:
        if fmt == "json":
            stream.write(",\n  " if count else "\n  ")
        stream.write(json.dumps({k: audit.export_value(v) for k, v in row.items()}))
        if fmt == "jsonl":
            stream.write("\n")
        count += 1
    if fmt == "json":
        stream.write("\n]\n" if count else "]\n")
    return count


def export(settings: Settings, args: argparse.Namespace) -> int:
    """Export the audit trail (``dicomnode audit export``).

    Parameters
    ----------
    settings : Settings
        The database URL.
    args : argparse.Namespace
        ``since``, ``until``, ``event``, ``study``, ``job``, ``format`` and ``output``.

    Returns
    -------
    int
        Exit code 0.
    """
    # The entries stream out while their read-only session is open: a year of audit
    # trail never sits in memory at once.
    return read(settings, _export, args)


def _export(session: Session, args: argparse.Namespace) -> int:
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


def _hashed_lines(stream: IO[bytes], digest: Any) -> Iterator[str]:
    for raw in stream:
        digest.update(raw)
        yield raw.decode("utf-8")


def _json_entry(line: str, number: int) -> dict[str, Any]:
    try:
        entry = json.loads(line)
    except ValueError:
        entry = None
    if not isinstance(entry, dict):
        raise ExportMismatch(f"line {number} of the export is not an audit entry")
    return entry


def read_export(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """Read back an export as :func:`write` wrote it: CSV, a JSON array or JSON lines.

    Entry by entry, like the writer: a JSON array is read one line per entry, as
    written, rather than parsed whole.

    Parameters
    ----------
    lines : Iterator[str]
        The export's lines, with their line ends.

    Yields
    ------
    dict[str, Any]
        One entry: a mapping of :data:`dicomnode.db.audit.FIELDS`.

    Raises
    ------
    ExportMismatch
        If it is none of the three, or a line is not an entry.
    """
    numbered = enumerate(lines, 1)
    first = next(((n, line) for n, line in numbered if line.strip()), None)
    if first is None:
        return
    number, line = first
    head = line.strip()
    if head.startswith("["):
        if head not in ("[", "[]"):
            raise ExportMismatch("the JSON export is not one entry a line, as written")
        for number, line in numbered:
            body = line.strip().rstrip(",")
            if body and body != "]":
                yield _json_entry(body, number)
    elif head.startswith("{"):
        yield _json_entry(head, number)
        for number, line in numbered:
            if line.strip():
                yield _json_entry(line, number)
    else:
        reader = csv.DictReader(itertools.chain([line], (text for _, text in numbered)))
        if tuple(reader.fieldnames or ()) != audit.FIELDS:
            raise ExportMismatch(
                "not an audit export: the CSV header is not " + ",".join(audit.FIELDS)
            )
        yield from reader


def prune(settings: Settings, args: argparse.Namespace) -> int:
    """Delete entries before a date that an export holds (``dicomnode audit prune``).

    The export is read back and compared, entry by entry and field by field, with
    what the table holds before ``--before``: one entry missing or different and
    nothing is deleted. Its SHA-256 goes into the ``audit-pruned`` entry that the
    prune leaves, so that the archived file can be matched to it later.

    Parameters
    ----------
    settings : Settings
        The database.
    args : argparse.Namespace
        ``before`` (aware datetime), ``exported_to`` (Path) and ``dry_run``.

    Returns
    -------
    int
        Exit code 0.

    Raises
    ------
    DicomnodeError
        If ``--before`` is in the future, the export cannot be read, or it does not
        hold every entry to delete (:class:`~dicomnode.db.ExportMismatch`).
    """
    before: datetime = args.before
    if before > utcnow():
        raise DicomnodeError("audit prune: --before is in the future; entries are still written")
    path: Path = args.exported_to
    engine = open_database(settings)
    try:
        digest = hashlib.sha256()
        try:
            with path.open("rb") as stream:
                lines = _hashed_lines(stream, digest)
                checked = read_with(engine, audit.check_export, read_export(lines), before)
                for _ in lines:  # the rest of the file, for its checksum
                    pass
        except OSError as exc:
            raise DicomnodeError(f"audit prune: cannot read {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise DicomnodeError(
                f"audit prune: {path} is not an audit export (not UTF-8)"
            ) from None
        except ExportMismatch as exc:
            raise DicomnodeError(f"audit prune: refused, {path} is incomplete: {exc}") from None
        cutoff = f"{format_time(before)} UTC"
        if not checked.count:
            print(f"no audit entries before {cutoff}: nothing to prune")
            return 0
        archive = f"{path.resolve()} (sha256 {digest.hexdigest()})"
        if args.dry_run:
            print(
                f"would prune {checked.count} audit entries before {cutoff} (ids "
                f"{checked.first_id}..{checked.last_id}): each is in {archive}"
            )
            return 0
        try:
            deleted = audit.prune(session_factory(engine), checked, audit.admin_actor(), archive)
        except ExportMismatch as exc:
            raise DicomnodeError(f"audit prune: refused: {exc}") from None
    finally:
        engine.dispose()
    print(
        f"pruned {deleted} audit entries before {cutoff} (ids {checked.first_id}.."
        f"{checked.last_id}), each found unchanged in {archive}; the trail records the prune"
    )
    return 0
