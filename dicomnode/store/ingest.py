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
import dataclasses
import errno
import hashlib
import logging
import mmap
import struct
import threading
import uuid
import zlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, BinaryIO

import pydicom
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_dataset, read_preamble
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from pydicom.valuerep import EXPLICIT_VR_LENGTH_16, EXPLICIT_VR_LENGTH_32
from sqlalchemy import Engine, bindparam, select, text
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker

from dicomnode import metrics
from dicomnode.db import (
    Instance,
    Series,
    SeriesState,
    Study,
    UTCDateTime,
    cancel_superseded,
    is_sqlite,
    transaction,
    utcnow,
)
from dicomnode.errors import (
    IngestError,
    InstanceTooLarge,
    InvalidUID,
    MissingAttribute,
    OutOfResources,
    RecordRefused,
    SOPClassMismatch,
    StorageLow,
    UIDMismatch,
    UnreadableInstance,
    os_reason,
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

    def bare(self) -> InstanceHeader:
        """Return the header without the values that only index the instance.

        What is left (UIDs, checked, and the transfer syntax) is what storing needs.
        """
        return dataclasses.replace(
            self,
            modality=None,
            instance_number=None,
            expected_instances=None,
            patient_id=None,
            accession_number=None,
        )


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
    if isinstance(value, MultiValue):  # str() would give "['A', 'B']"
        value = "\\".join(str(v) for v in value)
    return str(value).strip().rstrip("\x00") or None


# The index columns are 32-bit integers on both databases (PostgreSQL refuses more).
_INT_MIN, _INT_MAX = -(2**31), 2**31 - 1
# Series whose left-out values were logged at WARNING: one line per series, not one per
# image. Bounded, oldest forgotten first, since a node receives series for years; the
# lock because every association stores on a thread of its own.
_WARNED_SERIES_MAX = 1024
_warned_series: OrderedDict[str, None] = OrderedDict()
_warned_lock = threading.Lock()


def _first_warning(series_uid: str) -> bool:
    """Return whether the series has not had its WARNING yet, and note that it has now."""
    with _warned_lock:
        if series_uid in _warned_series:
            _warned_series.move_to_end(series_uid)  # a series still arriving stays noted
            return False
        _warned_series[series_uid] = None
        if len(_warned_series) > _WARNED_SERIES_MAX:
            _warned_series.popitem(last=False)
        return True


def _fit_text(value: str, length: int) -> tuple[str | None, str | None]:
    """Return ``value`` as it may go into a text column of ``length``, and what was wrong.

    PostgreSQL refuses NUL characters in text and the psycopg driver text it cannot
    encode; SQLite takes both, but both databases get the same index. Returns the value
    (None if it cannot go in at all, clipped if too long) and a problem (None if it fit).
    """
    if "\x00" in value:
        return None, "has a NUL character (not indexed)"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates
        return None, "cannot be encoded (not indexed)"
    if len(value) > length:
        return value[:length], f"is longer than {length} characters (clipped)"
    return value, None


def _index_text(ds: Dataset, keyword: str, length: int, problems: list[str]) -> str | None:
    """Return a text value that fits its index column, or None; say why in ``problems``.

    These values only index the instance (the file keeps them as received), so one
    that does not fit is left out rather than refused: a refusal would have the sender
    retry an image that can never be stored.
    """
    try:
        value = _text(ds, keyword)
    except UnreadableInstance:
        problems.append(f"{keyword} cannot be decoded (not indexed)")
        return None
    if value is None:
        return None
    fitted, problem = _fit_text(value, length)
    if problem is not None:
        problems.append(f"{keyword} {problem}")
    return fitted


def _index_int(ds: Dataset, keyword: str, problems: list[str]) -> int | None:
    """Return an integer value that fits a 32-bit index column, or None (see _index_text)."""
    try:
        raw = _text(ds, keyword)
    except UnreadableInstance:  # e.g. "inf": pydicom's IS conversion overflows
        problems.append(f"{keyword} cannot be decoded (not indexed)")
        return None
    value = _int(raw)
    if raw is not None and value is None:
        problems.append(f"{keyword} is not an integer (not indexed)")
    elif value is not None and not _INT_MIN <= value <= _INT_MAX:
        problems.append(f"{keyword} is out of range (not indexed)")
        return None
    return value


def index_value(value: str | None, length: int) -> str | None:
    """Return a peer-supplied string (an AE title) as it may go into a text column.

    Parameters
    ----------
    value : str, optional
        The string.
    length : int
        The column's length.

    Returns
    -------
    str or None
        The value clipped to ``length``, or None if it has a NUL character or cannot
        be encoded (PostgreSQL would refuse the row).
    """
    return None if value is None else _fit_text(value, length)[0]


_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"
_SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
# The VRs with a 32-bit length in explicit VR (the others have 16 bits), as bytes.
_LONG_VRS = frozenset(vr.encode() for vr in EXPLICIT_VR_LENGTH_32)
_SHORT_VRS = frozenset(vr.encode() for vr in EXPLICIT_VR_LENGTH_16)


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
    """Refuse pixel data that is cut short, or encoded otherwise than its transfer syntax says.

    pydicom reads a value shorter than its length field without complaint, so a
    truncated file would otherwise be stored and acknowledged, then fail at load
    time long after the sender could have resent it. The same goes for native pixel
    data under a compressed transfer syntax, and the converse.

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
        shorter than Rows x Columns x Frames says, encapsulated pixel data has no
        sequence delimiter, or the pixel data is native under an encapsulated transfer
        syntax or encapsulated under a native one.
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
    check_encapsulation(ds, length == _UNDEFINED)
    available = len(data) - offset - header
    if length == _UNDEFINED:
        # The delimiter ends the pixel data, which ends the dataset but for padding:
        # look near the end first, so a huge file is not paged in to find it.
        tail = max(offset, len(data) - 2**16)
        if (
            data.rfind(_SEQUENCE_DELIMITER, tail) < 0
            and data.rfind(_SEQUENCE_DELIMITER, offset) < 0
        ):
            raise UnreadableInstance("encapsulated PixelData has no end (truncated)")
        return
    _check_native_length(length, available, ds)


def check_encapsulation(ds: Dataset, encapsulated: bool) -> None:
    """Refuse pixel data encoded otherwise than the file meta's transfer syntax says.

    A decoder picks its codec by the transfer syntax: native pixels read as a JPEG
    stream (or fragments read as raw pixels) fail when the job loads the series,
    long after the sender could have sent the instance again.

    Parameters
    ----------
    ds : Dataset
        The header, with its file meta.
    encapsulated : bool
        Whether the Pixel Data element has an undefined length (fragments).

    Raises
    ------
    UnreadableInstance
        If one is encapsulated and the other native.
    """
    meta = getattr(ds, "file_meta", None)
    syntax = UID(str(meta.get("TransferSyntaxUID", "") or "") if meta is not None else "")
    if not syntax.is_transfer_syntax:
        return  # absent or private: its encoding is not known here
    if syntax.is_encapsulated and not encapsulated:
        raise UnreadableInstance(f"PixelData is native but the transfer syntax {syntax} is not")
    if encapsulated and not syntax.is_encapsulated:
        raise UnreadableInstance(
            f"PixelData is encapsulated but the transfer syntax {syntax} is native"
        )


def _check_native_length(length: int, available: int, ds: Dataset) -> None:
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
_META_PEEK = 2**16  # the file meta is a few hundred bytes; this finds it even padded
# Deflate is for small objects (SR, presentation states); nobody deflates a volume.
# The job that loads one inflates it in memory (pydicom does), so its size is capped.
MAX_INFLATED_BYTES = 256 * 2**20
# Reading a deflated header inflates in steps of this much, keeping only the few
# elements ingest uses: memory per instance stays about four steps, whatever it
# inflates to (a deflate bomb of 255 KB inflates to 250 MiB).
INFLATE_STEP = 2**18
# Walking a header costs about a microsecond per element, under the GIL: a bomb of
# 250 MiB of tiny sequence items would hold an association (and slow its neighbours)
# for half a minute. A real deflated object (an SR, a presentation state) has
# thousands of elements; more than this is refused like an over-large one.
MAX_DEFLATED_ELEMENTS = 1_000_000
# Inflating is pure CPU: more at once would only share the cores and hold each
# association longer. The others wait their turn, a second or so each at most.
MAX_CONCURRENT_INFLATIONS = 2
_inflations = threading.BoundedSemaphore(MAX_CONCURRENT_INFLATIONS)

_UNDEFINED = 0xFFFFFFFF
_PIXEL_DATA = 0x7FE00010
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_MAX_DEPTH = 64  # sequences nested deeper are no header anyone writes
# The elements read_header and the pixel data check use; all have 16-bit lengths.
_KEPT = frozenset(
    Tag(keyword)
    for keyword in (
        "SpecificCharacterSet",
        "SOPClassUID",
        "SOPInstanceUID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "Modality",
        "InstanceNumber",
        "ImagesInAcquisition",
        "PatientID",
        "AccessionNumber",
        "SamplesPerPixel",
        "NumberOfFrames",
        "Rows",
        "Columns",
        "BitsAllocated",
    )
)


class _Inflated:
    """A deflated dataset's inflated bytes, read forward in bounded steps.

    Bytes a caller skips are inflated and dropped, so memory stays a few steps
    however much the dataset inflates to.

    Parameters
    ----------
    content : bytes or mmap
        The whole file.
    start : int
        Where the deflated dataset starts (after the file meta).

    Raises
    ------
    InstanceTooLarge
        From any read, once the dataset inflates beyond :data:`MAX_INFLATED_BYTES`,
        or from :meth:`header` beyond :data:`MAX_DEFLATED_ELEMENTS` elements.
    UnreadableInstance
        From any read, if the data is not valid deflate.
    """

    def __init__(self, content: Buffer, start: int) -> None:
        self._content = content
        self._next = start  # the next compressed byte to feed
        self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        self._step = b""  # the latest inflated step, read up to _at
        self._at = 0
        self._inflated = 0
        self.elements = 0  # element headers read so far, sequence contents included

    def _inflate(self) -> bool:
        """Inflate the next step, the unread rest of this one kept; False at the end."""
        if self._inflater.eof:
            return False
        pending = self._inflater.unconsumed_tail
        if not pending and self._next < len(self._content):
            pending = bytes(self._content[self._next : self._next + INFLATE_STEP])
            self._next += len(pending)
        # With all input consumed zlib may still hold output it had no room for (a
        # run of zeros longer than a step from the last few compressed bytes): asking
        # with no input gives it, a step at a time.
        try:
            out = self._inflater.decompress(pending, INFLATE_STEP)
        except zlib.error:
            raise UnreadableInstance("deflated dataset cannot be inflated") from None
        if not out and not pending:
            return False  # the deflate stream stops short: reads come up short
        self._inflated += len(out)
        if self._inflated > MAX_INFLATED_BYTES:
            raise InstanceTooLarge("deflated dataset inflates beyond 256 MiB")
        self._step = self._step[self._at :] + out
        self._at = 0
        return True

    def read(self, size: int) -> bytes:
        """Return the next ``size`` bytes, or fewer at the end of the data."""
        while len(self._step) - self._at < size and self._inflate():
            pass
        out = self._step[self._at : self._at + size]
        self._at += len(out)
        return out

    def header(self, implicit: bool) -> tuple[int, bytes, int] | None:
        """Read an element header: (tag, VR or b"", length), or None at the end of the data.

        Called once per element, sequence contents included, so it reads straight
        from the step rather than through :meth:`read`.
        """
        buffer, at = self._step, self._at
        if len(buffer) - at < 12 and not self._fill(12):
            # The last header in the data: 8 bytes are enough unless its VR has a
            # 32-bit length. Padded so that one unpack serves both.
            rest = len(self._step) - self._at
            if rest == 0:
                return None
            if rest < 8:
                raise UnreadableInstance("deflated dataset is truncated")
            buffer, at = self._step[self._at :] + bytes(12 - rest), 0
        elif buffer is not self._step:
            buffer, at = self._step, self._at  # _fill inflated a step
        self.elements += 1
        if self.elements > MAX_DEFLATED_ELEMENTS:
            raise InstanceTooLarge(
                f"deflated dataset has more than {MAX_DEFLATED_ELEMENTS:,} elements"
            )
        group, element, length = _HEADER.unpack_from(buffer, at)
        tag = group << 16 | element
        if implicit or group == 0xFFFE:  # items and delimiters have no VR
            vr, size = b"", 8
        else:
            vr = buffer[at + 4 : at + 6]
            if vr in _LONG_VRS:
                length, size = int.from_bytes(buffer[at + 8 : at + 12], "little"), 12
            elif vr in _SHORT_VRS:
                length, size = length >> 16, 8
            else:
                raise UnreadableInstance(f"element {Tag(tag)} has no valid VR")
        if size > len(self._step) - self._at:
            raise UnreadableInstance("deflated dataset is truncated")
        self._at += size
        return tag, vr, length

    def _fill(self, size: int) -> bool:
        """Inflate until ``size`` bytes are unread; False if the data ends first."""
        while len(self._step) - self._at < size:
            if not self._inflate():
                return False
        return True

    def skip(self, size: int) -> int:
        """Drop the next ``size`` bytes without keeping them; return how many there were."""
        if len(self._step) - self._at >= size:  # most values: inside the current step
            self._at += size
            return size
        skipped = 0
        while True:
            taken = min(size - skipped, len(self._step) - self._at)
            self._at += taken
            skipped += taken
            if skipped == size or not self._inflate():
                break
        return skipped

    def drain(self) -> int:
        """Drop everything left; return how many bytes that was."""
        return self.skip(MAX_INFLATED_BYTES + 1)  # more than can come: raises first


_HEADER = struct.Struct("<HHI")  # group, element, and a 32-bit length (or VR + 16 bits)


def _skip_value(stream: _Inflated, tag: int, length: int) -> None:
    if stream.skip(length) < length:
        raise UnreadableInstance(f"element {Tag(tag)} runs past the end of the data")


def _skip_items(stream: _Inflated, tag: int, implicit: bool, depth: int) -> None:
    """Skip an undefined-length value (a sequence, or fragments): items up to its end.

    Inside UN of undefined length the items are implicit VR (PS3.5 6.2.2).
    """
    if depth > _MAX_DEPTH:
        raise UnreadableInstance(f"sequences nested deeper than {_MAX_DEPTH} levels")
    while True:
        item = stream.header(implicit=True)
        if item is None:
            raise UnreadableInstance(f"element {Tag(tag)} has no end (truncated)")
        item_tag, _, length = item
        if item_tag == _SEQUENCE_END:
            return
        if item_tag != _ITEM:
            raise UnreadableInstance(f"element {Tag(tag)} holds no items but has no length")
        if length != _UNDEFINED:
            _skip_value(stream, item_tag, length)
            continue
        while (element := stream.header(implicit)) is not None:
            inner, vr, length = element
            if inner == _ITEM_END:
                break
            if length == _UNDEFINED:
                _skip_items(stream, inner, implicit or vr == b"UN", depth + 1)
            else:
                _skip_value(stream, inner, length)
        else:
            raise UnreadableInstance(f"element {Tag(tag)} has no end (truncated)")


def _read_deflated(fp: BinaryIO, content: Buffer) -> Dataset | None:
    """Read a deflated instance's header and check its pixel data, in bounded memory.

    pydicom inflates a deflated dataset whole, and again to reach its pixel data;
    this walks the inflated stream once, in steps, keeping only the elements in
    :data:`_KEPT`. Nested sequences are skipped, not parsed, so a bomb made of tiny
    elements cannot make millions of objects either.

    Parameters
    ----------
    fp : file-like
        The instance, positioned at its start.
    content : bytes or mmap
        The same instance's bytes.

    Returns
    -------
    Dataset or None
        The kept elements, with the file meta; None if the file meta names another
        transfer syntax after all (``fp`` is then back at its start).

    Raises
    ------
    UnreadableInstance, InstanceTooLarge
        As :func:`check_element_lengths`, :func:`check_pixel_data`,
        :data:`MAX_INFLATED_BYTES` and :data:`MAX_DEFLATED_ELEMENTS` say.
    """
    read_preamble(fp, False)
    meta = FileMetaDataset(
        read_dataset(fp, False, True, stop_when=lambda tag, vr, length: tag.group != 2)
    )
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        fp.seek(0)
        return None
    with _inflations:
        stream = _Inflated(content, fp.tell())
        kept: dict[BaseTag, DataElement | RawDataElement] = {}
        pixels = None
        while (element := stream.header(implicit=False)) is not None:
            tag, vr, length = element
            if tag == _PIXEL_DATA:
                pixels = length
                break
            if length == _UNDEFINED:
                _skip_items(stream, tag, vr == b"UN", 1)
            elif tag in _KEPT and vr in _SHORT_VRS:  # a BaseTag hashes as its int
                key = Tag(tag)
                value = stream.read(length)
                if len(value) < length:
                    raise UnreadableInstance(f"element {key} runs past the end of the data")
                # value_tell (0) is only read by check_element_lengths, which this
                # path does not need: a short value was refused just above.
                kept[key] = RawDataElement(
                    key, vr.decode(), length, value, 0, False, True, True, False
                )
            else:
                _skip_value(stream, tag, length)
        if stream.elements == 0:
            raise UnreadableInstance("dataset has no readable elements")
        ds = Dataset(kept)
        ds.set_original_encoding(False, True)
        ds.file_meta = meta
        if pixels is not None:
            check_encapsulation(ds, pixels == _UNDEFINED)  # deflate is a native syntax
            _check_native_length(pixels, stream.drain(), ds)
    return ds


_META_ELEMENT = struct.Struct("<H2x2sH")  # group, (element), VR, and a 16-bit length


def _is_deflated(content: Buffer) -> bool:
    """Return whether the file meta names the deflated transfer syntax.

    Once per instance, so nothing is copied: the meta is searched where it lies. Its
    end is found by walking its element headers, not from its group length, which
    pydicom ignores too: one that stopped short would hand a deflate bomb to pydicom,
    which inflates it whole.
    """
    end, limit = 132, min(len(content), 132 + _META_PEEK)
    while end + 8 <= limit:
        group, vr, length = _META_ELEMENT.unpack_from(content, end)
        if group != 2:
            break
        if vr in _LONG_VRS:
            end += 12 + int.from_bytes(content[end + 8 : end + 12], "little")
        elif vr in _SHORT_VRS:
            end += 8 + length
        else:  # not explicit VR, which pydicom then reads as implicit: search it all
            end = limit
    return content.find(_DEFLATED, 132, min(end, limit)) >= 0


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


def storage_error(exc: OSError) -> OutOfResources:
    """Return the 0xA700 failure for an error writing to the spool.

    Parameters
    ----------
    exc : OSError
        The error.

    Returns
    -------
    OutOfResources
        "storage is full", or "cannot write to storage (<errno name>)".
    """
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutOfResources("storage is full")
    return OutOfResources(f"cannot write to storage ({os_reason(exc)})")


def database_error(exc: DBAPIError | PoolTimeout) -> IngestError:
    """Say whether a database error is worth the sender's retry.

    Parameters
    ----------
    exc : DBAPIError or sqlalchemy.exc.TimeoutError
        What recording the instance raised.

    Returns
    -------
    IngestError
        :class:`OutOfResources` (0xA700: retry later) when the database is out of reach,
        busy or full, the pool has no connection to spare, or a unique constraint kept
        failing; :class:`RecordRefused` (0x0110) when it refuses the row itself (a
        value, a trigger, the schema): a retry of the same instance would get the same
        answer.
    """
    if isinstance(exc, PoolTimeout):
        return OutOfResources("database error (no connection free in the pool)")
    name = type(exc.orig).__name__
    # OperationalError covers what passes: a lost connection, a lock or serialization
    # conflict, a full disk, an administrator's shutdown (PostgreSQL classes 08, 40,
    # 53, 57, 58; SQLite's "database is locked" and "disk full"). An IntegrityError
    # that outlived _record_slow's retries is, in practice, concurrent stores of one
    # study or series still colliding: a later retry gets through.
    transient = OperationalError | InterfaceError | IntegrityError
    if exc.connection_invalidated or isinstance(exc, transient):
        return OutOfResources(f"database error ({name})")
    return RecordRefused(f"database refused the instance's row ({name})")


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None  # a malformed IS value is ignored, not a reason to refuse


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
        The checked identifiers, and the values that index the instance: those that
        do not fit their columns are None or clipped. A line names them: at WARNING
        for the first instance of a series with a value left out, at DEBUG otherwise.

    Raises
    ------
    UnreadableInstance
        If the bytes are not a parseable DICOM dataset, or its pixel data is cut
        short or encoded otherwise than its transfer syntax says.
    MissingAttribute
        If a required UID is absent.
    InvalidUID
        If a UID (the transfer syntax's too) is malformed or unsafe as a path component.
    InstanceTooLarge
        If a deflated dataset inflates beyond :data:`MAX_INFLATED_BYTES` or holds more
        than :data:`MAX_DEFLATED_ELEMENTS` elements.
    """
    try:
        ds = _read_deflated(fp, content) if _is_deflated(content) else None
        if ds is None:
            ds = pydicom.dcmread(fp, stop_before_pixels=True)
            if len(ds) == 0:
                raise UnreadableInstance("dataset has no readable elements")
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
    syntax = str(ds.file_meta.get("TransferSyntaxUID", "") or "").strip().rstrip("\x00")
    if syntax and uid_problem(syntax):
        # pynetdicom writes the negotiated one; only an imported file can carry this.
        raise InvalidUID(f"TransferSyntaxUID {uid_problem(syntax)}")
    # Values that do not fit their columns are left out of the index or clipped, never
    # a reason to refuse (see _index_text); the log says which, never the value.
    problems: list[str] = []
    expected = _index_int(ds, "ImagesInAcquisition", problems)
    header = InstanceHeader(
        sop_class_uid=uids["SOPClassUID"],
        sop_instance_uid=uids["SOPInstanceUID"],
        study_uid=uids["StudyInstanceUID"],
        series_uid=uids["SeriesInstanceUID"],
        transfer_syntax_uid=syntax,
        modality=_index_text(ds, "Modality", 16, problems),
        instance_number=_index_int(ds, "InstanceNumber", problems),
        expected_instances=expected if expected is not None and expected > 0 else None,
        patient_id=_index_text(ds, "PatientID", 64, problems),
        accession_number=_index_text(ds, "AccessionNumber", 16, problems),
    )
    if problems:
        # A clipped value still finds its study, and a scanner that writes long accession
        # numbers writes them in every image: not worth a line per image. A value left
        # out is (a search by it finds nothing), but once per series says as much.
        left_out = not all(problem.endswith("(clipped)") for problem in problems)
        level = logging.WARNING if left_out and _first_warning(header.series_uid) else logging.DEBUG
        log.log(
            level,
            "index values adjusted sop_uid=%s: %s",
            header.sop_instance_uid,
            "; ".join(problems),
        )
    return header


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
        return self.spool.has_free(self.min_free_bytes)

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
            raise storage_error(exc) from None
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
            raise storage_error(exc) from None

        calling_ae = index_value(calling_ae, 16)
        try:
            try:
                previous = self._record(header, relative.as_posix(), size, digest, calling_ae)
            except DataError:
                # A value the database refuses that the header checks did not foresee (a
                # database whose encoding cannot hold a name, say): the instance is
                # stored without its index values rather than refused for ever.
                log.warning(
                    "index values refused by the database sop_uid=%s: stored without them",
                    header.sop_instance_uid,
                )
                header = header.bare()
                previous = self._record(header, relative.as_posix(), size, digest, calling_ae)
        except BaseException as exc:
            # Not acknowledged, so it must not linger; the file is ours alone.
            self.spool.remove(relative)
            if isinstance(exc, DBAPIError | PoolTimeout):
                raise database_error(exc) from None
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
