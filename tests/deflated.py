"""Instances built byte by byte: deflate bombs, and datasets pydicom would not write."""

from __future__ import annotations

import zlib
from io import BytesIO
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    generate_uid,
)
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32

from tests.factories import ct_series

UNDEFINED = 0xFFFFFFFF
_LONG_VRS = frozenset(vr.encode() for vr in EXPLICIT_VR_LENGTH_32)


def dataset_bytes(ds: Dataset) -> bytes:
    """Return ``ds`` encoded in explicit VR little endian, without preamble or file meta."""
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    plain = BytesIO()
    ds.save_as(plain, enforce_file_format=True)
    return plain.getvalue()[144 + int.from_bytes(plain.getvalue()[140:144], "little") :]


def explicit_file(ds: Dataset, dataset: bytes) -> bytes:
    """Return a file: ``ds``'s file meta (explicit VR little endian), then ``dataset``."""
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    head = BytesIO()
    ds.save_as(head, enforce_file_format=True)
    return head.getvalue()[: 144 + int.from_bytes(head.getvalue()[140:144], "little")] + dataset


def deflated_file(ds: Dataset, dataset: bytes, *, zeros_mib: int = 0) -> bytes:
    """Return a deflated file: ``ds``'s file meta, then ``dataset`` deflated.

    ``zeros_mib`` MiB of zeros are deflated after ``dataset`` in the same stream, so
    they read as part of it: after a Pixel Data header claiming that many, a deflate
    bomb that inflates ``zeros_mib`` MiB from about ``zeros_mib`` KiB.
    """
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    head = BytesIO()
    ds.save_as(head, enforce_file_format=True)
    meta_end = 144 + int.from_bytes(head.getvalue()[140:144], "little")
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = bytearray(deflater.compress(dataset))
    zeros = bytes(2**20)
    for _ in range(zeros_mib):
        body += deflater.compress(zeros)
    body += deflater.flush()
    return head.getvalue()[:meta_end] + bytes(body)


def deflated(ds: Dataset, tail: bytes = b"", *, chunks: int = 0) -> bytes:
    """Return ``ds`` as a deflated file, ``tail`` and ``chunks`` MiB of zeros after it."""
    return deflated_file(ds, dataset_bytes(ds) + tail, zeros_mib=chunks)


def element(tag: int, vr: bytes, value: bytes, *, length: int | None = None) -> bytes:
    """Return one explicit VR little endian element; ``length`` overrides the real one."""
    length = len(value) if length is None else length
    head = (tag >> 16).to_bytes(2, "little") + (tag & 0xFFFF).to_bytes(2, "little") + vr
    if vr in _LONG_VRS:
        return head + b"\x00\x00" + length.to_bytes(4, "little") + value
    return head + length.to_bytes(2, "little") + value


def with_raw(ds: Dataset, tag: int, vr: bytes, raw: bytes) -> bytes:
    """Encode ``ds`` (explicit VR) with element ``tag`` holding ``raw``, whatever it is."""
    if tag in ds:
        del ds[tag]
    raw += b" " * (len(raw) % 2)
    return explicit_file(ds, insert_element(dataset_bytes(ds), tag, element(tag, vr, raw)))


def item(content: bytes) -> bytes:
    """Return a sequence item of undefined length holding ``content``."""
    return b"\xfe\xff\x00\xe0\xff\xff\xff\xff" + content + b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"


def sequence(tag: int, items: list[bytes] | bytes, vr: bytes = b"SQ") -> bytes:
    """Return an undefined-length sequence of ``items`` (already encoded) and its end."""
    content = items if isinstance(items, bytes) else b"".join(items)
    end = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    return element(tag, vr, content + end, length=UNDEFINED)


def insert_element(dataset: bytes, tag: int, encoded: bytes) -> bytes:
    """Return ``dataset`` with ``encoded`` (the element ``tag``) in its place by tag order.

    ``dataset`` must hold defined-length top-level elements only (as pydicom writes).
    """
    at = 0
    while at < len(dataset):
        current = int.from_bytes(dataset[at : at + 2], "little") << 16
        current |= int.from_bytes(dataset[at + 2 : at + 4], "little")
        if current > tag:
            break
        if dataset[at + 4 : at + 6] in _LONG_VRS:
            at += 12 + int.from_bytes(dataset[at + 8 : at + 12], "little")
        else:
            at += 8 + int.from_bytes(dataset[at + 6 : at + 8], "little")
    return dataset[:at] + encoded + dataset[at:]


def with_syntax(data: bytes, syntax: str) -> bytes:
    """Return a file with another Transfer Syntax UID in its file meta, nothing else."""
    head = b"\x02\x00\x10\x00UI"
    at = data.index(head, 132)
    old = int.from_bytes(data[at + 6 : at + 8], "little")
    value = syntax.encode() + b"\x00" * (len(syntax) % 2)
    out = data[:at] + head + len(value).to_bytes(2, "little") + value + data[at + 8 + old :]
    group = int.from_bytes(data[140:144], "little") + len(value) - old
    return out[:140] + group.to_bytes(4, "little") + out[144:]


def pixel_header(length: int) -> bytes:
    """Return an explicit VR little endian Pixel Data (OW) element header for ``length``."""
    return element(0x7FE00010, b"OW", b"", length=length)


def deflate_bomb(mib: int) -> bytes:
    """Return a CT image whose deflated Pixel Data inflates to ``mib`` MiB of zeros.

    The image header says 8 x 8 pixels; the Pixel Data is far longer than that needs,
    which our checks allow (only shorter is refused), so below the inflated-size cap
    such an instance is valid and stored.
    """
    ds = ct_series(np.zeros((1, 8, 8), np.float32))[0]
    del ds.PixelData
    return deflated(ds, pixel_header(mib * 2**20), chunks=mib)


def element_bomb(path: Path, inflated: int, uid: str | None = None) -> Path:
    """Write a deflated CT instance whose dataset inflates to about ``inflated`` bytes.

    A few hundred KiB on the wire: the bulk is one OB element of zeros (not Pixel
    Data, unlike :func:`deflate_bomb`), which deflate squeezes about a thousandfold.

    Parameters
    ----------
    path : Path
        Where to write it.
    inflated : int
        Bytes of zeros in the OB element.
    uid : str, optional
        The SOP Instance UID (and, with ".1" and ".2" added, the study's and the
        series'); new ones by default.

    Returns
    -------
    Path
        ``path``.
    """
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = uid or generate_uid()
    ds.StudyInstanceUID = f"{uid}.1" if uid else generate_uid()
    ds.SeriesInstanceUID = f"{uid}.2" if uid else generate_uid()
    ds.Modality = "CT"
    inflated -= inflated % 2
    mib, rest = divmod(inflated, 2**20)
    # (0009,0010) would need a creator; an OB element of a public tag will do. Its
    # zeros are the odd bytes here, then whole MiB from deflated_file.
    bulk = element(0x00420011, b"OB", bytes(rest), length=inflated)
    path.write_bytes(deflated_file(ds, dataset_bytes(ds) + bulk, zeros_mib=mib))
    return path
