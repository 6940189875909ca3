"""Accepting one instance: check it, write it durably, record it, and only then say yes.

This is the only work done on the association thread. The order matters:
the file is fsynced and renamed into place, then the row is committed, and only
when both succeeded does the caller return C-STORE success. If the row cannot be
committed the new file is removed again, so the disk never holds an instance the
database does not know about and the sender never hears "stored" for one it lost.

Policy for an instance whose SOP Instance UID we already hold:

* identical bytes: success and no second row (a resend is harmless). The new copy
  is written like any other and then replaces the old file, so the common case, a
  new instance, never pays for a lookup;
* different bytes: the newer object replaces the older one (file and row), and if its
  series was already complete the series is re-opened, so its jobs run again on the
  corrected data. Modalities resend corrected images under the same UID; keeping
  the stale copy would give radiologists results for images that no longer exist.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import mmap
import threading
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, BinaryIO

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian
from sqlalchemy import Engine, bindparam, select, text
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from dicomnode import metrics
from dicomnode.db.engine import is_sqlite, transaction
from dicomnode.db.jobs import cancel_superseded
from dicomnode.db.models import Instance, Series, SeriesState, Study, UTCDateTime, utcnow
from dicomnode.errors import (
    InstanceTooLarge,
    InvalidUID,
    MissingAttribute,
    OutOfResources,
    SOPClassMismatch,
    StorageLow,
    UIDMismatch,
    UnreadableInstance,
)
from dicomnode.store.spool import INCOMING, Spool, fsync_file
from dicomnode.store.uids import uid_problem

log = logging.getLogger(__name__)

Buffer = bytes | mmap.mmap

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
    expected_instances: int | None  # Images in Acquisition, when given and positive
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
    study_uid: str = ""
    size_bytes: int = 0


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


def check_element_lengths(ds: Dataset, end: int) -> None:
    """Refuse a dataset whose elements claim more bytes than arrived.

    pydicom keeps a value cut short by the end of the data without complaint; one
    over-long length early in a header would silently swallow everything after it,
    image attributes and pixel data included.

    Parameters
    ----------
    ds : Dataset
        A dataset just read, its elements still raw.
    end : int
        The size of the encoded instance.

    Raises
    ------
    UnreadableInstance
        Naming the first element (by tag) that runs past the end.
    """
    for elem in ds.elements():
        if not isinstance(elem, RawDataElement) or elem.length == 0xFFFFFFFF:
            continue
        if elem.value_tell + elem.length > end:
            raise UnreadableInstance(f"element {elem.tag} runs past the end of the data")


def check_pixel_data(data: Buffer, offset: int, ds: Dataset) -> None:
    """Refuse pixel data that is cut short.

    pydicom reads a value shorter than its length field without complaint, so a
    truncated file would otherwise be stored and acknowledged, then fail at load
    time long after the sender could have resent it.

    Parameters
    ----------
    data : bytes or mmap
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
        # The delimiter ends the pixel data, which ends the dataset but for padding:
        # look near the end first, so a huge file is not paged in to find it.
        tail = max(offset, len(data) - 2**16)
        if (
            data.rfind(_SEQUENCE_DELIMITER, tail) < 0
            and data.rfind(_SEQUENCE_DELIMITER, offset) < 0
        ):
            raise UnreadableInstance("encapsulated PixelData has no end (truncated)")
        return
    if length > available:
        raise UnreadableInstance(
            f"PixelData is truncated: its length is {length} bytes, {available} arrived"
        )
    expected = _expected_pixel_bytes(ds)
    if expected is not None and length < expected:
        raise UnreadableInstance(
            f"PixelData holds {length} bytes but the image header needs {expected}"
        )


def _expected_pixel_bytes(ds: Dataset) -> int | None:
    try:
        bits = int(ds.BitsAllocated)
        pixels = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        return None  # the image header is incomplete; loading will say so
    return (pixels * frames * bits + 7) // 8


_DEFLATED = DeflatedExplicitVRLittleEndian.encode()
_META_PEEK = 2048  # the file meta is a few hundred bytes; its UIDs are in there
# Deflate is for small objects (SR, presentation states); nobody deflates a volume.
# pydicom inflates a deflated dataset in memory, so its inflated size is capped.
MAX_INFLATED_BYTES = 256 * 2**20


