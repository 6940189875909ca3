"""``dicomnode jobs``: list, inspect, retry, cancel and purge jobs."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from dicomnode.cli.database import open_database, read
from dicomnode.cli.job_output import job_record, print_job
from dicomnode.cli.output import format_time, print_json, print_table
from dicomnode.config import Settings
from dicomnode.db import JobState, audit, jobs, queries, session_factory, utcnow
from dicomnode.queue import Announcer
from dicomnode.store import Spool, retention


def list_jobs(settings: Settings, args: argparse.Namespace) -> int:
    """Print jobs, newest first, optionally filtered.

    The accession number is a filter only: like the other patient data it is not
    printed.

    Parameters
    ----------
    settings : Settings
        The database URL.
    args : argparse.Namespace
        ``state``, ``route``, ``model``, ``since`` (an aware datetime: jobs created
        then or later), ``study`` (Study Instance UID), ``accession``, ``limit`` and
        ``json``; the filters left None do not apply.

    Returns
    -------
    int
        Exit code.
    """
    phi = bool(getattr(args, "show_phi", False))
    found = read(
        settings,
        queries.find_jobs,
        limit=args.limit,
        state=args.state,
        route=getattr(args, "route", None),
        model=getattr(args, "model", None),
        since=getattr(args, "since", None),
        study_uid=getattr(args, "study", None),
        accession=getattr(args, "accession", None),
        show_phi=phi,
    )
    records = [job_record(j, show_phi=phi) for j in found]
    if args.json:
        print_json(records)
        return 0
    if not records:
        print("no jobs")
        return 0
    headers = ["ID", "STATE", "MODEL", "ROUTE", "ATTEMPTS", "CREATED", "SERIES", "ERROR"]
    print_table(
        headers + (["PATIENT ID", "ACCESSION"] if phi else []),
        [
            [
                r["id"],
                r["state"],
                f"{r['model']} {r['model_version']}",
                r["route"],
                f"{r['attempts']}/{r['max_attempts']}",
                format_time(r["created_at"]),
                r["series_uid"],
                (r["last_error"] or "")[:60] or None,
            ]
            + ([r["patient_id"], r["accession_number"]] if phi else [])
            for r in records
        ],
    )
    return 0


def show_job(settings: Settings, args: argparse.Namespace) -> int:
    """Print one job in full.

    Parameters
    ----------
    settings : Settings
        The database URL.
    args : argparse.Namespace
        ``id`` and ``json``.

    Returns
    -------
    int
        Exit code 0.

    Raises
    ------
    LookupError
        If there is no such job (``main`` prints it as one line, exit 1).
    """
    phi = bool(getattr(args, "show_phi", False))
    return print_job(read(settings, queries.job_detail, args.id, show_phi=phi), args)


def _act(
    settings: Settings, args: argparse.Namespace, action: Callable[..., object], verb: str
) -> int:
    engine = open_database(settings)
    try:
        sessions = session_factory(engine)
        who = audit.admin_actor()
        failed = 0
        try:
            for job_id in args.ids:
                # One id in the wrong state does not stop the others: each gets its line.
                try:
                    action(sessions, job_id, who)
                except LookupError as exc:
                    print(f"dicomnode: {exc}", file=sys.stderr)
                    failed += 1
                    continue
                print(f"job {job_id} {verb}")
        finally:
            if verb == "queued again":
                # Idle workers anywhere take it now rather than at their next poll.
                Announcer(engine, settings.storage.path).announce()
    finally:
        engine.dispose()
    return 1 if failed else 0


def retry_jobs(settings: Settings, args: argparse.Namespace) -> int:
    """Queue ended jobs again (``dicomnode jobs retry ID...``).

    Parameters
    ----------
    settings : Settings
        The database.
    args : argparse.Namespace
        ``ids``.

    Returns
    -------
    int
        0; 1 when a job was unknown or in the wrong state (one line each, the rest
        still acted on).
    """
    return _act(settings, args, jobs.retry, "queued again")


def cancel_jobs(settings: Settings, args: argparse.Namespace) -> int:
    """Cancel jobs that have not ended (``dicomnode jobs cancel ID...``).

    Parameters
    ----------
    settings : Settings
        The database.
    args : argparse.Namespace
        ``ids``.

    Returns
    -------
    int
        0; 1 when a job was unknown or in the wrong state (one line each, the rest
        still acted on).
    """
    return _act(settings, args, jobs.cancel, "cancelled")


def purge_jobs(settings: Settings, args: argparse.Namespace) -> int:
    """Delete the rows of ended jobs older than an age (``dicomnode jobs purge``).

    A job's age is counted from when it ended; its rows and the result files only it
    named go, jobs still awaiting a storage commitment stay (see
    :func:`dicomnode.store.retention.purge_jobs`). The summary says how many were
    kept so.

    Parameters
    ----------
    settings : Settings
        The database and the spool.
    args : argparse.Namespace
        ``state`` (done, failed or cancelled), ``older_than`` (a timedelta),
        ``dry_run`` and ``json``.

    Returns
    -------
    int
        Exit code 0.
    """
    cutoff = utcnow() - args.older_than
    engine = open_database(settings)
    try:
        result = retention.purge_jobs(
            session_factory(engine),
            Spool(settings.storage.path),
            JobState(args.state),
            cutoff,
            dry_run=args.dry_run,
            actor=audit.admin_actor(),
        )
    finally:
        engine.dispose()
    doomed = [job_record(j) for j in result.jobs]
    files, kept = result.files, result.kept
    if args.json:
        print_json(
            {
                "dry_run": args.dry_run,
                "count": len(doomed),
                "jobs": doomed,
                "files": len(files),
                "kept_awaiting_commitment": kept,
            }
        )
        return 0
    if args.dry_run and doomed:
        print_table(
            ["ID", "STATE", "MODEL", "ROUTE", "FINISHED"],
            [
                [r["id"], r["state"], r["model"], r["route"], format_time(r["finished_at"])]
                for r in doomed
            ],
        )
    verb = "would purge" if args.dry_run else "purged"
    print(
        f"{verb} {len(doomed)} {args.state} job(s) ended before {format_time(cutoff)} UTC "
        f"and {len(files)} result file(s); received instances are left to retention"
    )
    if kept:
        print(
            f"kept {kept} {args.state} job(s) whose storage commitment is still awaited: the "
            "PACS has not confirmed them, and a failure it reports re-sends their results "
            "(`dicomnode jobs show ID` says since when)"
        )
    return 0
