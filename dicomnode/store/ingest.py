"""Accepting one instance: check it, write it durably, record it, and only then say yes.

This is the only work done on the association thread. The order matters:
the file is fsynced and renamed into place, then the row is committed, and only
when both succeeded does the caller return C-STORE success. If the row cannot be
committed the new file is removed again, so the disk never holds an instance the
database does not know about and the sender never hears "stored" for one it lost.

Policy for an instance whose SOP Instance UID we already hold:

* identical bytes: success, nothing written, no second row (a resend is harmless);
* different bytes: the newer object replaces the older one (file and row), and if its
  series was already complete the series is re-opened, so its jobs run again on the
  corrected data. Modalities resend corrected images under the same UID; keeping
  the stale copy would give radiologists results for images that no longer exist.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import uuid
from dataclasses import dataclass
from io import BytesIO
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.db.engine import transaction
from dicomnode.db.jobs import cancel_superseded
from dicomnode.db.models import Instance, Series, SeriesState, Study, utcnow
from dicomnode.errors import (
    InvalidUID,
    MissingAttribute,
    OutOfResources,
    SOPClassMismatch,
    UIDMismatch,
    UnreadableInstance,
)
from dicomnode.store.spool import INCOMING, Spool
from dicomnode.store.uids import uid_problem

log = logging.getLogger(__name__)

_REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


@dataclass(frozen=True)
class InstanceHeader:
    """What ingest needs from an instance's header; PHI fields are for the database only."""

    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax_uid: str
    modality: str | None
    instance_number: int | None
    patient_id: str | None
    accession_number: str | None


@dataclass(frozen=True)
class _Previous:
    """What the instance's row held before this store."""

    path: str
    sha256: str


@dataclass(frozen=True)
class StoreOutcome:
    """What happened to an instance we accepted."""

    sop_instance_uid: str
    series_uid: str
    path: str
    duplicate: bool = False  # identical resend: nothing was written
    replaced: bool = False  # different object under a known SOP Instance UID


def _text(ds: Dataset, keyword: str) -> Any:
    try:
        value = ds.get(keyword)
    except Exception as exc:  # pydicom converts values lazily; a bad one raises here
        raise UnreadableInstance(f"{keyword} cannot be decoded ({type(exc).__name__})") from None
    if value is None:
        return None
    return str(value).strip().rstrip("\x00") or None


_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"
_SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
_LONG_VRS = {
    b"OB",
    b"OD",
    b"OF",
    b"OL",
    b"OV",
    b"OW",
    b"SQ",
    b"SV",
    b"UC",
    b"UN",
    b"UR",
    b"UT",
    b"UV",
}


def check_pixel_data(data: bytes, offset: int, ds: Dataset) -> None:
    """Refuse pixel data that is cut short.

    pydicom reads a value shorter than its length field without complaint, so a
    truncated file would otherwise be stored and acknowledged, then fail at load
    time long after the sender could have resent it.

    Parameters
    ----------
    data : bytes
        The whole encoded instance.
    offset : int
        Where the Pixel Data element starts (where a header-only read stopped).
    ds : Dataset
        The header, for the image size and encoding.

    Raises
    ------
    UnreadableInstance
        If the element's length runs past the end of the data, native pixel data is
        shorter than Rows x Columns x Frames says, or encapsulated pixel data has no
        sequence delimiter.
    """
    if data[offset : offset + 4] != _PIXEL_DATA_TAG:
        return  # no (integer) pixel data: SR, float pixel data, ...
    implicit, little = ds.original_encoding
    if not little:
        return  # retired big-endian syntax: not checked
    if implicit:
        header, length = 8, int.from_bytes(data[offset + 4 : offset + 8], "little")
    elif data[offset + 4 : offset + 6] in _LONG_VRS:
        header, length = 12, int.from_bytes(data[offset + 8 : offset + 12], "little")
    else:
        header, length = 8, int.from_bytes(data[offset + 6 : offset + 8], "little")
    available = len(data) - offset - header
    if length == 0xFFFFFFFF:
        if data.rfind(_SEQUENCE_DELIMITER, offset) < 0:
            raise UnreadableInstance("encapsulated PixelData has no end (truncated)")
        return
    if length > available:
        raise UnreadableInstance(
            f"PixelData is truncated: its length is {length} bytes, {available} arrived"
        )
    try:
        bits = int(ds.BitsAllocated)
        pixels = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        return  # the image header is incomplete; loading will say so
    expected = (pixels * frames * bits + 7) // 8
    if length < expected:
        raise UnreadableInstance(
            f"PixelData holds {length} bytes but the image header needs {expected}"
        )


