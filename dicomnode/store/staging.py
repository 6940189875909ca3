"""Import staging: files or folders taken into the node as if they came over C-STORE.

Each file goes through the listener's own durable path
(:class:`dicomnode.store.ingest.Ingestor`: header checks, UID safety, fsync, rename,
row commit, the same duplicate and replace rules), and the running node's completion
sweep completes the series as usual. Only what the listener would accept is taken:
its SOP classes and transfer syntaxes, which the caller passes in (they live in
:mod:`dicomnode.dimse.contexts`, a layer above this one).

The files to import or send (:class:`SourceFile`, :func:`find_files`) and the reasons a
file is not an instance are here too: sending by hand (:mod:`dicomnode.send.planning`)
reads files the same way.

Reports name files by their path below the folder given (or their file name), and
give reasons without patient data.
"""

from __future__ import annotations

import contextlib
import mmap
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from dicomnode.config import Settings
from dicomnode.db import audit, migrate, session_factory, transaction
from dicomnode.errors import IngestError, InstanceTooLarge, OutOfResources, os_reason

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from dicomnode.db import Session, sessionmaker
    from dicomnode.store.ingest import Ingestor

_COPY_CHUNK = 2**20
NOT_DICOM = "not a DICOM file (no DICM prefix)"
DICOMDIR = "a DICOMDIR (Media Storage Directory), not an instance"

# pydicom.uid.MediaStorageDirectoryStorage (a DICOMDIR), without importing pydicom when
# this module is imported: pydicom is imported by the functions that read files.
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"


# --- the files -----------------------------------------------------------------------


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


def uid_name(uid: str) -> str:
    """Return a UID with its name when pydicom knows one: ``1.2.840.10008.1.2.2 (Explicit...)``.

    Parameters
    ----------
    uid : str
        A SOP class or transfer syntax UID.

    Returns
    -------
    str
        The UID, and its name in parentheses if it has one.
    """
    from pydicom.uid import UID

    name = UID(uid).name
    return f"{uid} ({name})" if name and name != uid else uid


class ProgressSink(Protocol):
    """Told how far an import or a send is (a progress bar, or nothing)."""

    def start(self, total: int) -> None:
        """Say that the work has ``total`` steps."""

    def advance(self) -> None:
        """Count one step done."""

    def stop(self) -> None:
        """Say that the work ended, after its last step or before."""


# --- what an import did --------------------------------------------------------------


@dataclass(frozen=True)
class Accepted:
    """What the listener accepts, and so an import takes.

    Attributes
    ----------
    sop_classes : Collection[str]
        SOP class UIDs.
    transfer_syntaxes : Collection[str]
        Transfer syntax UIDs.
    """

    sop_classes: Collection[str]
    transfer_syntaxes: Collection[str]


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


# --- importing -----------------------------------------------------------------------


def _is_storage_error(exc: IngestError) -> bool:
    """Whether ``exc`` stops the import (disk or database), not just refuses one file."""
    return isinstance(exc, OutOfResources) and not isinstance(exc, InstanceTooLarge)


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
        raise _SourceUnreadable(os_reason(exc)) from None
    try:
        with src, staged.open("xb") as out:
            while True:
                try:
                    chunk = src.read(_COPY_CHUNK)
                except OSError as exc:
                    raise _SourceUnreadable(os_reason(exc)) from None
                if not chunk:
                    break
                out.write(chunk)
    except OSError as exc:
        staged.unlink(missing_ok=True)
        from dicomnode.store.ingest import storage_error  # pydicom: only on this path

        raise storage_error(exc) from None
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    return staged


def import_file(
    ingestor: Ingestor, path: Path, calling_ae: str, accepted: Accepted
) -> Imported | Problem:
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
    accepted : Accepted
        The listener's SOP classes and transfer syntaxes.

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
    from pydicom.misc import is_dicom

    from dicomnode.store.ingest import read_header

    try:
        if not is_dicom(path):  # the 128-byte preamble, then DICM
            return Problem("skipped", NOT_DICOM)
        size = path.stat().st_size
    except OSError as exc:
        return Problem("refused", f"cannot be read ({os_reason(exc)})")
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
        return Problem("skipped", DICOMDIR)
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
        reason = os_reason(exc) if isinstance(exc, OSError) else type(exc).__name__
        return Problem("refused", f"cannot be read ({reason})")
    if header.sop_class_uid == MEDIA_STORAGE_DIRECTORY:
        return Problem("skipped", DICOMDIR)
    if header.sop_class_uid not in accepted.sop_classes:
        return Problem(
            "refused", f"SOP class {uid_name(header.sop_class_uid)} is not accepted by the node"
        )
    if header.transfer_syntax_uid not in accepted.transfer_syntaxes:
        return Problem(
            "refused",
            f"transfer syntax {uid_name(header.transfer_syntax_uid) or '(none)'} is not "
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


def import_files(
    settings: Settings,
    paths: Sequence[Path],
    calling_ae: str,
    accepted: Accepted,
    progress: ProgressSink,
) -> ImportReport:
    """Import the files under ``paths`` into the node's spool and database, one by one.

    The node's own spool is left out of a folder that holds it. A refused or skipped
    file is reported and the import goes on; storage running low (disk or database)
    stops it, what was imported staying. Each series imported into is recorded in
    the audit trail, also when the import was interrupted.

    Parameters
    ----------
    settings : Settings
        Storage (path, ``min_free_mb``, ``max_instance_mb``) and database.
    paths : Sequence[Path]
        Files and folders, all existing.
    calling_ae : str
        Recorded with each instance as the sender's AE title.
    accepted : Accepted
        The listener's SOP classes and transfer syntaxes.
    progress : ProgressSink
        Started with the number of files, advanced once per file imported or not.

    Returns
    -------
    ImportReport
        What was imported, refused and skipped; ``stopped`` says why it stopped early.

    Raises
    ------
    DatabaseNotFound
        If the SQLite file does not exist.
    DicomnodeError
        If the schema is not at the newest migration.
    """
    from dicomnode.store.ingest import Ingestor
    from dicomnode.store.spool import Spool

    spool_root = settings.storage.path.resolve()
    engine = migrate.open_current(settings.database.url)
    report = ImportReport()
    try:
        sessions = session_factory(engine)
        ingestor = Ingestor(
            Spool(settings.storage.path),
            sessions,
            min_free_bytes=settings.storage.min_free_mb * 2**20,
            max_instance_bytes=settings.storage.max_instance_mb * 2**20,
        )
        files = find_files(paths, exclude=spool_root)
        progress.start(len(files))
        try:
            for source in files:
                try:
                    report.add(source, import_file(ingestor, source.path, calling_ae, accepted))
                except OutOfResources as exc:
                    report.stopped = str(exc)
                    break
                progress.advance()
        finally:
            # Interrupted (Ctrl-C) or not: what was stored is in the trail.
            progress.stop()
            _audit_import(sessions, report, calling_ae)
    finally:
        engine.dispose()
    return report
