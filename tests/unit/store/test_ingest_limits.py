"""Ingest's limits: values that do not fit the index, database errors, deflated headers.

The same over real associations is in tests/integration/test_ingest_limits.py; these
look closer at each case, on SQLite and PostgreSQL where a database is involved.
"""

from __future__ import annotations

import logging
import threading
import tracemalloc
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit
from sqlalchemy import select
from sqlalchemy.exc import (
    DataError,
    IntegrityError,
    InterfaceError,
    InternalError,
    OperationalError,
    ProgrammingError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeout

from dicomnode.db import Instance, Series, Study, make_engine
from dicomnode.db.engine import POOL_HEADROOM
from dicomnode.dimse import statuses
from dicomnode.errors import (
    InstanceTooLarge,
    InvalidUID,
    OutOfResources,
    RecordRefused,
    UnreadableInstance,
)
from dicomnode.pipeline import encode
from dicomnode.store import Ingestor, Spool, ingest
from dicomnode.store.ingest import MAX_CONCURRENT_INFLATIONS, database_error, parse_header
from tests.conftest import wait_for
from tests.deflated import (
    UNDEFINED,
    dataset_bytes,
    deflated,
    deflated_file,
    element,
    element_bomb,
    insert_element,
    item,
    pixel_header,
    sequence,
    with_raw,
    with_syntax,
)
from tests.factories import ct_series


@pytest.fixture
def ingestor(tmp_path: Path, sessions) -> Ingestor:
    return Ingestor(Spool(tmp_path / "spool"), sessions)


def one_ct() -> Dataset:
    return ct_series(np.zeros((1, 8, 8), np.float32))[0]


# --- values that do not fit the index ----------------------------------------------------

PATIENT_ID, ACCESSION, MODALITY = 0x00100020, 0x00080050, 0x00080060
NUMBER, IMAGES = 0x00200013, 0x00201002  # InstanceNumber, ImagesInAcquisition

# (tag, VR, raw value, header attribute, what the header holds, whether a line says so)
FITS = [
    pytest.param(
        NUMBER, b"IS", b"2147483648", "instance_number", None, True, id="instance-number-over-2^31"
    ),
    pytest.param(
        NUMBER,
        b"IS",
        b"2147483647",
        "instance_number",
        2**31 - 1,
        False,
        id="instance-number-2^31-1",
    ),
    pytest.param(
        NUMBER, b"IS", b"-12", "instance_number", -12, False, id="instance-number-negative"
    ),
    pytest.param(
        NUMBER,
        b"IS",
        b"-2147483649",
        "instance_number",
        None,
        True,
        id="instance-number-under-2^31",
    ),
    pytest.param(
        NUMBER, b"IS", b"-inf", "instance_number", None, True, id="instance-number-infinite"
    ),
    pytest.param(
        NUMBER, b"IS", b"twelve", "instance_number", None, True, id="instance-number-not-a-number"
    ),
    pytest.param(
        IMAGES, b"IS", b"9999999999", "expected_instances", None, True, id="images-over-2^31"
    ),
    # A count of no images counts nothing: ignored, as before.
    pytest.param(IMAGES, b"IS", b"-3", "expected_instances", None, False, id="images-negative"),
    pytest.param(PATIENT_ID, b"LO", b"AB\x00CD", "patient_id", None, True, id="patient-id-nul"),
    pytest.param(
        PATIENT_ID, b"LO", b"AB\\CD", "patient_id", "AB\\CD", False, id="patient-id-multi-valued"
    ),
    pytest.param(
        PATIENT_ID, b"LO", b"P" * 80, "patient_id", "P" * 64, True, id="patient-id-over-long"
    ),
    # Not UTF-8 although the dataset says so: pydicom puts U+FFFD in; that fits.
    pytest.param(
        PATIENT_ID,
        b"LO",
        b"\xff\xfeAB",
        "patient_id",
        "\ufffd\ufffdAB",
        False,
        id="patient-id-undecodable",
    ),
    pytest.param(ACCESSION, b"SH", b"Q7\x00Z9", "accession_number", None, True, id="accession-nul"),
    # Control characters are valid text to both databases: kept (and never logged).
    pytest.param(
        ACCESSION,
        b"SH",
        b"A\x01\x1b[1m",
        "accession_number",
        "A\x01\x1b[1m",
        False,
        id="accession-controls",
    ),
    pytest.param(MODALITY, b"CS", b"XZ\x00T", "modality", None, True, id="modality-nul"),
    pytest.param(MODALITY, b"CS", b"M" * 20, "modality", "M" * 16, True, id="modality-over-long"),
]


@pytest.mark.filterwarnings("ignore::UserWarning:pydicom")
@pytest.mark.parametrize(("tag", "vr", "raw", "field", "held", "logged"), FITS)
def test_header_values_are_fitted_to_their_columns(
    ingestor: Ingestor,
    sessions,
    caplog: pytest.LogCaptureFixture,
    tag: int,
    vr: bytes,
    raw: bytes,
    field: str,
    held: object,
    logged: bool,
) -> None:
    caplog.set_level(logging.DEBUG, logger="dicomnode")  # a clipped value is said at DEBUG
    ds = one_ct()
    ds.SpecificCharacterSet = "ISO_IR 192"
    data = with_raw(ds, tag, vr, raw)
    assert getattr(parse_header(data), field) == held
    # And the database takes it, whichever it is; the file is the one sent.
    outcome = ingestor.store(data)
    assert ingestor.spool.absolute(outcome.path).read_bytes() == data
    with sessions() as s:
        stored = {
            "instance_number": s.scalar(select(Instance.instance_number)),
            "expected_instances": s.scalar(select(Series.expected_instances)),
            "modality": s.scalar(select(Series.modality)),
            "patient_id": s.scalar(select(Study.patient_id)),
            "accession_number": s.scalar(select(Study.accession_number)),
        }
    assert stored[field] == held
    # Left out or changed: a line says which attribute, never its value.
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("dicomnode")]
    keyword = pydicom.datadict.keyword_for_tag(tag)
    assert any(f"{keyword} " in line for line in ours) == logged, ours
    value = raw.decode(errors="ignore").split("\x00")[0]
    assert all(value not in line for line in ours), ours


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("dicomnode") and r.levelno >= logging.WARNING
    ]