def _clip(value: str | None, length: int) -> str | None:
    return value[:length] if value is not None else None


def parse_header(
    data: bytes, default_sop_class: str | None = None, default_sop_instance: str | None = None
) -> InstanceHeader:
    """Parse the header of an encoded instance (preamble and file meta included).

    Parameters
    ----------
    data : bytes
        The instance as it will be written to disk.
    default_sop_class, default_sop_instance : str, optional
        Used when the dataset's SOPClassUID or SOPInstanceUID is empty: some archives
        export files whose identity lives only in the file meta, and the C-STORE
        request (its context and Affected SOP Instance UID) says what it is. Refusing
        such a study helps nobody.

    Returns
    -------
    InstanceHeader
        The checked identifiers.

    Raises
    ------
    UnreadableInstance
        If the bytes are not a parseable DICOM dataset.
    MissingAttribute
        If a required UID is absent.
    InvalidUID
        If a UID is malformed or unsafe as a path component.
    """
    try:
        fp = BytesIO(data)
        ds = pydicom.dcmread(fp, stop_before_pixels=True)
        check_pixel_data(data, fp.tell(), ds)
        # Force conversion of the elements we use now, inside the try.
        uids = {kw: _text(ds, kw) for kw in _REQUIRED_UIDS}
        uids["SOPClassUID"] = uids["SOPClassUID"] or default_sop_class
        uids["SOPInstanceUID"] = uids["SOPInstanceUID"] or default_sop_instance
    except UnreadableInstance:
        raise
    except Exception as exc:  # the message may quote raw bytes, so only its type is kept
        raise UnreadableInstance(f"dataset cannot be parsed ({type(exc).__name__})") from None
    for keyword, value in uids.items():
        if value is None:
            raise MissingAttribute(f"{keyword} is missing or empty")
        problem = uid_problem(value)
        if problem:
            raise InvalidUID(f"{keyword} {problem}")
    number = _text(ds, "InstanceNumber")
    try:
        instance_number = int(number) if number is not None else None
    except ValueError:
        instance_number = None
    return InstanceHeader(
        sop_class_uid=uids["SOPClassUID"],
        sop_instance_uid=uids["SOPInstanceUID"],
        study_uid=uids["StudyInstanceUID"],
        series_uid=uids["SeriesInstanceUID"],
        transfer_syntax_uid=str(ds.file_meta.get("TransferSyntaxUID", "")),
        # Clipped to their VR's length (and their columns'): a non-conformant value must
        # not make PostgreSQL refuse the row and the sender retry for ever.
        modality=_clip(_text(ds, "Modality"), 16),
        instance_number=instance_number,
        patient_id=_clip(_text(ds, "PatientID"), 64),
        accession_number=_clip(_text(ds, "AccessionNumber"), 16),
    )