def _check_inflated_size(content: Buffer) -> None:
    """Refuse a deflated dataset that would inflate beyond :data:`MAX_INFLATED_BYTES`.

    A few megabytes of deflate can stand for gigabytes; this inflates in steps,
    keeping nothing, before pydicom inflates it for real.
    """
    if bytes(content[128:132]) != b"DICM" or bytes(content[132:136]) != b"\x02\x00\x00\x00":
        return  # no group length to find the dataset by: pydicom will judge it
    start = 144 + int.from_bytes(content[140:144], "little")
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total, position, step = 0, start, 2**20
    pending = bytes(content[position : position + step])
    position += step
    while pending and not inflater.eof:
        try:
            total += len(inflater.decompress(pending, step))
        except zlib.error:
            return  # not valid deflate: pydicom's reading will say it is unreadable
        if total > MAX_INFLATED_BYTES:
            raise InstanceTooLarge("deflated dataset inflates beyond 256 MiB")
        pending = inflater.unconsumed_tail or bytes(content[position : position + step])
        if not inflater.unconsumed_tail:
            position += step


def _check_deflated_pixel_data(content: Buffer, header: Dataset) -> None:
    """Check a deflated instance's pixel data, which offsets into the file cannot reach.

    The whole dataset is inflated to do it; deflate is rare and its instances small.
    """
    ds = pydicom.dcmread(BytesIO(bytes(content)))
    pixels = ds.get("PixelData")
    expected = _expected_pixel_bytes(header)
    if pixels is not None and expected is not None and len(pixels) < expected:
        raise UnreadableInstance(
            f"PixelData holds {len(pixels)} bytes but the image header needs {expected}"
        )


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _sync_pool() -> ThreadPoolExecutor:
    # One shared pool: a thread per concurrent association is plenty, and fsync
    # spends its time in the kernel.
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="fsync")
        return _pool


def _storage_error(exc: OSError) -> OutOfResources:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutOfResources("storage is full")
    code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return OutOfResources(f"cannot write to storage ({code})")


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None  # a malformed IS value is ignored, not a reason to refuse


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
        See :func:`read_header`.

    Returns
    -------
    InstanceHeader
        The checked identifiers.

    Raises
    ------
    UnreadableInstance, MissingAttribute, InvalidUID
        See :func:`read_header`.
    """
    return read_header(BytesIO(data), data, default_sop_class, default_sop_instance)


def read_header(
    fp: BinaryIO,
    content: Buffer,
    default_sop_class: str | None = None,
    default_sop_instance: str | None = None,
) -> InstanceHeader:
    """Read and check the header of an instance.

    Parameters
    ----------
    fp : file-like
        The instance, positioned at its start (preamble and file meta included).
    content : bytes or mmap
        The same instance's bytes, for the pixel data checks; a memory map of a
        received file is not read into memory.
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
        if _DEFLATED in bytes(content[132:_META_PEEK]):
            _check_inflated_size(content)
        ds = pydicom.dcmread(fp, stop_before_pixels=True)
        if len(ds) == 0:
            raise UnreadableInstance("dataset has no readable elements")
        if ds.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
            _check_deflated_pixel_data(content, ds)
        else:
            check_element_lengths(ds, len(content))
            check_pixel_data(content, fp.tell(), ds)
        # Force conversion of the elements we use now, inside the try.
        uids = {kw: _text(ds, kw) for kw in _REQUIRED_UIDS}
        uids["SOPClassUID"] = uids["SOPClassUID"] or default_sop_class
        uids["SOPInstanceUID"] = uids["SOPInstanceUID"] or default_sop_instance
    except (UnreadableInstance, InstanceTooLarge):
        raise
    except Exception as exc:  # the message may quote raw bytes, so only its type is kept
        raise UnreadableInstance(f"dataset cannot be parsed ({type(exc).__name__})") from None
    for keyword, value in uids.items():
        if value is None:
            raise MissingAttribute(f"{keyword} is missing or empty")
        problem = uid_problem(value)
        if problem:
            raise InvalidUID(f"{keyword} {problem}")
    instance_number = _int(_text(ds, "InstanceNumber"))
    expected = _int(_text(ds, "ImagesInAcquisition"))
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
        expected_instances=expected if expected is not None and expected > 0 else None,
        patient_id=_clip(_text(ds, "PatientID"), 64),
        accession_number=_clip(_text(ds, "AccessionNumber"), 16),
    )


