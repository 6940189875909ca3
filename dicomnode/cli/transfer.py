"""``dicomnode import`` and ``dicomnode send``: move DICOM files in and out by hand.

``import`` backfills files or folders into the node as if they had arrived over
C-STORE: each file goes through the listener's own durable path
(:class:`dicomnode.store.ingest.Ingestor`: header checks, UID safety, fsync, rename,
row commit, the same duplicate and replace rules), and the running node's completion
sweep completes the series as usual. Only what the listener would accept is taken:
its SOP classes and transfer syntaxes.

``send`` sends files, or the stored outputs of a job, to a configured destination
with C-STORE, one status per object. Re-sending a job's outputs this way is a
manual action: the job's deliveries (the workers' state machine) are not touched.

Reports name files by their path below the folder given (or their file name), and
give reasons without patient data.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import mmap
import re
import sys
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicomnode.cli.database import open_database
from dicomnode.cli.output import print_json
from dicomnode.config import Destination, Settings
from dicomnode.db import audit, migrate
from dicomnode.db.engine import make_engine, session_factory, transaction
from dicomnode.errors import DicomnodeError, IngestError, InstanceTooLarge, OutOfResources
from dicomnode.evaluate.progress import Progress

if TYPE_CHECKING:
    from pydicom.dataset import Dataset
    from pynetdicom.association import Association

    from dicomnode.db.engine import Session, sessionmaker
    from dicomnode.store.ingest import Ingestor

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
MAX_PROBLEM_LINES = 20  # per report, in the human output; JSON lists them all
MAX_CONTEXTS = 128  # presentation contexts one association may propose (PS3.8 9.3.2.2)
_COPY_CHUNK = 2**20
_NOT_DICOM = "not a DICOM file (no DICM prefix)"
_DICOMDIR = "a DICOMDIR (Media Storage Directory), not an instance"
_JOB = re.compile(r"(?:job:)?(\d+)")


# --- shared --------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceFile:
    """A file to import or send, and the name reports use for it.

    Attributes
    ----------
    path : Path
        Where it is.
    name : str
        Its path relative to the folder it was found in, or its file name when it was
        given itself (job outputs: their path relative to the spool).
    """

    path: Path
    name: str


def find_files(paths: Sequence[Path], exclude: Path | None = None) -> list[SourceFile]:
    """List the files under ``paths``, recursively, in a stable order.

    Parameters
    ----------
    paths : Sequence[Path]
        Files and folders.
    exclude : Path, optional
        A folder whose files are left out (the node's own spool).

    Returns
    -------
    list[SourceFile]
        Each file once per mention, folders walked in sorted order.
    """
    skip = exclude.resolve() if exclude is not None else None
    found: list[SourceFile] = []
    for root in paths:
        if root.is_dir():
            for path in sorted(root.rglob("*")):
                if skip is not None and path.resolve().is_relative_to(skip):
                    continue
                if path.is_file():
                    found.append(SourceFile(path, path.relative_to(root).as_posix()))
        else:
            found.append(SourceFile(root, root.name))
    return found


def has_dicm_prefix(path: Path) -> bool:
    """Return whether a file starts like a DICOM file (128-byte preamble, then ``DICM``).

    Parameters
    ----------
    path : Path
        The file.

    Returns
    -------
    bool
        True for a Part 10 file.

    Raises
    ------
    OSError
        If it cannot be read.
    """
    with path.open("rb") as fp:
        head = fp.read(132)
    return len(head) == 132 and head[128:] == b"DICM"


def _missing(paths: Sequence[Path]) -> Path | None:
    return next((p for p in paths if not p.exists()), None)


def _usage_error(message: str) -> int:
    print(f"dicomnode: {message}", file=sys.stderr)
    return EXIT_USAGE


def _show_progress(args: argparse.Namespace) -> bool:
    if args.progress is not None:
        return bool(args.progress)
    return sys.stderr.isatty() and not args.json


def _end_progress(progress: Progress) -> None:
    """End the bar's line when the loop stopped early (the bar ends it after the last)."""
    if progress.enabled and 0 < progress.done < progress.total:
        progress.stream.write("\n")
        progress.stream.flush()


# pydicom.uid.MediaStorageDirectoryStorage (a DICOMDIR), without importing pydicom at
# start-up: pydicom is imported by the functions that read files, so that the parser,
# which registers `import` and `send` from here, stays fast for every other command.
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"


def _os_reason(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0) or type(exc).__name__


def _uid_name(uid: str) -> str:
    from pydicom.uid import UID

    name = UID(uid).name
    return f"{uid} ({name})" if name and name != uid else uid


def _print_problems(problems: Sequence[dict[str, Any]]) -> None:
    for problem in problems[:MAX_PROBLEM_LINES]:
        print(f"{problem['outcome']:<8} {problem['file']}: {problem['reason']}")
    if len(problems) > MAX_PROBLEM_LINES:
        print(f"... and {len(problems) - MAX_PROBLEM_LINES} more (--json lists them all)")


# --- import --------------------------------------------------------------------------


@dataclass(frozen=True)
class Imported:
    """An instance the Ingestor accepted."""

    study_uid: str
    series_uid: str
    duplicate: bool
    replaced: bool


@dataclass(frozen=True)
class Problem:
    """A file that was not imported, and why.

    Attributes
    ----------
    outcome : str
        ``refused`` (an instance the listener would refuse too) or ``skipped`` (not an
        instance: no DICOM file, a DICOMDIR).
    reason : str
        One line without patient data.
    """

    outcome: str
    reason: str


@dataclass
class ImportReport:
    """What an import did, counted."""

    imported: int = 0
    duplicates: int = 0
    replaced: int = 0
    series: set[str] = field(default_factory=set)
    studies: set[str] = field(default_factory=set)
    problems: list[dict[str, Any]] = field(default_factory=list)
    stopped: str | None = None
    # series UID -> [study UID, instances, bytes, identical resends], for the audit trail
    per_series: dict[str, list[Any]] = field(default_factory=dict)

    def add(self, source: SourceFile, result: Imported | Problem) -> None:
        """Count one file's result.

        Parameters
        ----------
        source : SourceFile
            The file.
        result : Imported or Problem
            What happened to it.
        """
        if isinstance(result, Problem):
            self.problems.append(
                {"file": source.name, "outcome": result.outcome, "reason": result.reason}
            )
            return
        self.imported += 1
        self.duplicates += result.duplicate
        self.replaced += result.replaced
        self.series.add(result.series_uid)
        self.studies.add(result.study_uid)
        tally = self.per_series.setdefault(result.series_uid, [result.study_uid, 0, 0, 0])
        tally[1] += 1
        tally[3] += result.duplicate
        # A source that went away after it was imported still counts, without its size.
        with contextlib.suppress(OSError):
            tally[2] += source.path.stat().st_size

    def count(self, outcome: str) -> int:
        """Return how many files had ``outcome`` (``refused`` or ``skipped``)."""
        return sum(p["outcome"] == outcome for p in self.problems)

    def record(self) -> dict[str, Any]:
        """Return the report as a JSON-ready mapping."""
        return {
            "imported": self.imported,
            "duplicates": self.duplicates,
            "replaced": self.replaced,
            "series": len(self.series),
            "studies": len(self.studies),
            "refused": self.count("refused"),
            "skipped": self.count("skipped"),
            "stopped": self.stopped,
            "problems": self.problems,
        }

    def summary(self) -> str:
        """Return the one-line summary."""
        return (
            f"imported {self.imported} instance(s) in {len(self.series)} series of "
            f"{len(self.studies)} study(ies) ({self.duplicates} duplicate(s)), "
            f"{self.count('refused')} refused, {self.count('skipped')} skipped"
        )


def _is_storage_error(exc: IngestError) -> bool:
    """Whether ``exc`` stops the import (disk or database), not just refuses one file."""
    return isinstance(exc, OutOfResources) and not isinstance(exc, InstanceTooLarge)


def _storage_error(exc: OSError) -> OutOfResources:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutOfResources("storage is full")
    return OutOfResources(f"cannot write to storage ({_os_reason(exc)})")


class _SourceUnreadable(Exception):
    """Reading the file to import failed (not the spool)."""


def _stage_copy(source: Path, tmp: Path) -> Path:
    """Copy ``source`` to a new file in the spool's ``tmp/`` (made durable by the Ingestor).

    Raises
    ------
    _SourceUnreadable
        If the source cannot be read.
    OutOfResources
        If the copy cannot be written.
    """
    staged = tmp / f"import-{uuid.uuid4().hex}.part"
    try:
        src = source.open("rb")
    except OSError as exc:
        raise _SourceUnreadable(_os_reason(exc)) from None
    try:
        with src, staged.open("xb") as out:
            while True:
                try:
                    chunk = src.read(_COPY_CHUNK)
                except OSError as exc:
                    raise _SourceUnreadable(_os_reason(exc)) from None
                if not chunk:
                    break
                out.write(chunk)
    except OSError as exc:
        staged.unlink(missing_ok=True)
        raise _storage_error(exc) from None
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    return staged


def import_file(ingestor: Ingestor, path: Path, calling_ae: str) -> Imported | Problem:
    """Import one file the way the listener stores a received instance.

    The checks the listener makes at association time come first (its SOP classes and
    transfer syntaxes), then the Ingestor's own: the file is copied into the spool's
    ``tmp/`` and handed to :meth:`~dicomnode.store.ingest.Ingestor.store_file`, which
    checks it, makes it durable, renames it into place and commits its row.

    Parameters
    ----------
    ingestor : Ingestor
        The node's ingestor (its spool, database and limits).
    path : Path
        The file.
    calling_ae : str
        Recorded with the instance as the sender's AE title.

    Returns
    -------
    Imported or Problem
        Accepted (possibly as a duplicate), or refused or skipped with the reason.

    Raises
    ------
    OutOfResources
        If the spool's disk is below its watermark or full, or the database cannot
        take the row: the import should stop (:class:`InstanceTooLarge` is a refusal
        and returned as one).
    """
    from dicomnode.dimse.contexts import ACCEPTED_SOP_CLASSES, ACCEPTED_TRANSFER_SYNTAXES
    from dicomnode.store.ingest import read_header

    try:
        if not has_dicm_prefix(path):
            return Problem("skipped", _NOT_DICOM)
        size = path.stat().st_size
    except OSError as exc:
        return Problem("refused", f"cannot be read ({_os_reason(exc)})")
    ingestor.check_space()
    if ingestor.max_instance_bytes and size > ingestor.max_instance_bytes:
        # Before the copy: a file over the limit must not fill tmp/ first.
        return Problem(
            "refused", f"instance of {size // 2**20} MiB exceeds storage.max_instance_mb"
        )
    import pydicom
    from pydicom.dataset import Dataset

    try:
        meta: Dataset = pydicom.filereader.read_file_meta_info(path)
    except Exception:  # the Ingestor's header check says what is wrong with it
        meta = Dataset()
    meta_class = str(meta.get("MediaStorageSOPClassUID", "") or "") or None
    meta_instance = str(meta.get("MediaStorageSOPInstanceUID", "") or "") or None
    if meta_class == MEDIA_STORAGE_DIRECTORY:
        return Problem("skipped", _DICOMDIR)
    try:
        # The sender would name these in its request (its presentation context and
        # Affected SOP Instance UID); the file meta stands in for them when the
        # dataset leaves them empty, as the listener lets a request do.
        with path.open("rb") as fp, mmap.mmap(fp.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            header = read_header(fp, mm, meta_class, meta_instance)
    except IngestError as exc:
        if _is_storage_error(exc):
            raise
        return Problem("refused", str(exc))
    except (OSError, ValueError) as exc:
        reason = _os_reason(exc) if isinstance(exc, OSError) else type(exc).__name__
        return Problem("refused", f"cannot be read ({reason})")
    if header.sop_class_uid == MEDIA_STORAGE_DIRECTORY:
        return Problem("skipped", _DICOMDIR)
    if header.sop_class_uid not in ACCEPTED_SOP_CLASSES:
        return Problem(
            "refused", f"SOP class {_uid_name(header.sop_class_uid)} is not accepted by the node"
        )
    if header.transfer_syntax_uid not in ACCEPTED_TRANSFER_SYNTAXES:
        return Problem(
            "refused",
            f"transfer syntax {_uid_name(header.transfer_syntax_uid) or '(none)'} is not "
            "accepted by the node",
        )
    try:
        staged = _stage_copy(path, ingestor.spool.tmp)
    except _SourceUnreadable as exc:
        return Problem("refused", f"cannot be read ({exc})")
    try:
        outcome = ingestor.store_file(
            staged,
            calling_ae=calling_ae,
            sop_class_uid=header.sop_class_uid,
            sop_instance_uid=header.sop_instance_uid,
        )
    except IngestError as exc:
        if _is_storage_error(exc):
            raise
        return Problem("refused", str(exc))
    return Imported(header.study_uid, outcome.series_uid, outcome.duplicate, outcome.replaced)


def _audit_import(sessions: sessionmaker[Session], report: ImportReport, calling_ae: str) -> None:
    if not report.per_series:
        return
    actor = audit.admin_actor()
    with transaction(sessions) as session:
        for series_uid, (study_uid, count, size, dupes) in report.per_series.items():
            audit.record(
                session,
                "instances-imported",
                actor=actor,
                study_uid=study_uid,
                series_uid=series_uid,
                count=count,
                size_bytes=size,
                detail=f"dicomnode import as calling AE {calling_ae}"
                + (f"; {dupes} identical to what was stored" if dupes else ""),
            )


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
    from dicomnode.store.ingest import Ingestor
    from dicomnode.store.spool import Spool

    missing = _missing(args.paths)
    if missing is not None:
        return _usage_error(f"no such file or folder: {missing}")
    spool_root = settings.storage.path.resolve()
    inside = next((p for p in args.paths if p.resolve().is_relative_to(spool_root)), None)
    if inside is not None:
        return _usage_error(f"{inside} is inside the node's storage path: nothing to import")
    engine = make_engine(settings.database.url, create=False)
    report = ImportReport()
    try:
        migrate.require_current(engine)
        ingestor = Ingestor(
            Spool(settings.storage.path),
            session_factory(engine),
            min_free_bytes=settings.storage.min_free_mb * 2**20,
            max_instance_bytes=settings.storage.max_instance_mb * 2**20,
        )
        files = find_files(args.paths, exclude=spool_root)
        progress = Progress(len(files), _show_progress(args))
        try:
            for source in files:
                try:
                    report.add(source, import_file(ingestor, source.path, args.calling_ae))
                except OutOfResources as exc:
                    report.stopped = str(exc)
                    break
                progress.advance()
        finally:
            # Interrupted (Ctrl-C) or not: what was stored is in the trail.
            _end_progress(progress)
            _audit_import(session_factory(engine), report, args.calling_ae)
    finally:
        engine.dispose()
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


@dataclass(frozen=True)
class PlannedFile:
    """A file to send, with what its presentation context needs."""

    index: int
    source: SourceFile
    sop_class_uid: str
    transfer_syntax_uid: str
    sop_instance_uid: str | None


@dataclass
class SendReport:
    """What a send did, object by object."""

    destination: Destination
    results: dict[int, dict[str, Any]] = field(default_factory=dict)
    error: str | None = None  # the association was lost or could not be made

    def set(self, index: int, source: SourceFile, outcome: str, **extra: Any) -> None:
        """Record the outcome of the ``index``-th file.

        Parameters
        ----------
        index : int
            Its position among the files.
        source : SourceFile
            The file.
        outcome : str
            ``stored``, ``warning``, ``failed``, ``not sent`` or ``skipped``.
        **extra : Any
            ``sop_instance_uid``, ``status``, ``reason``.
        """
        record: dict[str, Any] = {
            "file": source.name,
            "outcome": outcome,
            "sop_instance_uid": None,
            "status": None,
            "reason": None,
        }
        record.update(extra)
        if record["status"] is not None:
            record["status_hex"] = f"0x{record['status']:04X}"
        self.results[index] = record

    @property
    def objects(self) -> list[dict[str, Any]]:
        """Return the outcomes in the order of the files."""
        return [self.results[i] for i in sorted(self.results)]

    def count(self, *outcomes: str) -> int:
        """Return how many files had one of ``outcomes``."""
        return sum(r["outcome"] in outcomes for r in self.results.values())

    def record(self) -> dict[str, Any]:
        """Return the report as a JSON-ready mapping."""
        d = self.destination
        return {
            "destination": d.name,
            "ae_title": d.ae_title,
            "host": d.host,
            "port": d.port,
            "sent": self.count("stored", "warning"),
            "warnings": self.count("warning"),
            "failed": self.count("failed", "not sent"),
            "skipped": self.count("skipped"),
            "error": self.error,
            "objects": self.objects,
        }


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


def job_outputs(settings: Settings, job_id: int) -> list[SourceFile]:
    """Return the stored outputs of a job, as files in the spool.

    Parameters
    ----------
    settings : Settings
        Database and storage path.
    job_id : int
        The job.

    Returns
    -------
    list[SourceFile]
        One per Output row, named by its path relative to the spool.

    Raises
    ------
    LookupError
        If there is no such job.
    DicomnodeError
        If the job has no outputs, or the schema is not current.
    """
    from dicomnode.db.models import Job

    engine = open_database(settings)
    try:
        with session_factory(engine)() as session:
            job = session.get(Job, job_id)
            if job is None:
                raise LookupError(f"no job with id {job_id}")
            paths = [o.path for o in sorted(job.outputs, key=lambda o: o.id)]
            state = job.state.value
    finally:
        engine.dispose()
    if not paths:
        raise DicomnodeError(f"job {job_id} ({state}) has no stored outputs to send")
    root = settings.storage.path
    return [SourceFile(root / p, p) for p in paths]


def _plan(files: Sequence[SourceFile], report: SendReport) -> list[PlannedFile]:
    """Read each file's header for its presentation context; record those not sendable."""
    import pydicom

    planned: list[PlannedFile] = []
    for index, source in enumerate(files):
        try:
            if not source.path.is_file():
                report.set(index, source, "failed", reason="file not found")
                continue
            if not has_dicm_prefix(source.path):
                report.set(index, source, "skipped", reason=_NOT_DICOM)
                continue
            ds = pydicom.dcmread(
                source.path,
                stop_before_pixels=True,
                specific_tags=["SOPClassUID", "SOPInstanceUID"],
            )
        except OSError as exc:
            report.set(index, source, "failed", reason=f"cannot be read ({_os_reason(exc)})")
            continue
        except Exception as exc:
            report.set(index, source, "failed", reason=f"cannot be read ({type(exc).__name__})")
            continue
        meta = ds.file_meta
        sop_class = str(ds.get("SOPClassUID", "") or meta.get("MediaStorageSOPClassUID", ""))
        sop_instance = str(ds.get("SOPInstanceUID", "") or "") or None
        syntax = str(meta.get("TransferSyntaxUID", "") or "")
        if sop_class == MEDIA_STORAGE_DIRECTORY:
            report.set(index, source, "skipped", reason=_DICOMDIR)
        elif not sop_class or not syntax:
            missing = "SOPClassUID" if not sop_class else "TransferSyntaxUID"
            report.set(index, source, "failed", reason=f"{missing} is missing")
        else:
            planned.append(PlannedFile(index, source, sop_class, syntax, sop_instance))
    return planned


def _groups(planned: Sequence[PlannedFile]) -> Iterator[list[PlannedFile]]:
    """Split the files so that no association needs more than 128 presentation contexts."""
    pairs = sorted({(p.sop_class_uid, p.transfer_syntax_uid) for p in planned})
    for start in range(0, len(pairs), MAX_CONTEXTS):
        chunk = set(pairs[start : start + MAX_CONTEXTS])
        yield [p for p in planned if (p.sop_class_uid, p.transfer_syntax_uid) in chunk]


def _status_text(code: int) -> str:
    from pynetdicom.status import GENERAL_STATUS, STORAGE_SERVICE_CLASS_STATUS

    known = STORAGE_SERVICE_CLASS_STATUS.get(code) or GENERAL_STATUS.get(code)
    if known is not None:
        return f"0x{code:04X} ({known[1]})"
    return f"0x{code:04X}"


def _send_one(
    assoc: Association, item: PlannedFile, accepted: set[tuple[str, str]], report: SendReport
) -> bool:
    """Send one file on an open association; return False when the association is gone."""
    from pynetdicom.status import code_to_category

    source = item.source
    uid = item.sop_instance_uid
    if (item.sop_class_uid, item.transfer_syntax_uid) not in accepted:
        reason = (
            f"the destination does not accept SOP class {_uid_name(item.sop_class_uid)} in "
            f"transfer syntax {_uid_name(item.transfer_syntax_uid)}"
        )
        report.set(item.index, source, "failed", sop_instance_uid=uid, reason=reason)
        return True
    import pydicom

    try:
        ds = pydicom.dcmread(source.path)
    except Exception as exc:
        reason = f"cannot be read ({type(exc).__name__})"
        report.set(item.index, source, "failed", sop_instance_uid=uid, reason=reason)
        return True
    name = report.destination.name
    if not assoc.is_established:  # the peer aborted after its last answer
        report.error = f"destination {name}: association aborted by the peer"
        report.set(item.index, source, "not sent", sop_instance_uid=uid, reason=report.error)
        return False
    try:
        reply = assoc.send_c_store(ds)
    except (ValueError, AttributeError) as exc:  # pynetdicom cannot encode or place it
        reason = (
            f"cannot be sent ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:120]})"
        )
        report.set(item.index, source, "failed", sop_instance_uid=uid, reason=reason)
        return True
    if "Status" not in reply:
        report.error = f"destination {name}: no reply to C-STORE (connection lost)"
        reason = "no reply (connection lost): it may or may not have been stored"
        report.set(item.index, source, "failed", sop_instance_uid=uid, reason=reason)
        return False
    code = int(reply.Status)
    category = code_to_category(code)
    comment = str(reply.get("ErrorComment", "") or "").strip()
    text = _status_text(code) + (f": {comment}" if comment else "")
    if category == "Success":
        report.set(item.index, source, "stored", sop_instance_uid=uid, status=code)
    elif category == "Warning":
        reason = f"stored with warning {text}"
        report.set(item.index, source, "warning", sop_instance_uid=uid, status=code, reason=reason)
    else:
        reason = f"status {text}"
        report.set(item.index, source, "failed", sop_instance_uid=uid, status=code, reason=reason)
    return True


def send_planned(
    destination: Destination,
    planned: Sequence[PlannedFile],
    calling_ae: str,
    report: SendReport,
    progress: Progress,
) -> None:
    """Send the planned files with C-STORE, one status per file, into ``report``.

    One association per (at most) 128 presentation contexts, each file offered in its
    own transfer syntax. A file the destination refuses, at negotiation or with a
    failure status, is recorded and the rest go on; a lost association ends the send,
    the files not yet sent recorded as ``not sent``.

    Parameters
    ----------
    destination : Destination
        Where to (TLS and timeouts as configured).
    planned : Sequence[PlannedFile]
        The files, with their SOP classes and transfer syntaxes.
    calling_ae : str
        Our AE title.
    report : SendReport
        Filled in.
    progress : Progress
        Advanced once per file.

    Raises
    ------
    TransientJobError, PermanentJobError
        If the first association cannot be made (nothing was sent then).
    """
    from pynetdicom import AE

    from dicomnode.errors import JobError
    from dicomnode.send.scu import associate

    handled: set[int] = set()
    for group in _groups(planned):
        ae = AE(ae_title=calling_ae)
        for sop_class, syntax in sorted({(p.sop_class_uid, p.transfer_syntax_uid) for p in group}):
            ae.add_requested_context(sop_class, [syntax])
        try:
            assoc = associate(ae, destination)
        except JobError as exc:
            if not handled:
                raise
            report.error = str(exc)
            break
        try:
            accepted = {
                (str(c.abstract_syntax), str(c.transfer_syntax[0])) for c in assoc.accepted_contexts
            }
            for item in group:
                alive = _send_one(assoc, item, accepted, report)
                handled.add(item.index)
                progress.advance()
                if not alive:
                    break
        finally:
            if assoc.is_established:
                assoc.release()
        if report.error is not None:
            break
    for item in (p for p in planned if p.index not in handled):
        report.set(
            item.index,
            item.source,
            "not sent",
            sop_instance_uid=item.sop_instance_uid,
            reason=report.error,
        )


def _audit_send(
    settings: Settings,
    source: int | Path,
    destination: Destination,
    record: dict[str, Any],
    error: str | None,
) -> None:
    """Record a manual send in the audit trail (a database that is away only warns)."""
    engine = open_database(settings)
    try:
        with transaction(session_factory(engine)) as session:
            audit.record(
                session,
                "results-resent",
                outcome="failure" if record["failed"] or error else "success",
                actor=audit.admin_actor(),
                peer=f"{destination.ae_title}@{destination.host}:{destination.port}",
                destination=destination.name,
                job_id=source if isinstance(source, int) else None,
                count=record["sent"],
                detail=f"dicomnode send: {record['sent']} stored, {record['failed']} not"
                + (f"; {error}" if error else ""),
            )
    except Exception as exc:  # the objects went (or not) whatever the trail says
        print(
            f"dicomnode: warning: the send was not recorded in the audit trail: "
            f"{type(exc).__name__}",
            file=sys.stderr,
        )
    finally:
        engine.dispose()


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
    destination = settings.destination(args.destination)
    try:
        source = parse_source(args.source)
    except ValueError as exc:
        return _usage_error(str(exc))
    if isinstance(source, Path):
        if not source.exists():
            return _usage_error(f"no such file or folder: {source}")
        files = find_files([source])
    else:
        files = job_outputs(settings, source)
    if not log.isEnabledFor(logging.DEBUG):
        # Our one line says what failed; pynetdicom's own error lines only repeat it.
        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    report = SendReport(destination)
    planned = _plan(files, report)
    progress = Progress(len(planned), _show_progress(args))
    try:
        send_planned(destination, planned, settings.listener.ae_title, report, progress)
    except Exception as exc:  # unreachable: the attempt is recorded all the same
        _audit_send(settings, source, destination, report.record(), f"{exc}".splitlines()[0])
        raise
    finally:
        _end_progress(progress)
    record = report.record()
    _audit_send(settings, source, destination, record, report.error)
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
            f"({destination.ae_title}@{destination.host}:{destination.port})"
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


# --- parsers -------------------------------------------------------------------------
