"""The one-step file meta writer: pydicom's bytes exactly, or pydicom itself."""

from __future__ import annotations

from io import BytesIO

import pydicom
import pynetdicom
import pynetdicom.dimse_messages
import pytest
from pydicom.filewriter import write_file_meta_info
from pynetdicom.dsutils import create_file_meta

from dicomnode.dimse import compat
from dicomnode.dimse.file_meta import encode_file_meta
from dicomnode.listener import chunked

CT = "1.2.840.10008.5.1.4.1.1.2"  # odd length
EXPLICIT = "1.2.840.10008.1.2.1"  # odd
JPEG_LS = "1.2.840.10008.1.2.4.80"  # even
IMPLEMENTATION = (
    pynetdicom.PYNETDICOM_IMPLEMENTATION_UID,
    pynetdicom.PYNETDICOM_IMPLEMENTATION_VERSION,
)


def pydicom_bytes(sop_class: str, sop_instance: str, syntax: str, uid: str, version: str) -> bytes:
    out = BytesIO()
    meta = create_file_meta(
        sop_class_uid=pydicom.uid.UID(sop_class),
        sop_instance_uid=pydicom.uid.UID(sop_instance),
        transfer_syntax=pydicom.uid.UID(syntax),
        implementation_uid=pydicom.uid.UID(uid),
        implementation_version=version,
    )
    write_file_meta_info(out, meta)  # type: ignore[arg-type]
    return out.getvalue()


@pytest.mark.parametrize(
    ("sop_class", "sop_instance", "syntax", "uid", "version"),
    [
        (CT, "1.2.3.4", EXPLICIT, *IMPLEMENTATION),
        (CT, "1.2.3.45", JPEG_LS, *IMPLEMENTATION),
        ("1.2.840.10008.5.1.4.1.1.4", "2.25." + "9" * 59, EXPLICIT, "1.2.3", "ODD"),
        (CT, "1.2", "1.2.840.10008.1.2", "1.23", "EVEN"),
        (CT, "1.2.3", EXPLICIT, "1.2.3", "X" * 16),
    ],
)
def test_the_same_bytes_as_pydicom(
    sop_class: str, sop_instance: str, syntax: str, uid: str, version: str
) -> None:
    expected = pydicom_bytes(sop_class, sop_instance, syntax, uid, version)
    assert encode_file_meta(sop_class, sop_instance, syntax, uid, version) == expected
    # and pydicom reads it back as written
    meta = pydicom.dcmread(BytesIO(b"\0" * 128 + b"DICM" + expected)).file_meta
    assert meta.MediaStorageSOPInstanceUID == sop_instance
    assert meta.TransferSyntaxUID == syntax


@pytest.mark.parametrize(
    "sop_instance",
    ["", "1.2.\u00e93", "1.2\\3.4", "1." + "2" * 64],
    ids=["empty", "not-ascii", "two-values", "too-long"],
)
def test_values_for_pydicom_s_general_rules_are_left_to_it(sop_instance: str) -> None:
    assert encode_file_meta(CT, sop_instance, EXPLICIT, *IMPLEMENTATION) is None


def test_pynetdicom_writes_through_it_once_installed() -> None:
    assert chunked.install()
    assert compat.FILE_META in compat._ours and compat.FILE_META_WRITER in compat._ours
    meta = pynetdicom.dimse_messages.create_file_meta(
        sop_class_uid=CT, sop_instance_uid="1.2.3.4", transfer_syntax=EXPLICIT
    )
    assert isinstance(meta, compat._FileMeta)  # no pydicom dataset is built
    out = BytesIO()
    pynetdicom.dimse_messages.write_file_meta_info(out, meta)
    assert out.getvalue() == pydicom_bytes(CT, "1.2.3.4", EXPLICIT, *IMPLEMENTATION)
    # a value for pydicom's own rules still gets pydicom's bytes
    meta = pynetdicom.dimse_messages.create_file_meta(
        sop_class_uid=CT, sop_instance_uid="1.2\\3", transfer_syntax=EXPLICIT
    )
    out = BytesIO()
    pynetdicom.dimse_messages.write_file_meta_info(out, meta)
    assert out.getvalue() == pydicom_bytes(CT, "1.2\\3", EXPLICIT, *IMPLEMENTATION)
