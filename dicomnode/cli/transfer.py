"""``dicomnode import`` and ``dicomnode send``: move DICOM files in and out by hand.

``import`` backfills files or folders into the node as if they had arrived over
C-STORE (:func:`dicomnode.store.staging.import_files`); ``send`` sends files, or the
stored outputs of a job, to a configured destination with C-STORE, one status per
object (:func:`dicomnode.send.planning.send_source`). Here are the argument checks,
the progress bar and the printing.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dicomnode.cli.output import print_json
from dicomnode.config import Settings
from dicomnode.evaluate import Progress

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
MAX_PROBLEM_LINES = 20  # per report, in the human output; JSON lists them all
_JOB = re.compile(r"(?:job:)?(\d+)")


def _missing(paths: Sequence[Path]) -> Path | None:
    return next((p for p in paths if not p.exists()), None)


def _usage_error(message: str) -> int:
    print(f"dicomnode: {message}", file=sys.stderr)
    return EXIT_USAGE


def _show_progress(args: argparse.Namespace) -> bool:
    if args.progress is not None:
        return bool(args.progress)
    return sys.stderr.isatty() and not args.json


class _Bar:
    """A :class:`Progress` bar on stderr, made once the number of steps is known."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.progress: Progress | None = None

    def start(self, total: int) -> None:
        self.progress = Progress(total, self.enabled)

    def advance(self) -> None:
        if self.progress is not None:
            self.progress.advance()

    def stop(self) -> None:
        """End the bar's line when the loop stopped early (the bar ends it after the last)."""
        progress = self.progress
        if progress is not None and progress.enabled and 0 < progress.done < progress.total:
            progress.stream.write("\n")
            progress.stream.flush()


def _print_problems(problems: Sequence[dict[str, Any]]) -> None:
    for problem in problems[:MAX_PROBLEM_LINES]:
        print(f"{problem['outcome']:<8} {problem['file']}: {problem['reason']}")
    if len(problems) > MAX_PROBLEM_LINES:
        print(f"... and {len(problems) - MAX_PROBLEM_LINES} more (--json lists them all)")


def _warn(message: str) -> None:
    print(f"dicomnode: warning: {message}", file=sys.stderr)


# --- import --------------------------------------------------------------------------


def import_command(settings: Settings, args: argparse.Namespace) -> int:
    """Run ``dicomnode import PATH...``.

    Parameters
    ----------
    settings : Settings
        Storage (path, ``min_free_mb``, ``max_instance_mb``) and database.
    args : argparse.Namespace
        ``paths``, ``calling_ae``, ``json`` and ``progress``.

    Returns
    -------
    int
        0 when every file was imported (or skipped as not an instance), 1 when an
        instance was refused or storage ran low, 2 when a path does not exist.
    """
    from dicomnode.dimse import ACCEPTED_SOP_CLASSES, ACCEPTED_TRANSFER_SYNTAXES
    from dicomnode.store import Accepted, import_files

    missing = _missing(args.paths)
    if missing is not None:
        return _usage_error(f"no such file or folder: {missing}")
    spool_root = settings.storage.path.resolve()
    inside = next((p for p in args.paths if p.resolve().is_relative_to(spool_root)), None)
    if inside is not None:
        return _usage_error(f"{inside} is inside the node's storage path: nothing to import")
    # What the listener accepts, and so what an import takes.
    accepted = Accepted(ACCEPTED_SOP_CLASSES, ACCEPTED_TRANSFER_SYNTAXES)
    report = import_files(
        settings, args.paths, args.calling_ae, accepted, _Bar(_show_progress(args))
    )
    log.debug(
        "import: %d instance(s) (%d duplicate(s)) in %d series, %d refused, %d skipped",
        report.imported,
        report.duplicates,
        len(report.series),
        report.count("refused"),
        report.count("skipped"),
    )
    if args.json:
        print_json(report.record())
    else:
        print(report.summary())
        if report.replaced:
            print(f"{report.replaced} replaced an earlier object with the same SOP Instance UID")
        _print_problems(report.problems)
    if report.stopped is not None:
        print(
            f"dicomnode: import stopped: {report.stopped} (what was imported stays)",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return EXIT_FAILED if report.count("refused") else EXIT_OK


# --- send ----------------------------------------------------------------------------


def parse_source(value: str) -> int | Path:
    """Tell a job id from a path in ``send``'s SOURCE.

    Parameters
    ----------
    value : str
        ``job:ID``, a plain integer (a job id; write ``./12`` for a file named 12),
        or a path.

    Returns
    -------
    int or Path
        The job id, or the path.

    Raises
    ------
    ValueError
        If it starts with ``job:`` but no id follows.
    """
    match = _JOB.fullmatch(value)
    if match is not None:
        return int(match.group(1))
    if value.startswith("job:"):
        raise ValueError(f"not a job id: {value!r} (job:ID, ID a number)")
    return Path(value)


def send_command(settings: Settings, args: argparse.Namespace) -> int:
    """Run ``dicomnode send SOURCE DESTINATION_NAME``.

    Parameters
    ----------
    settings : Settings
        The destinations, our AE title, the database and spool (for a job's outputs).
    args : argparse.Namespace
        ``source``, ``destination``, ``json`` and ``progress``.

    Returns
    -------
    int
        0 when every object was stored (warnings included), 1 when one was not or the
        destination cannot be reached, 2 for bad usage.

    Raises
    ------
    ConfigError
        If the destination is not configured (exit 2).
    LookupError
        If there is no such job (exit 1).
    DicomnodeError
        If the job has no outputs, or the destination cannot be reached (exit 1).
    """
    from dicomnode.send import send_source

    destination = settings.destination(args.destination)
    try:
        source = parse_source(args.source)
    except ValueError as exc:
        return _usage_error(str(exc))
    if isinstance(source, Path) and not source.exists():
        return _usage_error(f"no such file or folder: {source}")
    if not log.isEnabledFor(logging.DEBUG):
        # Our one line says what failed; pynetdicom's own error lines only repeat it.
        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    report = send_source(settings, source, destination, _Bar(_show_progress(args)), _warn)
    record = report.record()
    log.debug(
        "send to %s: %d stored (%d with a warning), %d failed, %d skipped",
        destination.name,
        record["sent"],
        record["warnings"],
        record["failed"],
        record["skipped"],
    )
    if args.json:
        print_json(record)
    else:
        print(
            f"sent {record['sent']} object(s) to {destination.name} "
            f"({destination.address})"
            + (f", {record['warnings']} stored with a warning" if record["warnings"] else "")
            + (f", {record['failed']} not stored" if record["failed"] else "")
            + (f", {record['skipped']} skipped" if record["skipped"] else "")
        )
        _print_problems(
            [
                {**r, "reason": r["reason"] or r["outcome"]}
                for r in report.objects
                if r["outcome"] != "stored"
            ]
        )
    if report.error is not None:
        print(f"dicomnode: {report.error}", file=sys.stderr)
    return EXIT_FAILED if record["failed"] else EXIT_OK
