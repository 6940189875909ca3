"""``dicomnode studies``: what was received, what ran on it, where the results went.

``studies list`` summarises many studies in three aggregate queries (studies with
their series, jobs per state, deliveries per state), whatever their number;
``studies show`` tells one study's whole story, ending with its audit trail.

Patient ID and accession number may be used to find studies, but they are printed
only with ``--show-phi``: without it no command here writes patient data.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from dicomnode.cli.database import read
from dicomnode.cli.job_output import job_record
from dicomnode.cli.output import (
    first_line,
    format_size,
    format_time,
    print_json,
    print_table,
    view_record,
)
from dicomnode.db import DELIVERY_STATE_ORDER, JOB_STATE_ORDER, StudyStory, StudySummary, studies

if TYPE_CHECKING:
    from dicomnode.config import Settings

# receiving: a series still receives; purged: retention deleted every series' images.
LIST_HEADERS = ("STUDY", "STATE", "SERIES", "INSTANCES", "FIRST RECEIVED", "LAST RECEIVED",
                "JOBS", "DELIVERIES")  # fmt: skip
SERIES_HEADERS = ("SERIES", "MODALITY", "STATE", "GEN", "INSTANCES", "BYTES", "FIRST RECEIVED",
                  "LAST RECEIVED", "COMPLETED", "PURGED", "FROM")  # fmt: skip
JOB_HEADERS = ("ID", "ROUTE", "MODEL", "STATE", "ATTEMPTS", "CREATED", "STARTED", "FINISHED",
               "RE-SENT", "SERIES", "ERROR")  # fmt: skip


def format_counts(counts: dict[str, int], order: tuple[str, ...]) -> str:
    """Format counts per state, e.g. ``2 done, 1 failed``; ``-`` for none.

    Parameters
    ----------
    counts : dict[str, int]
        Count per state name.
    order : tuple[str, ...]
        The order in which states are listed.

    Returns
    -------
    str
        The states with a count above zero, in ``order``.
    """
    names = [s for s in order if counts.get(s)] + sorted(
        s for s in counts if s not in order and counts[s]
    )
    return ", ".join(f"{counts[s]} {s}" for s in names) or "-"


def summary_record(summary: StudySummary, show_phi: bool) -> dict[str, Any]:
    """Return a study of ``studies list`` as a JSON-ready mapping.

    Parameters
    ----------
    summary : StudySummary
        The study.
    show_phi : bool
        Include ``patient_id`` and ``accession_number``.

    Returns
    -------
    dict[str, Any]
        The record, with the jobs and deliveries counted per state.
    """
    # Its fields are the keys, in order; the counts per state become mappings.
    record = view_record(summary, show_phi=show_phi)
    record.update(jobs=dict(summary.jobs), deliveries=dict(summary.deliveries))
    return record


def _print_summaries(records: list[dict[str, Any]], show_phi: bool) -> None:
    phi_headers = ["PATIENT ID", "ACCESSION"] if show_phi else []
    print_table(
        [*LIST_HEADERS[:1], *phi_headers, *LIST_HEADERS[1:]],
        [
            [
                r["study_uid"],
                *([r["patient_id"], r["accession_number"]] if show_phi else []),
                r["state"],
                r["series"],
                r["instances"],
                format_time(r["first_received_at"]),
                format_time(r["last_received_at"]),
                format_counts(r["jobs"], JOB_STATE_ORDER),
                format_counts(r["deliveries"], DELIVERY_STATE_ORDER),
            ]
            for r in records
        ],
    )


def list_studies(settings: Settings, args: argparse.Namespace) -> int:
    """Print studies newest first (``dicomnode studies list``).

    Parameters
    ----------
    settings : Settings
        The database URL.
    args : argparse.Namespace
        ``since``, ``accession``, ``patient_id``, ``state``, ``limit``, ``json`` and
        ``show_phi``; the filters left None do not apply.

    Returns
    -------
    int
        Exit code 0.
    """
    found = read(
        settings,
        studies.study_summaries,
        since=args.since,
        accession=args.accession,
        patient_id=args.patient_id,
        state=args.state,
        limit=args.limit,
        show_phi=args.show_phi,
    )
    records = [summary_record(r, args.show_phi) for r in found]
    if args.json:
        print_json(records)
        return 0
    if not records:
        print("no studies")
        return 0
    _print_summaries(records, args.show_phi)
    return 0


def story_record(story: StudyStory, show_phi: bool) -> dict[str, Any]:
    """Return one study's story as a JSON-ready mapping (``studies show --json``).

    Parameters
    ----------
    story : StudyStory
        The study.
    show_phi : bool
        Include ``patient_id`` and ``accession_number``.

    Returns
    -------
    dict[str, Any]
        ``study_uid``, ``state``, ``created_at``, ``series`` (each with its counts,
        bytes, timestamps and the calling AE titles that sent it), ``jobs`` (as
        ``dicomnode jobs show --json`` has them, outputs, deliveries and history
        included), ``timeline`` (the study's audit entries, oldest first) and
        ``selections`` (each study-scope route's latest choice of input series).
    """
    # Its fields are the keys, in order; the series, jobs and entries become mappings.
    record = view_record(story, show_phi=show_phi)
    record.update(
        series=[
            {
                "series_uid": s.series_uid,
                "modality": s.modality,
                "state": s.state,
                "generation": s.generation,
                "instances": s.instances,
                "stored_instances": s.stored_instances,
                "bytes": s.stored_bytes,
                "expected_instances": s.expected_instances,
                "first_received_at": s.first_received_at,
                "last_received_at": s.last_received_at,
                "completed_at": s.completed_at,
                "purged_at": s.purged_at,
                "calling_aes": list(s.calling_aes),
            }
            for s in story.series
        ],
        jobs=[job_record(j) for j in story.jobs],
        # An entry's fields are audit.FIELDS, in order: the keys of `audit export`.
        timeline=[asdict(e) for e in story.timeline],
    )
    return record


def _print_story(record: dict[str, Any], show_phi: bool) -> None:
    print(f"{'study':<16}{record['study_uid']}")
    if show_phi:
        print(f"{'patient id':<16}{record['patient_id'] or '-'}")
        print(f"{'accession':<16}{record['accession_number'] or '-'}")
    print(f"{'state':<16}{record['state']}")
    print(f"{'first seen':<16}{format_time(record['created_at'])}")
    print(
        f"{'received':<16}{format_time(record['first_received_at'])} .. "
        f"{format_time(record['last_received_at'])}"
    )
    series = record["series"]
    print(f"\nseries ({len(series)})")
    if series:
        print_table(
            SERIES_HEADERS,
            [
                [
                    s["series_uid"],
                    s["modality"],
                    s["state"],
                    s["generation"],
                    s["instances"],
                    format_size(s["bytes"]),
                    format_time(s["first_received_at"]),
                    format_time(s["last_received_at"]),
                    format_time(s["completed_at"]),
                    format_time(s["purged_at"]),
                    ",".join(s["calling_aes"]) or None,
                ]
                for s in series
            ],
        )
    for route, choice in record["selections"].items():
        print(f"\nroute {route} (study scope): {choice['why']}")
        print_table(
            ["SERIES", "NUMBER", "SLICES", "THICKNESS", "VERDICT"],
            [
                [
                    e["series_uid"],
                    e["series_number"],
                    e["slices"],
                    None if e["thickness_mm"] is None else f"{e['thickness_mm']:g} mm",
                    e["verdict"],
                ]
                for e in choice["series"]
            ],
        )
    jobs = record["jobs"]
    print(f"\njobs ({len(jobs)})")
    if jobs:
        print_table(
            JOB_HEADERS,
            [
                [
                    j["id"],
                    j["route"],
                    f"{j['model']} {j['model_version']}",
                    j["state"],
                    f"{j['attempts']}/{j['max_attempts']}",
                    format_time(j["created_at"]),
                    format_time(j["started_at"]),
                    format_time(j["finished_at"]),
                    # The run's own times stay in STARTED; a later re-send is beside them.
                    format_time(j["resent_at"]),
                    j["series_uid"],
                    first_line(j["last_error"]),
                ]
                for j in jobs
            ],
        )
    for j in jobs:
        comparison = j["summary"].get("comparison")
        if comparison is not None:
            print(f"job {j['id']} {comparison['heading']}")
    outputs = [(j["id"], o) for j in jobs for o in j["outputs"]]
    print(f"\noutputs ({len(outputs)})")
    if outputs:
        print_table(
            ["JOB", "KIND", "SOP INSTANCE UID", "SIZE"],
            [
                [job_id, o["kind"], o["sop_instance_uid"], format_size(o["size_bytes"])]
                for job_id, o in outputs
            ],
        )
    deliveries = [(j["id"], d) for j in jobs for d in j["deliveries"]]
    print(f"\ndeliveries ({len(deliveries)})")
    if deliveries:
        rows = []
        for job_id, d in deliveries:
            notes = []
            if d["last_error"]:
                notes.append(first_line(d["last_error"]))
            if d["warning"]:
                notes.append(f"warning: {first_line(d['warning'])}")
            if d["commitment_failed"]:
                notes.append(f"commitment failed: {first_line(d['commitment_failed'])}")
            rows.append(
                [
                    job_id,
                    d["destination"],
                    d["state"],
                    d["attempts"],
                    format_time(d["sent_at"]),
                    format_time(d["confirmed_at"]),
                    "; ".join(n for n in notes if n) or None,
                ]
            )
        print_table(
            ["JOB", "DESTINATION", "STATE", "ATTEMPTS", "SENT", "CONFIRMED", "ERROR / WARNING"],
            rows,
        )
    timeline = record["timeline"]
    print(f"\ntimeline ({len(timeline)})")
    if timeline:
        print_table(
            ["TIME", "EVENT", "ACTOR", "PEER", "JOB", "COUNT", "OUTCOME", "DETAIL"],
            [
                [
                    format_time(e["at"]),
                    e["event"],
                    e["actor"],
                    e["peer"],
                    e["job_id"],
                    e["count"],
                    e["outcome"],
                    e["detail"],
                ]
                for e in timeline
            ],
        )


def show_study(settings: Settings, args: argparse.Namespace) -> int:
    """Print one study's whole story (``dicomnode studies show``).

    Parameters
    ----------
    settings : Settings
        The database URL.
    args : argparse.Namespace
        ``study`` (a Study Instance UID) or ``accession``, ``json`` and ``show_phi``.

    Returns
    -------
    int
        Exit code 0.

    Raises
    ------
    LookupError
        If no study matches, or the accession number matches several (which are
        listed first); the CLI prints one line and exits with 1.
    """
    found = read(
        settings,
        studies.find_study,
        study_uid=args.study,
        accession=args.accession,
        show_phi=args.show_phi,
    )
    if found.story is None:
        if args.study is not None:
            raise LookupError(f"no study {args.study}")
        if not found.matches:
            # The number itself is patient data: not repeated without --show-phi.
            shown = f" {args.accession}" if args.show_phi else ""
            raise LookupError(f"no study with accession number{shown}")
        records = [summary_record(r, args.show_phi) for r in found.matches]
        if args.json:
            print_json({"matches": records})
        else:
            _print_summaries(records, args.show_phi)
        raise LookupError(
            f"the accession number matches {len(found.matches)} studies: give a Study Instance UID"
        )
    record = story_record(found.story, show_phi=args.show_phi)
    if args.json:
        print_json(record)
    else:
        _print_story(record, args.show_phi)
    return 0