@pytest.mark.filterwarnings("ignore::UserWarning:pydicom")
def test_a_clipped_value_is_no_warning_however_many_images_carry_it(
    ingestor: Ingestor, caplog: pytest.LogCaptureFixture
) -> None:
    # Some scanners write accession numbers longer than SH allows in every image: a
    # WARNING per image would be a thousand lines per series, for a value still indexed.
    caplog.set_level(logging.DEBUG, logger="dicomnode")
    images = ct_series(np.zeros((40, 8, 8), np.float32))
    for ds in images:
        ds.AccessionNumber = "A" * 30
        ingestor.store(encode(ds))
    assert _warnings(caplog) == []
    clipped = [r for r in caplog.records if "(clipped)" in r.getMessage()]
    assert len(clipped) == len(images) and all(r.levelno == logging.DEBUG for r in clipped)


@pytest.mark.filterwarnings("ignore::UserWarning:pydicom")
def test_a_value_left_out_warns_once_per_series(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="dicomnode")
    first, second = (ct_series(np.zeros((5, 8, 8), np.float32)) for _ in range(2))
    for ds in [*first, *second]:
        parse_header(with_raw(ds, PATIENT_ID, b"LO", b"AB\x00CD"))
    warned = _warnings(caplog)
    assert len(warned) == 2, warned
    assert all("PatientID has a NUL character (not indexed)" in line for line in warned)
    assert warned[0].startswith(f"index values adjusted sop_uid={first[0].SOPInstanceUID}:")
    assert warned[1].startswith(f"index values adjusted sop_uid={second[0].SOPInstanceUID}:")
    # The other instances still say so, at DEBUG.
    told = [r for r in caplog.records if "PatientID has a NUL" in r.getMessage()]
    assert len(told) == 10


