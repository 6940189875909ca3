"""How a job is printed: its JSON record, and the text of ``jobs show``.

``jobs list``, ``jobs show``, ``jobs purge`` and ``studies show`` print jobs read as
views (:mod:`dicomnode.db.queries`); the record's keys and their order are what
``--json`` has always printed.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from typing import Any

from dicomnode.cli.output import format_time, print_json, view_record
from dicomnode.db import JobDetail, JobView

STAGES = (
    "receive_s",
    "wait_s",
    "priors_s",  # finding the patient's earlier study, here or on the PACS (retrieving it)
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


def job_record(view: JobView | JobDetail, *, show_phi: bool = False) -> dict[str, Any]:
    """Return a job as a JSON-ready mapping (no patient data unless asked for).

    Parameters
    ----------
    view : JobView or JobDetail
        The job; in full (timings, summary, outputs, deliveries, history and the run's
        own times) for a :class:`~dicomnode.db.queries.JobDetail`.
    show_phi : bool
        Include the study's patient ID and accession number (``--show-phi``; the view
        must have been read with ``show_phi`` too).

    Returns
    -------
    dict[str, Any]
        The record.
    """
    job = view.job if isinstance(view, JobDetail) else view
    # Its fields are the keys, in order; patient data last, and only with --show-phi.
    record = view_record(job, show_phi=show_phi)
    if isinstance(view, JobDetail):
        record.update(
            lease_owner=view.lease_owner,
            claimed_by=view.claimed_by,
            lease_expires_at=view.lease_expires_at,
            run_after=view.run_after,
            timings=view.timings,
            summary=view.summary,
            selection=view.selection,
            priors=view.priors,
            # Their fields are the keys, in order: see OutputView and DeliveryView.
            outputs=[asdict(o) for o in view.outputs],
            deliveries=[asdict(d) for d in view.deliveries],
            history=[
                {
                    "at": e.at,
                    "from": e.from_state,
                    "to": e.to_state,
                    "attempt": e.attempt,
                    "counted": e.counted,
                    "worker": e.worker,
                    "note": e.note,
                }
                for e in view.history
            ],
        )
        # A re-send's claim moved started_at: the run's own start replaces it.
        record["started_at"], record["resent_at"] = view.run_started_at, view.resent_at
    return record


def print_job(detail: JobDetail, args: argparse.Namespace) -> int:
    """Print one job in full, as text or JSON (``jobs show``).

    Parameters
    ----------
    detail : JobDetail
        The job.
    args : argparse.Namespace
        ``json`` and ``show_phi``.

    Returns
    -------
    int
        Exit code 0.
    """
    phi = bool(getattr(args, "show_phi", False))
    record = job_record(detail, show_phi=phi)
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
    comparison = record["summary"].get("comparison")
    if comparison is not None:
        print(f"{'comparison':<14}{comparison['heading']}")
        for line in comparison.get("lines", []):
            print(f"  {line}")
    if record["selection"] is not None:
        _print_selection(record["selection"])
    if record["priors"] is not None:
        _print_priors(record["priors"])
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


def _print_selection(selection: dict[str, Any]) -> None:
    """Print a study-scope job's choice of series: the reason, then each series' verdict."""
    print(f"{'input series':<14}{selection['why']}")
    for entry in selection["series"]:
        number = "-" if entry["series_number"] is None else entry["series_number"]
        thickness = "-" if entry["thickness_mm"] is None else f"{entry['thickness_mm']:g} mm"
        print(
            f"  series {number:<5} {entry['slices']:>5} slices {thickness:>8}  "
            f"{entry['verdict']}  {entry['series_uid']}"
        )


def _print_priors(priors: dict[str, Any]) -> None:
    """Print which prior studies the job compared with and where they came from, or why none."""
    source = {None: "none", "node": "this node"}.get(priors["source"], priors["source"])
    print(f"{'priors':<14}from {source}" + (f": {priors['reason']}" if priors["reason"] else ""))
    for study in priors["studies"]:
        chosen = study["chosen"] or "no series fits"
        print(f"  study {study['study_uid']} ({study['study_date'] or 'no date'}): {chosen}")


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