# The statements of the fast path, written out once. The state is bound with the
# column's own type so both databases store the same spelling the ORM does.
_BUMP_SERIES = text(
    "UPDATE series SET last_received_at = :now, instance_count = instance_count + 1, "
    # The announced count stays only while every instance announces the same one.
    "expected_instances = CASE WHEN COALESCE(expected_instances, 0) = :expected "
    "THEN expected_instances ELSE -1 END "
    "WHERE series_uid = :series_uid AND state = :receiving RETURNING id"
).bindparams(
    bindparam("now", type_=UTCDateTime()),
    bindparam("receiving", value=SeriesState.RECEIVING, type_=Series.__table__.c.state.type),
)
_INSERT_INSTANCE = text(
    "INSERT INTO instances (series_id, sop_instance_uid, sop_class_uid, transfer_syntax_uid, "
    "instance_number, path, size_bytes, sha256, calling_ae, received_at) VALUES (:series_id, "
    ":sop_instance_uid, :sop_class_uid, :transfer_syntax_uid, :instance_number, :path, "
    ":size_bytes, :sha256, :calling_ae, :now)"
).bindparams(bindparam("now", type_=UTCDateTime()))


def _reopen(session: Session, series: Series) -> Series:
    """Re-open a complete series for a late or corrected instance; its jobs run again."""
    series.state = SeriesState.RECEIVING
    series.generation += 1
    cancelled = cancel_superseded(session, series.id, series.generation)
    log.info(
        "series reopened series_uid=%s generation=%d cancelled_jobs=%d",
        series.series_uid,
        series.generation,
        cancelled,
    )
    return series


class _SlowPath(Exception):
    """The fast insert does not apply (new series, re-opened series, known instance)."""