@pytest.mark.filterwarnings("ignore::UserWarning:pydicom")
def test_the_series_warned_about_are_bounded(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Oldest forgotten first: a series seen again after that warns again.
    monkeypatch.setattr(ingest, "_WARNED_SERIES_MAX", 2)
    monkeypatch.setattr(ingest, "_warned_series", OrderedDict())
    images = [one_ct() for _ in range(3)]
    for ds in [*images, images[0]]:
        parse_header(with_raw(ds, NUMBER, b"IS", b"twelve"))
    assert len(_warnings(caplog)) == 4
    assert len(ingest._warned_series) == 2


def test_an_ae_title_the_database_would_refuse_is_left_out(ingestor: Ingestor, sessions) -> None:
    ingestor.store(encode(one_ct()), calling_ae="CT\x00ONE")
    with sessions() as s:
        assert s.scalar(select(Instance.calling_ae)) is None


def test_a_malformed_transfer_syntax_uid_is_refused(ingestor: Ingestor) -> None:
    # pynetdicom writes the negotiated one; an imported file can carry anything.
    ds = one_ct()
    data = with_syntax(encode(ds), "1.2.840.10008.1.2.1" + ".9" * 30)
    with pytest.raises(InvalidUID, match="TransferSyntaxUID is longer than 64"):
        ingestor.store(data)


# --- database errors -------------------------------------------------------------------


def _wrapped(cls: type, orig: Exception) -> Exception:
    return cls("INSERT ...", {}, orig)


@pytest.mark.parametrize(
    ("error", "refusal", "code"),
    [
        (_wrapped(OperationalError, Exception("database is locked")), OutOfResources, 0xA700),
        (_wrapped(InterfaceError, Exception("connection closed")), OutOfResources, 0xA700),
        (PoolTimeout("QueuePool limit of size 5 overflow 10 reached"), OutOfResources, 0xA700),
        (_wrapped(DataError, ValueError("integer out of range")), RecordRefused, 0x0110),
        # A unique constraint still failing after the retries: concurrent stores.
        (_wrapped(IntegrityError, Exception("constraint")), OutOfResources, 0xA700),
        (_wrapped(ProgrammingError, Exception("no such table")), RecordRefused, 0x0110),
        (_wrapped(InternalError, Exception("raise exception")), RecordRefused, 0x0110),
    ],
    ids=[
        "operational",
        "interface",
        "pool-timeout",
        "data",
        "integrity",
        "programming",
        "internal",
    ],
)
def test_database_errors_are_transient_only_when_a_retry_can_help(
    error: Exception, refusal: type, code: int
) -> None:
    refused = database_error(error)  # type: ignore[arg-type]
    assert type(refused) is refusal
    assert statuses.status_for(refused) == code


def test_a_lost_connection_is_transient_whatever_its_class() -> None:
    error = _wrapped(InternalError, Exception("server closed the connection"))
    error.connection_invalidated = True  # type: ignore[attr-defined]
    assert isinstance(database_error(error), OutOfResources)  # type: ignore[arg-type]


def test_no_free_connection_is_out_of_resources(db_url: str, engine, tmp_path: Path) -> None:
    from dicomnode.db import session_factory

    small = make_engine(db_url, pool_size=1, max_overflow=0, pool_timeout=0.5)
    ingestor = Ingestor(Spool(tmp_path / "spool"), session_factory(small))
    try:
        with small.connect(), pytest.raises(OutOfResources, match="no connection free"):
            ingestor.store(encode(one_ct()))
        assert list((tmp_path / "spool" / "incoming").rglob("*.dcm")) == []
    finally:
        small.dispose()


def test_the_pool_holds_a_connection_for_every_thread(db_url: str, engine) -> None:
    sized = make_engine(db_url, connections=40)
    try:
        assert sized.pool.size() == 40 + POOL_HEADROOM  # type: ignore[attr-defined]
    finally:
        sized.dispose()


@pytest.mark.system
def test_a_node_sizes_its_pool_to_associations_and_workers(tmp_path: Path) -> None:
    from dicomnode.config import parse_settings
    from dicomnode.node import Node

    (tmp_path / "models").mkdir()
    settings = parse_settings(
        {
            "database": {"url": f"sqlite:///{tmp_path / 'node.db'}"},
            "storage": {"path": str(tmp_path / "spool")},
            "models": {"path": str(tmp_path / "models")},
            "listener": {"max_associations": 50},
            "worker": {"count": 3},
            "metrics": {"enabled": False},
        },
        environ={},
    )
    node = Node.from_settings(settings, listen=True, work=True)
    try:
        # Each association stores on its own thread; a worker and its heartbeat hold two.
        assert node.engine.pool.size() >= 50 + 2 * 3  # type: ignore[attr-defined]
    finally:
        node.engine.dispose()


# --- transfer syntax against pixel data --------------------------------------------------


def test_native_pixel_data_under_a_compressed_syntax_is_refused(ingestor: Ingestor) -> None:
    data = with_syntax(encode(one_ct()), JPEGBaseline8Bit)
    with pytest.raises(UnreadableInstance, match="PixelData is native but the transfer syntax"):
        ingestor.store(data)
    assert list((ingestor.spool.root / "incoming").rglob("*.dcm")) == []


def test_encapsulated_pixel_data_under_a_compressed_syntax_is_stored(ingestor: Ingestor) -> None:
    ds = one_ct()
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(60)])
    ingestor.store(encode(ds))


