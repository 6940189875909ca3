"""``dicomnode jobs``: list, inspect, retry, cancel and purge jobs."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dicomnode.cli.database import open_database
from dicomnode.cli.output import format_time, print_json, print_table
from dicomnode.config import Settings
from dicomnode.db import audit, jobs
from dicomnode.db.engine import session_factory
from dicomnode.db.models import (
    Delivery,
    Job,
    JobState,
    utcnow,
)
from dicomnode.queue.wakeup import Announcer
from dicomnode.store import retention
from dicomnode.store.spool import Spool

if TYPE_CHECKING:
    from dicomnode.db.engine import Session  # annotations only: the CLI runs no SQL

STAGES = (
    "receive_s",
    "wait_s",
    "load_s",
    "mask_load_s",  # a detection model's mask, read back from the SEG of that model's job
    "mask_inference_s",  # or made by running the mask model; then its candidate search
    "mask_postprocess_s",
    "candidates_s",
    "inference_s",
    "postprocess_s",
    "seg_s",
    "sr_s",
    "sc_s",
    "write_validate_s",
    "send_s",
    "resend_s",
)


def delivery_commitment(delivery: Delivery) -> str | None:
    """Return where a delivery's storage commitment stands.

    Parameters
    ----------
    delivery : Delivery
        The delivery.

    Returns
    -------
    str or None
        "confirmed", "requested" (sent, no report yet), "failed" (the PACS reported
        failures or none came in time; the delivery was re-opened), or None when no
        commitment was asked for.
    """
    if delivery.confirmed_at is not None:
        return "confirmed"
    if delivery.commitment_uid is not None:
        return "requested"
    if delivery.commitment_failed:
        return "failed"
    return None


def job_record(job: Job, *, detail: bool, show_phi: bool = False) -> dict[str, Any]:
    """Return a job as a JSON-ready mapping (no patient data unless asked for).

    Parameters
    ----------
    job : Job
        The job, in an open session.
    detail : bool
        Include timings, summary, outputs and deliveries.
    show_phi : bool
        Include the study's patient ID and accession number (``--show-phi``).

    Returns
    -------
    dict[str, Any]
        The record.
    """
    record: dict[str, Any] = {
        "id": job.id,
        "state": job.state.value,
        "route": job.route,
        "model": job.model,
        "model_version": job.model_version,
        "series_uid": job.series.series_uid,
        "study_uid": job.series.study.study_uid,
        "priority": job.priority,
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "last_error": job.last_error,
    }
    if show_phi:
        record["patient_id"] = job.series.study.patient_id
        record["accession_number"] = job.series.study.accession_number
    if detail:
        record.update(
            lease_owner=job.lease_owner,
            claimed_by=job.claimed_by,
            lease_expires_at=job.lease_expires_at,
            run_after=job.run_after,
            timings=job.timings or {},
            summary=job.summary or {},
            outputs=[
                {
                    "kind": o.kind,
                    "sop_class_uid": o.sop_class_uid,
                    "sop_instance_uid": o.sop_instance_uid,
                    "series_uid": o.series_uid,
                    "path": o.path,
                    "size_bytes": o.size_bytes,
                }
                for o in job.outputs
            ],
            deliveries=[
                {
                    "destination": d.destination,
                    "state": d.state.value,
                    "attempts": d.attempts,
                    "sent_at": d.sent_at,
                    "last_error": d.last_error,
                    "warning": d.warning,
                    "commitment": delivery_commitment(d),
                    "commitment_uid": d.commitment_uid,
                    "commitment_requested_at": d.commitment_requested_at,
                    "confirmed_at": d.confirmed_at,
                    "commitment_failed": d.commitment_failed,
                }
                for d in job.deliveries
            ],
            history=[
                {
                    "at": e.at,
                    "from": e.from_state,
                    "to": e.to_state,
                    "attempt": e.attempt,
                    "counted": counted,
                    "worker": e.worker,
                    "note": e.note,
                }
                for e, counted in zip(job.events, _counted(job), strict=True)
            ],
        )
        record["started_at"], record["resent_at"] = run_times(job)
    return record


_ATTEMPTED = (JobState.RUNNING.value, JobState.SENDING.value)


def _counted(job: Job) -> list[bool]:
    """Say per history event whether its attempt counts against ``max_attempts``.

    ``attempts`` is the budget used: an attempt that only re-sent stored results, or
    that a full disk or a worker's stop ended, is given back after its event was written
    with the attempt's number. ``jobs list`` then says 0/5 where the history says
    attempt 1; marking such an attempt "not counted" makes the two agree. An attempt was
    given back when the next claim has the same number again, or, for the latest one,
    when the job's count is below it.
    """
    events = list(job.events)
    counted = [True] * len(events)
    for i, e in enumerate(events):
        if e.from_state not in _ATTEMPTED or e.to_state != JobState.QUEUED.value:
            continue
        claim = next((c for c in events[i + 1 :] if c.to_state == JobState.RUNNING.value), None)
        given_back = e.attempt == claim.attempt if claim is not None else job.attempts < e.attempt
        if given_back:
            counted[i] = False
            # The claim that began this attempt carries the same number: mark it too.
            for j in range(i - 1, -1, -1):
                if events[j].to_state == JobState.RUNNING.value:
                    counted[j] = events[j].attempt != e.attempt
                    break
    return counted


def run_times(job: Job) -> tuple[Any, Any]:
    """Return when the run that made the job's results began, and the latest re-send.

    A claim sets ``started_at``, also the claim of an attempt that only re-sends stored
    outputs: read alone, it showed the re-send's time as the run's. The run is the
    latest claim before the first output was written; a claim after it is a re-send.

    Parameters
    ----------
    job : Job
        The job, in an open session (its outputs and history are read).

    Returns
    -------
    tuple
        ``(run started, re-sent)``: ``started_at`` and None for a job without
        outputs or re-sends.
    """
    made = min((o.created_at for o in job.outputs), default=None)
    if made is None:
        return job.started_at, None
    claims = [e.at for e in job.events if e.to_state == JobState.RUNNING.value]
    run = max((at for at in claims if at <= made), default=job.started_at)
    resent = max((at for at in claims if at > made), default=None)
    return run, resent


def list_jobs(session: Session, args: argparse.Namespace) -> int:
    """Print jobs, newest first, optionally filtered.

    The accession number is a filter only: like the other patient data it is not
    printed.

    Parameters
    ----------
    session : Session
        Database session.
    args : argparse.Namespace
        ``state``, ``route``, ``model``, ``since`` (an aware datetime: jobs created
        then or later), ``study`` (Study Instance UID), ``accession``, ``limit`` and
        ``json``; the filters left None do not apply.

    Returns
    -------
    int
        Exit code.
    """
    found = jobs.find(
        session,
        limit=args.limit,
        state=JobState(args.state) if args.state else None,
        route=getattr(args, "route", None),
        model=getattr(args, "model", None),
        since=getattr(args, "since", None),
        study_uid=getattr(args, "study", None),
        accession=getattr(args, "accession", None),
    )
    phi = bool(getattr(args, "show_phi", False))
    records = [job_record(j, detail=False, show_phi=phi) for j in found]
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


def show_job(session: Session, args: argparse.Namespace) -> int:
    """Print one job in full.

    Parameters
    ----------
    session : Session
        Database session.
    args : argparse.Namespace
        ``id`` and ``json``.

    Returns
    -------
    int
        Exit code: 1 if there is no such job.
    """
    job = jobs.get(session, args.id)
    phi = bool(getattr(args, "show_phi", False))
    record = job_record(job, detail=True, show_phi=phi)
    if args.json:
        print_json(record)
        return 0
    keys = ["id", "state", "model", "model_version", "route", "study_uid", "series_uid"]
    for key in keys + (["patient_id", "accession_number"] if phi else []):
        print(f"{key:<14}{record[key] if record[key] is not None else '-'}")
    print(f"{'attempts':<14}{record['attempts']}/{record['max_attempts']}")
    for key in ("created_at", "started_at", "finished_at"):
        print(f"{key:<14}{format_time(record[key])}")
    if record["resent_at"] is not None:
        print(f"{'resent_at':<14}{format_time(record['resent_at'])}")
    if record["last_error"]:
        print(f"{'error':<14}{record['last_error']}")
    timings = record["timings"]
    if timings:
        print("timings (s)")
        for stage in [s for s in STAGES if s in timings] + [s for s in timings if s not in STAGES]:
            print(f"  {stage[:-2] if stage.endswith('_s') else stage:<16}{timings[stage]:>9.2f}")
    for segment in record["summary"].get("segments", []):
        mean = "-" if segment["mean"] is None else f"{segment['mean']:.1f}"
        print(f"segment       {segment['label']}: {segment['volume_ml']:.1f} mL, mean {mean}")
    detection = record["summary"].get("detection")
    for finding in [] if detection is None else detection["findings"]:
        print(f"finding       {_finding_line(finding)}")
    if detection is not None and detection.get("mask_from_job"):
        print(f"{'lung mask':<14}from job {detection['mask_from_job']}")
    for out in record["outputs"]:
        print(f"output        {out['kind']:<4} {out['sop_instance_uid']}  {out['path']}")
    for d in record["deliveries"]:
        extra = f"  ({d['last_error']})" if d["last_error"] else ""
        tries = f"{d['attempts']} attempt(s)"
        state = d["state"]
        if d.get("commitment") == "requested":
            state += ", commitment requested"
        elif d.get("commitment") == "confirmed":
            state += f", confirmed at {format_time(d['confirmed_at'])}"
        if d.get("commitment_failed"):
            state += f", commitment failed: {d['commitment_failed']}"
        if d.get("warning"):
            extra += f"  (warning: {d['warning']})"
        print(f"delivery      {d['destination']}: {state} after {tries}{extra}")
    if record["history"]:
        print("history")
    for e in record["history"]:
        step = f"{e['from'] or 'new'} -> {e['to']}"
        where = f"  on {e['worker']}" if e["worker"] else ""
        note = f"  ({e['note']})" if e["note"] else ""
        attempt = f"attempt {e['attempt']}" + ("" if e["counted"] else " (not counted)")
        print(f"  {format_time(e['at'])}  {step:<20} {attempt}{where}{note}")
    return 0


def _finding_line(finding: dict[str, Any]) -> str:
    """Return one finding as ``jobs show`` prints it: where, how large, how likely."""
    x, y, z = finding["center_mm"]
    where = f"at ({x:.1f}, {y:.1f}, {z:.1f}) mm LPS"
    if finding.get("slice") is not None:  # summaries before 0.1's slice field lack it
        where += f", slice {finding['slice']}"
        if finding.get("instance_number") is not None:
            where += f" (instance {finding['instance_number']})"
    size = f"{finding['diameter_mm']:.1f} mm"
    if finding.get("short_axis_mm") is not None:
        size += f" x {finding['short_axis_mm']:.1f} mm"
    if finding.get("volume_ml") is not None:
        size += f", {finding['volume_ml']:.2f} mL"
    return f"{finding['number']}: {where}; {size}; probability {finding['probability']:.2f}"


def _act(
    settings: Settings, args: argparse.Namespace, action: Callable[..., Job], verb: str
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
                    job = action(sessions, job_id, who)
                except LookupError as exc:
                    print(f"dicomnode: {exc}", file=sys.stderr)
                    failed += 1
                    continue
                print(f"job {job.id} {verb}")
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
    doomed = [job_record(j, detail=False) for j in result.jobs]
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