class Ingestor:
    """Store incoming instances in the spool and the database.

    Parameters
    ----------
    spool : Spool
        Where files go.
    sessions : sessionmaker[Session]
        Database sessions.
    min_free_bytes : int
        Refuse instances while the spool's disk has less free space than this.
    max_instance_bytes : int
        Refuse instances larger than this; 0 means no limit.
    """

    def __init__(
        self,
        spool: Spool,
        sessions: sessionmaker[Session],
        *,
        min_free_bytes: int = 0,
        max_instance_bytes: int = 0,
    ) -> None:
        self.spool = spool
        self.sessions = sessions
        self.min_free_bytes = min_free_bytes
        self.max_instance_bytes = max_instance_bytes
        engine = sessions.kw["bind"]
        self._engine: Engine = engine
        # SQLite has one writer at a time. Threads that queue on a Python lock hand it
        # over in microseconds; threads that collide in SQLite back off in its busy
        # handler for milliseconds. PostgreSQL needs no such help.
        self._write_lock: threading.Lock | contextlib.nullcontext[None] = (
            threading.Lock() if is_sqlite(engine) else contextlib.nullcontext()
        )

    def has_space(self) -> bool:
        """Return whether the spool's disk is above its free-space watermark."""
        return not self.min_free_bytes or self.spool.free_bytes() >= self.min_free_bytes

    def check_space(self) -> None:
        """Refuse work while the spool's disk is below its free-space watermark.

        Raises
        ------
        StorageLow
            If free space is below ``min_free_bytes``.
        """
        if not self.has_space():
            raise StorageLow("storage is below its free-space watermark")

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
        calling_ae, sop_class_uid, sop_instance_uid : str, optional
            See :meth:`store_file`.

        Returns
        -------
        StoreOutcome
            Where it went and whether it was a resend.

        Raises
        ------
        IngestError
            A subclass naming the problem; nothing is left on disk or in the database.
        """
        self.check_space()
        try:
            staged = self.spool.stage(data)
        except OSError as exc:
            raise _storage_error(exc) from None
        return self.store_file(
            staged,
            calling_ae=calling_ae,
            sop_class_uid=sop_class_uid,
            sop_instance_uid=sop_instance_uid,
        )

    def store_file(
        self,
        staged: Path,
        *,
        calling_ae: str | None = None,
        sop_class_uid: str | None = None,
        sop_instance_uid: str | None = None,
    ) -> StoreOutcome:
        """Store a received file durably and record it; the file is consumed.

        Parameters
        ----------
        staged : Path
            The instance in the DICOM file format (preamble and file meta included),
            on the spool's filesystem. It is renamed into the spool on success and
            deleted on failure.
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
        try:
            return self._store_file(staged, calling_ae, sop_class_uid, sop_instance_uid)
        finally:
            staged.unlink(missing_ok=True)  # already renamed away when it was kept

    def _store_file(
        self,
        staged: Path,
        calling_ae: str | None,
        sop_class_uid: str | None,
        sop_instance_uid: str | None,
    ) -> StoreOutcome:
        self.check_space()
        size = staged.stat().st_size
        if self.max_instance_bytes and size > self.max_instance_bytes:
            raise InstanceTooLarge(
                f"instance of {size // 2**20} MiB exceeds storage.max_instance_mb"
            )
        if size == 0:
            raise UnreadableInstance("dataset is empty")
        # The fsync (the slowest step, and one that needs no GIL) runs while this
        # thread reads and hashes the header; both must be done before the rename.
        synced = _sync_pool().submit(fsync_file, staged)
        try:
            with (
                staged.open("rb") as fp,
                mmap.mmap(fp.fileno(), 0, access=mmap.ACCESS_READ) as mm,
            ):
                header = read_header(fp, mm, sop_class_uid, sop_instance_uid)
                if sop_instance_uid is not None and sop_instance_uid != header.sop_instance_uid:
                    raise UIDMismatch("dataset SOPInstanceUID differs from the request's")
                if sop_class_uid is not None and sop_class_uid != header.sop_class_uid:
                    raise SOPClassMismatch(
                        "dataset SOPClassUID differs from the negotiated SOP class"
                    )
                # Read in chunks rather than through the map: mapped pages count as our
                # memory, and a 1 GB multi-frame must not look like a 1 GB process.
                fp.seek(0)
                digest = hashlib.file_digest(fp, "sha256").hexdigest()  # GIL released
        finally:
            sync_error = synced.exception()  # waits; the file must not go while in use
        relative = self.spool.relative_path(
            INCOMING,
            header.study_uid,
            header.series_uid,
            header.sop_instance_uid,
            token=uuid.uuid4().hex[:12],
        )
        try:
            if sync_error is not None:
                raise sync_error
            self.spool.commit(staged, relative, synced=True)
        except OSError as exc:
            raise _storage_error(exc) from None

        try:
            previous = self._record(header, relative.as_posix(), size, digest, calling_ae)
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
        metrics.instance_stored(size)
        return StoreOutcome(
            header.sop_instance_uid,
            header.series_uid,
            relative.as_posix(),
            duplicate=previous is not None and previous.sha256 == digest,
            replaced=previous is not None and previous.sha256 != digest,
            study_uid=header.study_uid,
            size_bytes=size,
        )

    def _record(
        self,
        header: InstanceHeader,
        path: str,
        size: int,
        digest: str,
        calling_ae: str | None,
    ) -> _Previous | None:
        with self._write_lock:
            try:
                self._record_fast(header, path, size, digest, calling_ae)
                return None
            except (_SlowPath, IntegrityError):
                pass  # rolled back; the general path below sorts it out
            return self._record_slow(header, path, size, digest, calling_ae)

    def _record_fast(
        self, header: InstanceHeader, path: str, size: int, digest: str, calling_ae: str | None
    ) -> None:
        """Insert a new instance into a series that is receiving: the common case.

        Two prepared statements on a plain connection, no ORM unit of work: this runs
        once per received image, and the ORM's bookkeeping cost more than the commit.
        """
        now = utcnow()
        with self._engine.begin() as conn:
            series_id = conn.execute(
                _BUMP_SERIES,
                {
                    "now": now,
                    "series_uid": header.series_uid,
                    "expected": header.expected_instances or 0,
                },
            ).scalar()
            if series_id is None:
                raise _SlowPath
            conn.execute(
                _INSERT_INSTANCE,
                {
                    "series_id": series_id,
                    "sop_instance_uid": header.sop_instance_uid,
                    "sop_class_uid": header.sop_class_uid,
                    "transfer_syntax_uid": header.transfer_syntax_uid,
                    "instance_number": header.instance_number,
                    "path": path,
                    "size_bytes": size,
                    "sha256": digest,
                    "calling_ae": calling_ae,
                    "now": now,
                },
            )

    def _record_slow(
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
                expected_instances=header.expected_instances,
                first_received_at=now,
                last_received_at=now,
            )
            session.add(series)
            session.flush()
        else:
            if series.purged_at is not None:
                # Retention deleted its images: what arrives now is the series anew (a
                # PACS pushing the study again), counted from zero, and kept again.
                series.purged_at = None
                series.instance_count = 0  # this instance is counted below
                series.expected_instances = header.expected_instances
                series.first_received_at = now
            elif (series.expected_instances or 0) != (header.expected_instances or 0):
                series.expected_instances = -1
            if series.state == SeriesState.COMPLETE:
                series = _reopen(session, series)
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
