"""What a sender cannot fix by retrying, and what keeps the listener's memory bounded.

Over real associations (pynetdicom as the sender) on SQLite and PostgreSQL:

* header values that do not fit the index columns (a 32-bit integer column, NUL in
  text) are stored anyway, the file as received and the index without the value;
* pixel data encoded otherwise than the transfer syntax says is refused (0xC210);
* a database that refuses the row answers a failure that is not "out of resources",
  and a pool with no connection to spare answers 0xA700, not 0x0110;
* four deflate bombs sent at once to a real ``dicomnode listen`` process raise its
  peak resident memory by less than :data:`DEFLATE_BOMBS_RSS_BOUND`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
)
from pynetdicom import AE, _config
from sqlalchemy import Engine, func, select, text
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.db import Instance, Series, Study, make_engine, session_factory
from dicomnode.dimse import statuses
from dicomnode.listener import Listener
from dicomnode.pipeline import encode
from tests.conftest import free_port, memory_bytes
from tests.deflated import deflate_bomb, with_raw, with_syntax
from tests.factories import ct_series
from tests.integration.node_process import NodeProcess, listener_port, write_config

Sessions = sessionmaker[Session]
SYNTAXES = (ExplicitVRLittleEndian, JPEG2000Lossless, DeflatedExplicitVRLittleEndian)


@pytest.fixture
def raw_files(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make pynetdicom send a file's dataset bytes exactly as they are on disk."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


def send(port: int, what: Path | Dataset) -> int:
    """Send one C-STORE over a new association; return the status."""
    ae = AE(ae_title="TESTSCU")
    for syntax in SYNTAXES:  # one syntax per context: the acceptor picks one per context
        ae.add_requested_context(CTImageStorage, syntax)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(what).Status)
    finally:
        assoc.release()


def dataset_part(data: bytes) -> bytes:
    """The bytes after the file meta: what travels in the C-STORE."""
    assert data[128:132] == b"DICM" and data[132:136] == b"\x02\x00\x00\x00"
    return data[144 + int.from_bytes(data[140:144], "little") :]


def spooled(listener: Listener) -> list[Path]:
    return sorted((listener.ingestor.spool.root / "incoming").rglob("*.dcm"))


def rows(sessions: Sessions) -> int:
    with sessions() as s:
        return int(s.scalar(select(func.count()).select_from(Instance)) or 0)


def one_ct() -> Dataset:
    pixels = np.random.default_rng(0).integers(-1000, 1000, (1, 8, 8)).astype(np.float32)
    return ct_series(pixels)[0]


def with_raw_value(keyword: str, raw: bytes) -> bytes:
    """Return a CT file whose ``keyword`` element holds ``raw``, bytes no writer would emit."""
    tag = tag_for_keyword(keyword)
    assert tag is not None
    return with_raw(one_ct(), tag, dictionary_VR(keyword).encode(), raw)


# --- header values that do not fit the index -------------------------------------------

# keyword, the raw value (as a sender put it on the wire), where the index would hold it.
UNFIT = {
    "instance-number-over-2^31": ("InstanceNumber", b"3000000000", "instance_number"),
    "instance-number-under--2^31": ("InstanceNumber", b"-3000000000", "instance_number"),
    # pydicom's IS conversion overflows: refused as unreadable (0xC210) before.
    "instance-number-infinite": ("InstanceNumber", b"inf", "instance_number"),
    "images-in-acquisition-over-2^31": ("ImagesInAcquisition", b"3000000000", "expected"),
    "patient-id-with-nul": ("PatientID", b"SECRET\x00ID", "patient_id"),
    "accession-with-nul": ("AccessionNumber", b"SECRET\x00AC", "accession_number"),
    "modality-with-nul": ("Modality", b"C\x00T", "modality"),
}


# What the index holds for one_ct().
INDEX = {
    "instance_number": 1,
    "expected": None,
    "modality": "CT",
    "patient_id": "PID-TEST-0001",
    "accession_number": "ACC0001",
}


def index_of(sessions: Sessions) -> dict[str, object]:
    with sessions() as s:
        instance = s.scalars(select(Instance)).one()
        series = s.scalars(select(Series)).one()
        study = s.scalars(select(Study)).one()
        return {
            "instance_number": instance.instance_number,
            "expected": series.expected_instances,
            "modality": series.modality,
            "patient_id": study.patient_id,
            "accession_number": study.accession_number,
        }


@pytest.mark.parametrize(("keyword", "raw", "column"), UNFIT.values(), ids=UNFIT.keys())
def test_values_that_do_not_fit_the_index_are_stored_without_them(
    listener: Listener,
    sessions: Sessions,
    tmp_path: Path,
    raw_files: None,
    caplog: pytest.LogCaptureFixture,
    keyword: str,
    raw: bytes,
    column: str,
) -> None:
    data = with_raw_value(keyword, raw)
    path = tmp_path / "unfit.dcm"
    path.write_bytes(data)
    with caplog.at_level("INFO"):
        assert send(listener.port, path) == statuses.SUCCESS
    # The file exactly as it was sent; the index without the value.
    (stored,) = spooled(listener)
    assert dataset_part(stored.read_bytes()) == dataset_part(data)
    assert index_of(sessions) == INDEX | {column: None}
    # One line says which attribute was left out, and never its value.
    assert f"{keyword} " in caplog.text and "not indexed" in caplog.text
    for secret in (b"SECRET", b"3000000000"):
        assert secret not in raw or secret.decode() not in caplog.text


# --- pixel data encoded otherwise than its transfer syntax says --------------------------


def native_under_jpeg2000() -> bytes:
    return with_syntax(encode(one_ct()), JPEG2000Lossless)


def encapsulated_under_explicit() -> bytes:
    ds = one_ct()
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(60)])
    return with_syntax(encode(ds), ExplicitVRLittleEndian)


MISMATCHES = {
    "native-under-jpeg2000": native_under_jpeg2000,
    "encapsulated-under-explicit-vr": encapsulated_under_explicit,
}


@pytest.mark.parametrize("build", MISMATCHES.values(), ids=MISMATCHES.keys())
def test_pixel_data_contradicting_its_transfer_syntax_is_refused(
    listener: Listener, sessions: Sessions, tmp_path: Path, raw_files: None, build
) -> None:
    path = tmp_path / "mismatch.dcm"
    path.write_bytes(build())
    assert send(listener.port, path) == statuses.CANNOT_UNDERSTAND_UNREADABLE
    assert spooled(listener) == [] and rows(sessions) == 0
    # The listener goes on: the same image, encoded as it says, is stored.
    good = tmp_path / "good.dcm"
    good.write_bytes(encode(one_ct()))
    assert send(listener.port, good) == statuses.SUCCESS
    assert len(spooled(listener)) == 1 and rows(sessions) == 1


# --- database errors: permanent is not "out of resources" -------------------------------


REFUSE_INSERTS = {
    # SQLite's RAISE() would be a constraint error, which ingest takes for concurrent
    # stores colliding (0xA700); a blob beyond SQLite's maximum length is a DataError.
    # PostgreSQL's is a PL/pgSQL exception.
    "sqlite": [
        "CREATE TRIGGER refuse BEFORE INSERT ON instances BEGIN SELECT zeroblob(2000000000); END"
    ],
    "postgresql": [
        "CREATE FUNCTION refuse() RETURNS trigger AS $$ "
        "BEGIN RAISE EXCEPTION 'refused'; END $$ LANGUAGE plpgsql",
        "CREATE TRIGGER refuse BEFORE INSERT ON instances FOR EACH ROW EXECUTE FUNCTION refuse()",
    ],
}


def test_a_row_the_database_refuses_is_a_failure_not_out_of_resources(
    listener: Listener, sessions: Sessions, engine: Engine
) -> None:
    with engine.begin() as conn:
        for statement in REFUSE_INSERTS[engine.dialect.name]:
            conn.execute(text(statement))
    code = send(listener.port, one_ct())
    # 0xA7xx would have the sender retry the same instance for ever.
    assert code == statuses.PROCESSING_FAILURE, f"0x{code:04X}"
    assert spooled(listener) == [] and rows(sessions) == 0


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_value_postgresql_refuses_unforeseen_is_stored_without_the_index(
    listener: Listener, sessions: Sessions, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    # PostgreSQL only: SQLite raises no data exceptions for a value. A trigger stands in
    # for a value the header checks did not foresee (a database whose encoding cannot
    # hold a name).
    with engine.begin() as conn:
        conn.execute(
            text(
                "CREATE FUNCTION refuse_numbers() RETURNS trigger AS $$ BEGIN "
                "IF NEW.instance_number IS NOT NULL THEN "
                "RAISE EXCEPTION 'out of range' USING ERRCODE = 'numeric_value_out_of_range'; "
                "END IF; RETURN NEW; END $$ LANGUAGE plpgsql"
            )
        )
        conn.execute(
            text(
                "CREATE TRIGGER refuse_numbers BEFORE INSERT ON instances "
                "FOR EACH ROW EXECUTE FUNCTION refuse_numbers()"
            )
        )
    assert send(listener.port, one_ct()) == statuses.SUCCESS
    assert len(spooled(listener)) == 1
    index = index_of(sessions)
    assert index["instance_number"] is None and index["patient_id"] is None
    assert "index values refused by the database" in caplog.text


def test_no_free_connection_in_the_pool_is_out_of_resources(
    make_listener: Callable[..., Listener], engine: Engine, db_url: str
) -> None:
    # One connection, held by someone else: the store waits a second for it, then the
    # sender hears "out of resources" (retry later), not "processing failure".
    small = make_engine(db_url, pool_size=1, max_overflow=0, pool_timeout=1)
    try:
        sessions = session_factory(small)
        node = make_listener(sessions=sessions)
        with small.connect():
            code = send(node.port, one_ct())
            assert code == statuses.OUT_OF_RESOURCES, f"0x{code:04X}"
            assert spooled(node) == []
        assert send(node.port, one_ct()) == statuses.SUCCESS  # the retry is stored
        assert len(spooled(node)) == 1 and rows(sessions) == 1
        node.stop()  # while its engine is open: stopping writes the receipts
    finally:
        small.dispose()


# --- deflate bombs against a real listener process -------------------------------------

BOMB_MIB = 250  # each inflates to this, below the 256 MiB cap: valid, and stored
# Peak resident memory the four bombs may add to an idle listener: 11-12 MiB measured.
# Before the deflate checks streamed, four added 1.5 GB (SQLite) to 1.7 GB (PostgreSQL).
DEFLATE_BOMBS_RSS_BOUND = 64 * 2**20


def test_four_deflate_bombs_at_once_stay_within_the_memory_bound(
    tmp_path: Path, db_url: str, engine: Engine, raw_files: None
) -> None:
    bombs = []
    for i in range(4):
        path = tmp_path / f"bomb{i}.dcm"
        path.write_bytes(deflate_bomb(BOMB_MIB))
        bombs.append(path)
    assert all(path.stat().st_size < 2**20 for path in bombs)
    config = write_config(tmp_path, db_url=db_url, pacs_port=free_port())
    port = listener_port(config)
    answers: list[int] = []
    with NodeProcess(config, command="listen") as node:
        assert node.proc is not None
        pid = node.proc.pid
        # One ordinary store first, so what the first association allocates anyway
        # (pynetdicom's and the database driver's first use) is not counted.
        assert send(port, one_ct()) == statuses.SUCCESS
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # restart VmHWM from VmRSS
        before = memory_bytes(pid, "VmRSS")
        start = threading.Barrier(len(bombs))

        def bomb(path: Path) -> None:
            start.wait(timeout=60)
            answers.append(send(port, path))

        senders = [threading.Thread(target=bomb, args=(path,)) for path in bombs]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join(timeout=300)
        peak = memory_bytes(pid, "VmHWM")
    assert answers == [statuses.SUCCESS] * 4
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM instances")).scalar() == 5
    grown = peak - before
    assert grown < DEFLATE_BOMBS_RSS_BOUND, f"peak grew by {grown / 2**20:.0f} MiB"
