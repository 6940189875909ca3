"""The parsers of the commands whose code is imported only when they run.

Building the parser must not import the database layer, pydicom or pynetdicom: every
command, ``--help`` included, would pay for them at start-up. So the subcommands are
declared here, each naming its function as a :class:`~dicomnode.cli.commands.Command`,
and the modules that do the work are imported when one of them runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dicomnode.cli.arguments import add_when, closed_set, positive_int
from dicomnode.cli.commands import Command
from dicomnode.db import EVENTS

DEFAULT_CALLING_AE = "IMPORT"
STUDY_STATES = ("receiving", "complete", "purged")
# The job states (dicomnode.db.models.JobState) and those that end a job
# (dicomnode.db.jobs.FINAL_STATES), spelled out so that the parser needs no database
# layer; a test keeps them equal.
JOB_STATES = ("queued", "running", "sending", "done", "failed", "cancelled")
FINAL_STATE_NAMES = ("done", "failed", "cancelled")

event_name = closed_set("audit event", EVENTS)
study_state = closed_set("study state", STUDY_STATES)
job_state = closed_set("job state", JOB_STATES)


def ended_state(text: str) -> str:
    """Check ``jobs purge --state``: only ended jobs may be purged.

    Parameters
    ----------
    text : str
        A job state.

    Returns
    -------
    str
        The state: done, failed or cancelled.

    Raises
    ------
    argparse.ArgumentTypeError
        If it is unknown, or a state of jobs that have not ended.
    """
    job_state(text)
    if text not in FINAL_STATE_NAMES:
        raise argparse.ArgumentTypeError(
            f"refusing to purge {text} jobs: only ended jobs ({', '.join(FINAL_STATE_NAMES)}) "
            "can be purged"
        )
    return text


def ae_title(value: str) -> str:
    """Check an AE title given on the command line (``--calling-ae``).

    Parameters
    ----------
    value : str
        The argument.

    Returns
    -------
    str
        The title without surrounding spaces.

    Raises
    ------
    argparse.ArgumentTypeError
        If it is empty, longer than 16 characters, or has a backslash or a character
        that is not printable ASCII.
    """
    title = value.strip()
    if not 1 <= len(title) <= 16 or "\\" in title or not (title.isascii() and title.isprintable()):
        raise argparse.ArgumentTypeError(
            f"not an AE title (1-16 printable ASCII characters, no backslash): {value!r}"
        )
    return title


def progress_option(parser: argparse.ArgumentParser, what: str) -> None:
    """Add ``--progress/--no-progress`` for a command that works through ``what``."""
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"show a progress bar over the {what} on stderr (default: only when stderr is "
        "a terminal and --json is not given)",
    )


def register_studies(sub: Any) -> None:
    """Add ``dicomnode studies`` to the parser.

    Parameters
    ----------
    sub : argparse._SubParsersAction
        The top-level subcommands.
    """
    commands = sub.add_parser(
        "studies", help="received studies: their series, jobs, deliveries and audit trail"
    ).add_subparsers(dest="studies_command", required=True, metavar="COMMAND")
    phi_help = "also print patient ID and accession number (patient data)"

    p = commands.add_parser(
        "list",
        help="list studies, newest first (by their latest received instance)",
        description="Patient ID and accession number filter, but are printed only with "
        "--show-phi. A study is 'receiving' while a series of it is, 'purged' once "
        "retention deleted the images of all its series, else 'complete'.",
    )
    add_when(p, "--since", "only studies that received an instance since")
    p.add_argument("--accession", metavar="NUMBER", help="only studies of this accession number")
    p.add_argument("--patient-id", metavar="ID", help="only studies of this patient ID")
    p.add_argument(
        "--state", type=study_state, help="only studies in this state: receiving, complete, purged"
    )
    p.add_argument("--limit", type=positive_int, default=50, help="at most this many (default 50)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--show-phi", action="store_true", help=phi_help)
    p.set_defaults(run=Command("dicomnode.cli.studies:list_studies"))

    p = commands.add_parser(
        "show",
        help="one study's whole story: series, jobs, outputs, deliveries, audit timeline",
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("study", nargs="?", metavar="STUDY", help="Study Instance UID")
    which.add_argument(
        "--accession", metavar="NUMBER", help="the study with this accession number instead"
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--show-phi", action="store_true", help=phi_help)
    p.set_defaults(run=Command("dicomnode.cli.studies:show_study"))


def register_destinations(sub: Any) -> None:
    """Add ``dicomnode destinations`` to the parser.

    Parameters
    ----------
    sub : argparse._SubParsersAction
        The top-level subcommands.
    """
    commands = sub.add_parser(
        "destinations", help="the configured destinations: deliveries to them, C-ECHO"
    ).add_subparsers(dest="destinations_command", required=True, metavar="COMMAND")
    p = commands.add_parser(
        "list",
        help="list the [[destinations]] with their deliveries sent, pending and failed",
        description="The delivery counts come from the database; when it cannot be read "
        "the configuration is printed alone, with a one-line note on stderr.",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=Command("dicomnode.cli.destinations:list_destinations"))
    p = commands.add_parser(
        "echo",
        help="C-ECHO destinations; exit 1 if any does not answer",
        description="One line per destination: 'NAME ok (AE@host:port, N ms)' or "
        "'NAME failed: reason'.",
    )
    p.add_argument("names", nargs="*", metavar="NAME", help="[[destinations]] names (default: all)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=Command("dicomnode.cli.destinations:echo_destinations"))


def register_transfer(sub: Any) -> None:
    """Add this module's commands to the ``dicomnode`` parser.

    Parameters
    ----------
    sub : argparse._SubParsersAction
        The top-level subcommands.
    """
    p = sub.add_parser(
        "import",
        help="backfill DICOM files or folders into the node, as if received over C-STORE",
        description="Store DICOM files (folders: recursively) the way the listener stores "
        "received instances: the same checks, durable writes, duplicate and replace rules; "
        "the node's completion sweep completes their series. Files that are not DICOM "
        "instances (no DICM prefix, a DICOMDIR) are skipped. Exit 0 when all were imported "
        "or skipped, 1 when an instance was refused or storage ran low, 2 for bad usage.",
    )
    p.add_argument("paths", type=Path, nargs="+", metavar="PATH", help="DICOM files or folders")
    p.add_argument(
        "--calling-ae",
        type=ae_title,
        default=DEFAULT_CALLING_AE,
        metavar="AE",
        help=f"AE title recorded as the sender of the instances (default {DEFAULT_CALLING_AE})",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    progress_option(p, "files")
    p.set_defaults(run=Command("dicomnode.cli.transfer:import_command", reads_dicom=True))

    p = sub.add_parser(
        "send",
        help="C-STORE DICOM files, or a job's stored outputs, to a configured destination",
        description="Send a DICOM file or folder (recursively), or the stored outputs of a "
        "job (ID or job:ID), to a [[destinations]] entry, one C-STORE status per object. "
        "A job's deliveries are not changed: this is a manual re-send. Exit 0 when every "
        "object was stored (warnings included), 1 when one was not or the destination "
        "cannot be reached, 2 for bad usage.",
    )
    p.add_argument(
        "source",
        metavar="SOURCE",
        help="a DICOM file or folder, or a job id (ID or job:ID; ./ID for a file named ID)",
    )
    p.add_argument("destination", metavar="DESTINATION_NAME", help="a [[destinations]] name")
    p.add_argument("--json", action="store_true", help="print JSON")
    progress_option(p, "objects")
    p.set_defaults(run=Command("dicomnode.cli.transfer:send_command", reads_dicom=True))


def register_retention(sub: Any) -> None:
    """Add ``dicomnode purge`` to the parser.

    Parameters
    ----------
    sub : argparse._SubParsersAction
        The top-level subcommands.
    """
    p = sub.add_parser(
        "purge",
        help="apply the retention rules now: delete instances and results that are due",
        description="Delete received instances and our results per [retention]: series whose "
        "jobs all ended done or cancelled after done_days, failed ones after failed_days, and, "
        "while the disk is below the emergency threshold, the oldest done ones early. A "
        "series with a job queued, running or sending is never deleted. Exit 1 when the disk "
        "stays below the emergency threshold.",
    )
    p.add_argument("--dry-run", action="store_true", help="only show what would be deleted")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=Command("dicomnode.cli.retention:purge"))


def register_audit(sub: Any) -> None:
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
        f"patient data. Events: {', '.join(EVENTS)}.",
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
    p.set_defaults(run=Command("dicomnode.cli.audit:export"))
    p = commands.add_parser(
        "prune",
        help="delete entries before a date, once an export is checked to hold them all",
        description="Reads FILE (written by `dicomnode audit export`, CSV or JSON) and "
        "compares it with every entry before --before; deletes them only if each is there "
        "unchanged, and records the prune, with FILE's SHA-256, as an audit-pruned entry. "
        "Export with --until DATE, archive the file, then prune with --before DATE and "
        "--exported-to the archived copy.",
    )
    add_when(p, "--before", "delete entries before", required=True)
    p.add_argument(
        "--exported-to",
        type=Path,
        required=True,
        metavar="FILE",
        help="the export that holds them (checked entry by entry before anything is deleted)",
    )
    p.add_argument("--dry-run", action="store_true", help="only check and say what would go")
    p.set_defaults(run=Command("dicomnode.cli.audit:prune"))


def register_evaluate(sub: Any) -> None:
    """Add ``dicomnode evaluate`` to the parser.

    Parameters
    ----------
    sub : argparse._SubParsersAction
        The top-level subcommands.
    """
    p = sub.add_parser(
        "evaluate",
        help="compare our SEGs and findings with references (SEG, NIfTI, LIDC XML)",
        description="Compare our SEGs (Dice, IoU, HD95, volumes) and findings (sensitivity, "
        "precision, FROC, CPM, AUC) with reference DICOM SEGs, NIfTI label volumes or LIDC "
        "XML annotations, per case and overall.",
    )
    p.add_argument("ours", type=Path, help="our SEG (or findings JSON) file, or a folder of them")
    p.add_argument(
        "reference", type=Path, help="reference SEG, NIfTI (.nii/.nii.gz) or LIDC XML, or a folder"
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument(
        "--images",
        type=Path,
        action="append",
        metavar="DIR",
        help="source series folder, for LIDC and NIfTI geometry and plot backgrounds (repeatable)",
    )
    p.add_argument(
        "--label-map",
        action="append",
        metavar='N="LABEL"',
        help="NIfTI label value N is our segment LABEL (repeatable, or comma-separated); "
        "default: value N is segment number N",
    )
    p.add_argument(
        "--segment", metavar="LABEL", help="LIDC: our segment to compare (default: any *nodule*)"
    )
    p.add_argument(
        "--findings",
        type=Path,
        metavar="FILE.json",
        help='LIDC detection: a JSON list of {"center": [x, y, z] (LPS mm), "diameter_mm", '
        '"probability"}, or an object of series UID -> such lists',
    )
    p.add_argument(
        "--min-readers",
        type=int,
        default=1,
        metavar="N",
        help="LIDC: nodules (and outline voxels) marked by at least N readers (default 1)",
    )
    p.add_argument(
        "--include-small",
        action="store_true",
        help="LIDC detection: also nodules no reader outlined (< 3 mm)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=0.5,
        help="detection: findings with probability >= this count (default 0.5)",
    )
    p.add_argument("--plots", type=Path, metavar="DIR", help="write PNG plots into DIR")
    p.add_argument(
        "--progress",
        action="store_true",
        help="show a progress bar on stderr (default: only when stderr is a terminal "
        "and --json is not given)",
    )
    p.set_defaults(run=Command("dicomnode.cli.evaluate:evaluate", reads_dicom=True))