# --- deflated instances ----------------------------------------------------------------


def test_a_deflated_instance_is_stored_as_received(ingestor: Ingestor, sessions) -> None:
    ds = one_ct()
    ds.ImagesInAcquisition = 3
    data = deflated(ds)
    outcome = ingestor.store(data)
    stored = ingestor.spool.absolute(outcome.path).read_bytes()
    assert stored == data
    assert pydicom.dcmread(ingestor.spool.absolute(outcome.path)).PixelData == ds.PixelData
    with sessions() as s:
        assert s.scalar(select(Study.patient_id)) == "PID-TEST-0001"
        assert s.scalar(select(Series.expected_instances)) == 3
        assert s.scalar(select(Instance.instance_number)) == 1


REFERENCED = 0x00081140  # Referenced Image Sequence


def _with_sequence(encoded: bytes) -> bytes:
    """A deflated CT image with ``encoded`` as its Referenced Image Sequence."""
    ds = one_ct()
    return deflated_file(ds, insert_element(dataset_bytes(ds), REFERENCED, encoded))


def _nested(depth: int) -> bytes:
    inner = b""
    for _ in range(depth):
        inner = sequence(REFERENCED, [item(inner)])
    return inner


def _header_without_pixels() -> Dataset:
    ds = one_ct()
    del ds.PixelData
    return ds


DEFLATED_REFUSALS: dict[str, tuple[Callable[[], bytes], type, str]] = {
    "pixels-short": (
        lambda: deflated(_header_without_pixels(), pixel_header(64) + bytes(64)),
        UnreadableInstance,
        "PixelData holds 64 bytes but the image header needs 128",
    ),
    "pixels-truncated": (
        lambda: deflated(_header_without_pixels(), pixel_header(4096) + bytes(200)),
        UnreadableInstance,
        "PixelData is truncated: its length is 4096 bytes, 200 arrived",
    ),
    "pixels-encapsulated": (
        lambda: deflated(
            _header_without_pixels(),
            sequence(0x7FE00010, [b"\xfe\xff\x00\xe0\x00\x00\x00\x00"], vr=b"OB"),
        ),
        UnreadableInstance,
        "PixelData is encapsulated but the transfer syntax 1.2.840.10008.1.2.1.99 is native",
    ),
    "stream-cut-short": (
        lambda: deflated(one_ct())[:-60],
        UnreadableInstance,
        "runs past the end of the data|truncated",
    ),
    "not-deflate": (
        lambda: deflated(one_ct())[:400] + bytes(range(256)) * 4,
        UnreadableInstance,
        "cannot be inflated",
    ),
    "sequence-without-end": (
        lambda: _with_sequence(element(REFERENCED, b"SQ", item(b""), length=UNDEFINED)),
        UnreadableInstance,
        r"element \(0008,1140\)",
    ),
    "nested-too-deep": (
        lambda: _with_sequence(_nested(80)),
        UnreadableInstance,
        "nested deeper than 64",
    ),
    "too-many-elements": (
        # 400 000 items of one element each: 1.2 million headers to walk, 11 MiB inflated.
        lambda: _with_sequence(
            sequence(REFERENCED, [item(element(0x00081155, b"UI", b"1.2\x00"))] * 400_000)
        ),
        InstanceTooLarge,
        "deflated dataset has more than 1,000,000 elements",
    ),
    "inflates-beyond-cap": (
        lambda: deflated(_header_without_pixels(), pixel_header(257 * 2**20), chunks=257),
        InstanceTooLarge,
        "deflated dataset inflates beyond 256 MiB",
    ),
}


@pytest.mark.filterwarnings("ignore::UserWarning:pydicom")
@pytest.mark.parametrize(
    ("build", "error", "message"), DEFLATED_REFUSALS.values(), ids=DEFLATED_REFUSALS.keys()
)
def test_deflated_instances_are_checked_like_the_others(
    ingestor: Ingestor, build: Callable[[], bytes], error: type, message: str
) -> None:
    with pytest.raises(error, match=message):
        ingestor.store(build())
    assert list((ingestor.spool.root / "incoming").rglob("*.dcm")) == []


