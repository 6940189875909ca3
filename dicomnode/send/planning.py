"""Sending files by hand (``dicomnode send``): plan the presentation contexts, C-STORE.

Files, or the stored outputs of a job, go to a configured destination with C-STORE,
one status per object. Re-sending a job's outputs this way is a manual action: the
job's deliveries (the workers' state machine, :mod:`dicomnode.send.delivery`) are not
touched. Each send is recorded in the audit trail.

Reports name files by their path below the folder given (or their file name, or their
path in the spool for a job's outputs), and give reasons without patient data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicomnode.config import Destination, Settings
from dicomnode.db import audit, migrate, session_factory, transaction
from dicomnode.errors import DicomnodeError, first_line, os_reason
from dicomnode.store import (
    DICOMDIR,
    MEDIA_STORAGE_DIRECTORY,
    NOT_DICOM,
    ProgressSink,
    SourceFile,
    find_files,
    uid_name,
)

if TYPE_CHECKING:
    from pynetdicom.association import Association

    from dicomnode.db import Engine, Session, sessionmaker


MAX_CONTEXTS = 128  # presentation contexts one association may propose (PS3.8 9.3.2.2)


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


def job_outputs(sessions: sessionmaker[Session], root: Path, job_id: int) -> list[SourceFile]:
    """Return the stored outputs of a job, as files in the spool.

    Parameters
    ----------
    sessions : sessionmaker[Session]
        The node's database.
    root : Path
        The spool (``storage.path``).
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
        If the job has no outputs.
    """
    from dicomnode.db import Job

    with sessions() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise LookupError(f"no job with id {job_id}")
        paths = [o.path for o in sorted(job.outputs, key=lambda o: o.id)]
        state = job.state.value
    if not paths:
        raise DicomnodeError(f"job {job_id} ({state}) has no stored outputs to send")
    return [SourceFile(root / p, p) for p in paths]


def plan(files: Sequence[SourceFile], report: SendReport) -> list[PlannedFile]:
    """Read each file's header for its presentation context; record those not sendable.

    Parameters
    ----------
    files : Sequence[SourceFile]
        The files, in the order the report lists them.
    report : SendReport
        Given the files that are missing, unreadable, no instance, or lack the SOP
        class or transfer syntax.

    Returns
    -------
    list[PlannedFile]
        The files to send.
    """
    import pydicom
    from pydicom.misc import is_dicom

    planned: list[PlannedFile] = []
    for index, source in enumerate(files):
        try:
            if not source.path.is_file():
                report.set(index, source, "failed", reason="file not found")
                continue
            if not is_dicom(source.path):  # the 128-byte preamble, then DICM
                report.set(index, source, "skipped", reason=NOT_DICOM)
                continue
            ds = pydicom.dcmread(
                source.path,
                stop_before_pixels=True,
                specific_tags=["SOPClassUID", "SOPInstanceUID"],
            )
        except OSError as exc:
            report.set(index, source, "failed", reason=f"cannot be read ({os_reason(exc)})")
            continue
        except Exception as exc:
            report.set(index, source, "failed", reason=f"cannot be read ({type(exc).__name__})")
            continue
        meta = ds.file_meta
        sop_class = str(ds.get("SOPClassUID", "") or meta.get("MediaStorageSOPClassUID", ""))
        sop_instance = str(ds.get("SOPInstanceUID", "") or "") or None
        syntax = str(meta.get("TransferSyntaxUID", "") or "")
        if sop_class == MEDIA_STORAGE_DIRECTORY:
            report.set(index, source, "skipped", reason=DICOMDIR)
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
            f"the destination does not accept SOP class {uid_name(item.sop_class_uid)} in "
            f"transfer syntax {uid_name(item.transfer_syntax_uid)}"
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
        reason = f"cannot be sent ({type(exc).__name__}: {first_line(exc)[:120]})"
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
    progress: ProgressSink,
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
    progress : ProgressSink
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
    engine: Engine | None,
    source: int | Path,
    report: SendReport,
    error: str | None,
    warn: Callable[[str], None],
) -> None:
    """Record a manual send in the audit trail (a failure to write the row only warns).

    ``engine`` is the database the send already opened (for a job's outputs), or None
    to open it here.
    """
    opened = engine is None
    if engine is None:
        engine = migrate.open_current(settings.database.url)
    destination, record = report.destination, report.record()
    try:
        with transaction(session_factory(engine)) as session:
            audit.record(
                session,
                "results-resent",
                outcome="failure" if record["failed"] or error else "success",
                actor=audit.admin_actor(),
                peer=destination.address,
                destination=destination.name,
                job_id=source if isinstance(source, int) else None,
                count=record["sent"],
                detail=f"dicomnode send: {record['sent']} stored, {record['failed']} not"
                + (f"; {error}" if error else ""),
            )
    except Exception as exc:  # the objects went (or not) whatever the trail says
        warn(f"the send was not recorded in the audit trail: {type(exc).__name__}")
    finally:
        if opened:
            engine.dispose()


def send_source(
    settings: Settings,
    source: int | Path,
    destination: Destination,
    progress: ProgressSink,
    warn: Callable[[str], None],
) -> SendReport:
    """Send a file, a folder's files or a job's stored outputs to ``destination``.

    Each file is planned (its SOP class and transfer syntax read), then sent
    (:func:`send_planned`); the send is recorded in the audit trail, also when the
    destination could not be reached.

    Parameters
    ----------
    settings : Settings
        Our AE title, the database and spool (for a job's outputs and the audit trail).
    source : int or Path
        A job id, or an existing file or folder.
    destination : Destination
        Where to.
    progress : ProgressSink
        Started with the number of files to send, advanced once per file sent.
    warn : Callable[[str], None]
        Told, in one line, when the audit trail could not record the send.

    Returns
    -------
    SendReport
        One outcome per file; ``error`` says why the send ended early.

    Raises
    ------
    LookupError
        If there is no such job.
    DicomnodeError
        If the job has no outputs, the schema is not current, or the destination cannot
        be reached (:class:`~dicomnode.errors.JobError`).
    """
    # One engine for the command: a job's outputs are looked up in the database and the
    # send recorded through the same one; a path's send opens it for the trail only.
    engine: Engine | None = None
    try:
        if isinstance(source, Path):
            files = find_files([source])
        else:
            engine = migrate.open_current(settings.database.url)
            files = job_outputs(session_factory(engine), settings.storage.path, source)
        report = SendReport(destination)
        planned = plan(files, report)
        progress.start(len(planned))
        try:
            send_planned(destination, planned, settings.listener.ae_title, report, progress)
        except Exception as exc:  # unreachable: the attempt is recorded all the same
            _audit_send(settings, engine, source, report, first_line(exc), warn)
            raise
        finally:
            progress.stop()
        _audit_send(settings, engine, source, report, report.error, warn)
        return report
    finally:
        if engine is not None:
            engine.dispose()