class Ingestor:
    """Store incoming instances in the spool and the database.

    Parameters
    ----------
    spool : Spool
        Where files go.
    sessions : sessionmaker[Session]
        Database sessions.
    """

    def __init__(self, spool: Spool, sessions: sessionmaker[Session]) -> None:
        self.spool = spool
        self.sessions = sessions

    def store(
        self,
        data: bytes,
        *,
        calling_ae: str | None = None,
        sop_class_uid: str | None = None,
        sop_instance_uid: str | None = None,
    ) -> StoreOutcome:
        """Store one encoded instance durably and record it.

        Parameters
        ----------
        data : bytes
            The instance with preamble and file meta, exactly as it will be kept.
        calling_ae : str, optional
            The sender's AE title, recorded with the instance.
        sop_class_uid : str, optional
            The SOP class of the presentation context it came on; must match the dataset.
        sop_instance_uid : str, optional
            The Affected SOP Instance UID of the request; must match the dataset.

        Returns
        -------
        StoreOutcome
            Where it went and whether it was a resend.

        Raises
        ------
        IngestError
            A subclass naming the problem; nothing is left on disk or in the database.
        """
        header = parse_header(data, sop_class_uid, sop_instance_uid)
        if sop_instance_uid is not None and sop_instance_uid != header.sop_instance_uid:
            raise UIDMismatch("dataset SOPInstanceUID differs from the request's")
        if sop_class_uid is not None and sop_class_uid != header.sop_class_uid:
            raise SOPClassMismatch("dataset SOPClassUID differs from the negotiated SOP class")
        digest = hashlib.sha256(data).hexdigest()
        try:
            with self.sessions() as session:
                existing = session.execute(
                    select(Instance.path, Instance.sha256).where(
                        Instance.sop_instance_uid == header.sop_instance_uid
                    )
                ).first()
        except DBAPIError as exc:
            raise OutOfResources(f"database error ({type(exc.orig).__name__})") from None
        if (
            existing is not None
            and existing.sha256 == digest
            and self.spool.absolute(existing.path).is_file()
        ):
            return StoreOutcome(
                header.sop_instance_uid, header.series_uid, existing.path, duplicate=True
            )

        relative = self.spool.relative_path(
            INCOMING,
            header.study_uid,
            header.series_uid,
            header.sop_instance_uid,
            token=uuid.uuid4().hex[:12],
        )
        try:
            self.spool.write(relative, data)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise OutOfResources("storage is full") from None
            code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
            raise OutOfResources(f"cannot write to storage ({code})") from None

        try:
            previous = self._record(header, relative.as_posix(), len(data), digest, calling_ae)
        except BaseException as exc:
            # Not acknowledged, so it must not linger; the file is ours alone.
            self.spool.remove(relative)
            if isinstance(exc, DBAPIError):
                # The sender may retry; nothing of this attempt remains.
                raise OutOfResources(f"database error ({type(exc.orig).__name__})") from None
            raise
        if previous is not None:
            # The row now points at our file; the one it pointed at before is unreferenced.
            self.spool.remove(previous.path)
        return StoreOutcome(
            header.sop_instance_uid,
            header.series_uid,
            relative.as_posix(),
            replaced=previous is not None and previous.sha256 != digest,
        )

    def _record(
        self, header: InstanceHeader, path: str, size: int, digest: str, calling_ae: str | None
    ) -> _Previous | None:
        # Two associations may create the same study or series at once; on PostgreSQL
        # the loser hits the unique constraint and simply tries again.
        for attempt in range(3):
            try:
                with transaction(self.sessions) as session:
                    return self._record_in(session, header, path, size, digest, calling_ae)
            except IntegrityError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    @staticmethod
    def _record_in(
        session: Session,
        header: InstanceHeader,
        path: str,
        size: int,
        digest: str,
        calling_ae: str | None,
    ) -> _Previous | None:
        now = utcnow()
        instance = session.scalar(
            select(Instance)
            .where(Instance.sop_instance_uid == header.sop_instance_uid)
            .with_for_update()
        )
        previous = _Previous(instance.path, instance.sha256) if instance is not None else None
        if instance is not None and instance.sha256 == digest:
            # The same content, committed meanwhile by a concurrent resend (or its file
            # went missing): point the row at this copy and change nothing else.
            instance.path = path
            return previous
        study = session.scalar(select(Study).where(Study.study_uid == header.study_uid))
        if study is None:
            study = Study(
                study_uid=header.study_uid,
                patient_id=header.patient_id,
                accession_number=header.accession_number,
            )
            session.add(study)
            session.flush()
        series = session.scalar(
            select(Series).where(Series.series_uid == header.series_uid).with_for_update()
        )
        if series is None:
            series = Series(
                study_id=study.id,
                series_uid=header.series_uid,
                modality=header.modality,
                state=SeriesState.RECEIVING,
                generation=0,
                instance_count=0,
                first_received_at=now,
                last_received_at=now,
            )
            session.add(series)
            session.flush()
        elif series.state == SeriesState.COMPLETE:
            # A late or corrected instance: run the series' jobs again when it settles.
            series.state = SeriesState.RECEIVING
            series.generation += 1
            cancelled = cancel_superseded(session, series.id, series.generation)
            log.info(
                "series reopened series_uid=%s generation=%d cancelled_jobs=%d",
                series.series_uid,
                series.generation,
                cancelled,
            )
        series.last_received_at = now

        if instance is None:
            instance = Instance(sop_instance_uid=header.sop_instance_uid)
            session.add(instance)
            series.instance_count += 1
        elif instance.series_id != series.id:
            # Same SOP Instance UID, now in another series: it moves.
            old = session.get(Series, instance.series_id)
            if old is not None:
                old.instance_count -= 1
            series.instance_count += 1
        instance.series_id = series.id
        instance.sop_class_uid = header.sop_class_uid
        instance.transfer_syntax_uid = header.transfer_syntax_uid
        instance.instance_number = header.instance_number
        instance.path = path
        instance.size_bytes = size
        instance.sha256 = digest
        instance.calling_ae = calling_ae
        instance.received_at = now
        return previous