def test_a_deflated_header_is_streamed_whatever_its_group_length_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # pydicom reads the file meta to its last group 2 element whatever (0002,0000) says:
    # a group length that stopped short of the transfer syntax must not hand the file
    # to pydicom, which would inflate all of it.
    streamed: list[bool] = []
    read_deflated = ingest._read_deflated

    def spy(fp, content):  # type: ignore[no-untyped-def]
        ds = read_deflated(fp, content)
        streamed.append(ds is not None)
        return ds

    monkeypatch.setattr(ingest, "_read_deflated", spy)
    data = deflated(one_ct())
    for length in (0, 12):
        lying = data[:140] + length.to_bytes(4, "little") + data[144:]
        assert parse_header(lying).patient_id == "PID-TEST-0001"
    assert streamed == [True, True]


def test_sequences_in_a_deflated_header_are_skipped_not_parsed() -> None:
    # 80 000 tiny items (2 MiB inflated, a few KiB deflated) before the identifiers,
    # some of them implicit VR inside UN of undefined length: pydicom would build a
    # Dataset per item; the header needs none of them.
    ds = one_ct()
    tiny = element(0x00081155, b"UI", b"1.2\x00")
    items = sequence(0x00081140, [item(tiny)] * 60_000)
    implicit = b"\x08\x00\x55\x11\x04\x00\x00\x001.2\x00"  # (0008,1155) implicit VR
    unknown = sequence(0x00091010, [item(implicit)] * 20_000, vr=b"UN")
    plain = insert_element(dataset_bytes(ds), 0x00081140, items)
    plain = insert_element(plain, 0x00091010, unknown)
    data = deflated_file(ds, plain)
    assert len(data) < 2**20
    tracemalloc.start()
    try:
        header = parse_header(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert header.sop_instance_uid == ds.SOPInstanceUID and header.patient_id == "PID-TEST-0001"
    assert peak < 4 * 2**20, f"{peak / 2**20:.1f} MiB"


def test_deflated_bombs_inflate_in_bounded_steps() -> None:
    # 200 MiB of pixel data, under the cap: accepted, with memory of a few steps.
    from tests.deflated import deflate_bomb

    bomb = deflate_bomb(200)
    tracemalloc.start()
    try:
        header = parse_header(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert header.modality == "CT"
    assert peak < 4 * 2**20, f"{peak / 2**20:.1f} MiB"


def test_inflations_at_once_are_limited(monkeypatch: pytest.MonkeyPatch) -> None:
    # One more parse than may inflate at once, each held in its first inflation: the
    # last must wait outside until one of the others is let go.
    release = threading.Event()
    inside: set[int] = set()
    inflate = ingest._Inflated._inflate

    def held(stream: ingest._Inflated) -> bool:
        inside.add(threading.get_ident())
        release.wait(30)
        return inflate(stream)

    monkeypatch.setattr(ingest._Inflated, "_inflate", held)
    data = deflated(one_ct())
    headers: list[str] = []
    parses = [
        threading.Thread(target=lambda: headers.append(parse_header(data).modality or ""))
        for _ in range(MAX_CONCURRENT_INFLATIONS + 1)
    ]
    for parse in parses:
        parse.start()
    try:
        assert wait_for(lambda: len(inside) >= MAX_CONCURRENT_INFLATIONS, 10)
        # Time for the last one to get in, were it not kept out.
        assert not wait_for(lambda: len(inside) > MAX_CONCURRENT_INFLATIONS, 1)
    finally:
        release.set()
        for parse in parses:
            parse.join(30)
    assert len(inside) == MAX_CONCURRENT_INFLATIONS + 1
    assert headers == ["CT"] * (MAX_CONCURRENT_INFLATIONS + 1)


@pytest.mark.parametrize(("mib", "k"), [(4, 30), (16, 1), (16, 3)])
def test_output_zlib_still_holds_at_the_end_of_the_input_is_read(
    mib: int, k: int, tmp_path: Path
) -> None:
    # The last compressed bytes of a run of zeros can stand for more than one step of
    # output; stopping when the input ran out (not the output) cut the value short:
    # "element (0042,0011) runs past the end of the data" for about one bomb in four
    # (these UIDs are ones that did).
    bomb = element_bomb(tmp_path / "b.dcm", mib * 2**20, uid=f"1.2.826.0.1.3680043.9.7433.{k}")
    assert parse_header(bomb.read_bytes()).modality == "CT"
