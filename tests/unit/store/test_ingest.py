from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from sqlalchemy import select, text

from dicomnode.db import Instance, Series, SeriesState, Study
from dicomnode.errors import (
    InstanceTooLarge,
    InvalidUID,
    MissingAttribute,
    RecordRefused,
    SOPClassMismatch,
    UIDMismatch,
    UnreadableInstance,
)
from dicomnode.pipeline import encode
from dicomnode.store import Ingestor, Spool
from tests.deflated import deflate_bomb
from tests.factories import ct_series


@pytest.fixture
def series() -> list[Dataset]:
    return ct_series(np.zeros((3, 8, 8), np.float32))


@pytest.fixture
def ingestor(tmp_path: Path, sessions) -> Ingestor:
    return Ingestor(Spool(tmp_path / "spool"), sessions)


def files(ingestor: Ingestor) -> list[Path]:
    return sorted((ingestor.spool.root / "incoming").rglob("*.dcm"))


def test_store_writes_file_and_rows(ingestor: Ingestor, series: list[Dataset], sessions) -> None:
    for ds in series:
        data = encode(ds)
        out = ingestor.store(data, calling_ae="MODALITY", sop_instance_uid=ds.SOPInstanceUID)
        assert ingestor.spool.absolute(out.path).read_bytes() == data
    with sessions() as s:
        assert s.scalar(select(Study.patient_id)) == "PID-TEST-0001"
        ser = s.scalars(select(Series)).one()
        assert ser.instance_count == 3 and ser.state == SeriesState.RECEIVING
        assert ser.modality == "CT"
        rows = s.scalars(select(Instance)).all()
        assert {r.sop_instance_uid for r in rows} == {d.SOPInstanceUID for d in series}
        assert all(r.calling_ae == "MODALITY" and len(r.sha256) == 64 for r in rows)


def test_identical_resend_is_idempotent(
    ingestor: Ingestor, series: list[Dataset], sessions
) -> None:
    data = encode(series[0])
    ingestor.store(data)
    again = ingestor.store(data)
    assert again.duplicate
    with sessions() as s:
        assert s.scalar(select(Series.instance_count)) == 1
        assert len(s.scalars(select(Instance)).all()) == 1


def test_different_object_under_same_uid_replaces_and_reopens(
    ingestor: Ingestor,
    series: list[Dataset],
    sessions,
) -> None:
    ingestor.store(encode(series[0]))
    with sessions() as s, s.begin():
        s.scalars(select(Series)).one().state = SeriesState.COMPLETE
    series[0].InstanceNumber = 99  # a corrected resend
    out = ingestor.store(encode(series[0]))
    assert out.replaced and not out.duplicate
    with sessions() as s:
        ser = s.scalars(select(Series)).one()
        assert ser.instance_count == 1
        assert ser.state == SeriesState.RECEIVING and ser.generation == 1
        assert s.scalar(select(Instance.instance_number)) == 99
    assert len(files(ingestor)) == 1


def test_a_late_image_announcing_another_count_still_reopens(
    ingestor: Ingestor, series: list[Dataset], sessions
) -> None:
    series[0].ImagesInAcquisition = len(series)
    ingestor.store(encode(series[0]))
    with sessions() as s, s.begin():
        s.scalars(select(Series)).one().state = SeriesState.COMPLETE
    series[1].ImagesInAcquisition = len(series) + 5  # disagrees with the first
    ingestor.store(encode(series[1]))
    with sessions() as s:
        ser = s.scalars(select(Series)).one()
        assert ser.state == SeriesState.RECEIVING and ser.generation == 1
        assert ser.expected_instances == -1 and ser.instance_count == 2


@pytest.mark.parametrize(
    ("mutate", "error", "message"),
    [
        (
            lambda ds: delattr(ds, "StudyInstanceUID"),
            MissingAttribute,
            "StudyInstanceUID is missing",
        ),
        (lambda ds: delattr(ds, "SeriesInstanceUID"), MissingAttribute, "SeriesInstanceUID"),
        (
            lambda ds: setattr(ds, "SeriesInstanceUID", "../../../etc"),
            InvalidUID,
            "SeriesInstanceUID",
        ),
        (lambda ds: setattr(ds, "StudyInstanceUID", "1.2/3"), InvalidUID, "StudyInstanceUID"),
        (lambda ds: setattr(ds, "StudyInstanceUID", "1." + "2" * 70), InvalidUID, "longer than 64"),
    ],
)
def test_bad_identifiers_are_refused_without_writing(
    ingestor: Ingestor,
    series: list[Dataset],
    sessions,
    mutate,
    error,
    message,
) -> None:
    ds = series[0]
    mutate(ds)
    with pytest.raises(error, match=message):
        ingestor.store(encode(ds))
    assert files(ingestor) == []
    with sessions() as s:
        assert s.scalars(select(Instance)).all() == []


def test_request_mismatches(ingestor: Ingestor, series: list[Dataset]) -> None:
    data = encode(series[0])
    with pytest.raises(UIDMismatch):
        ingestor.store(data, sop_instance_uid="1.2.3")
    with pytest.raises(SOPClassMismatch):
        ingestor.store(data, sop_class_uid="1.2.840.10008.5.1.4.1.1.4")
    assert files(ingestor) == []


@pytest.mark.parametrize(
    "data",
    [b"", b"not dicom at all" * 10, b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff"],
)
def test_garbage_is_unreadable(ingestor: Ingestor, data: bytes) -> None:
    with pytest.raises((UnreadableInstance, MissingAttribute)):
        ingestor.store(data)
    assert files(ingestor) == []


def test_truncated_instance_is_refused(ingestor: Ingestor, series: list[Dataset]) -> None:
    data = encode(series[0])
    with pytest.raises((UnreadableInstance, MissingAttribute)):
        ingestor.store(data[:300])
    assert files(ingestor) == []


# SQLite's RAISE() in a trigger is a constraint error, which ingest takes for concurrent
# stores colliding ("retry later"); a blob beyond SQLite's maximum length is a DataError,
# a refusal for good like PostgreSQL's RAISE EXCEPTION.
FAIL_INSERTS = {
    "sqlite": [
        "CREATE TRIGGER fail_insert BEFORE INSERT ON instances "
        "BEGIN SELECT zeroblob(2000000000); END"
    ],
    "postgresql": [
        "CREATE FUNCTION fail_insert() RETURNS trigger AS $$ "
        "BEGIN RAISE EXCEPTION 'injected failure'; END $$ LANGUAGE plpgsql",
        "CREATE TRIGGER fail_insert BEFORE INSERT ON instances "
        "FOR EACH ROW EXECUTE FUNCTION fail_insert()",
    ],
}


def test_database_failure_after_the_write_removes_the_file(
    ingestor: Ingestor,
    series: list[Dataset],
    engine,
    sessions,
) -> None:
    # A real failure inside the database, after the file is already on disk.
    with engine.begin() as conn:
        for statement in FAIL_INSERTS[engine.dialect.name]:
            conn.execute(text(statement))
    # A trigger's refusal is not a resource problem: retrying cannot help.
    with pytest.raises(RecordRefused, match="database refused the instance's row"):
        ingestor.store(encode(series[0]))
    assert files(ingestor) == []
    assert list((ingestor.spool.root / "tmp").iterdir()) == []
    with sessions() as s:
        assert s.scalars(select(Series)).all() == []  # the whole transaction rolled back


def test_empty_sop_class_in_dataset_falls_back_to_the_negotiated_one(
    ingestor: Ingestor, series: list[Dataset], sessions
) -> None:
    # Real exports (e.g. the abdomen-ct-j2k test files) carry the SOP class only in file meta.
    ds = series[0]
    ds.SOPClassUID = ""
    data = encode(ds)
    with pytest.raises(MissingAttribute, match="SOPClassUID"):
        ingestor.store(data)
    ingestor.store(data, sop_class_uid="1.2.840.10008.5.1.4.1.1.2")
    with sessions() as s:
        assert s.scalar(select(Instance.sop_class_uid)) == "1.2.840.10008.5.1.4.1.1.2"


def test_encapsulated_pixel_data_without_its_end_is_refused(
    ingestor: Ingestor, data_dir: Path, tmp_path: Path
) -> None:
    from tests.factories import repaired_j2k_series

    path = repaired_j2k_series(data_dir / "ct/abdomen-ct-j2k", tmp_path / "j2k", limit=1)[0]
    data = path.read_bytes()
    ingestor.store(data)  # whole: fine
    with pytest.raises(UnreadableInstance, match="no end"):
        ingestor.store(data[:-2000])


def test_resend_whose_file_went_missing_is_written_again(
    ingestor: Ingestor, series: list[Dataset], sessions
) -> None:
    data = encode(series[0])
    first = ingestor.store(data)
    ingestor.spool.absolute(first.path).unlink()
    again = ingestor.store(data)
    assert again.duplicate  # the same content as the row says, and now its file is back
    assert ingestor.spool.absolute(again.path).read_bytes() == data
    assert len(files(ingestor)) == 1
    with sessions() as s:
        assert s.scalars(select(Instance.path)).all() == [again.path]


FAIL_UPDATES = {  # see FAIL_INSERTS
    "sqlite": [
        "CREATE TRIGGER fail_update BEFORE UPDATE ON instances "
        "BEGIN SELECT zeroblob(2000000000); END"
    ],
    "postgresql": [
        "CREATE FUNCTION fail_update() RETURNS trigger AS $$ "
        "BEGIN RAISE EXCEPTION 'injected failure'; END $$ LANGUAGE plpgsql",
        "CREATE TRIGGER fail_update BEFORE UPDATE ON instances "
        "FOR EACH ROW EXECUTE FUNCTION fail_update()",
    ],
}


def test_failed_replacement_keeps_the_acknowledged_copy(
    ingestor: Ingestor, series: list[Dataset], engine, sessions
) -> None:
    original = encode(series[0])
    stored = ingestor.store(original)
    with engine.begin() as conn:
        for statement in FAIL_UPDATES[engine.dialect.name]:
            conn.execute(text(statement))
    series[0].InstanceNumber = 42
    with pytest.raises(RecordRefused):
        ingestor.store(encode(series[0]))
    # The acknowledged object is untouched, on disk and in the database.
    assert files(ingestor) == [ingestor.spool.absolute(stored.path)]
    assert ingestor.spool.absolute(stored.path).read_bytes() == original
    with sessions() as s:
        assert s.scalar(select(Instance.instance_number)) == 1


def test_over_long_identifiers_are_clipped_not_refused(
    ingestor: Ingestor, series: list[Dataset], sessions
) -> None:
    # Non-conformant but real: PostgreSQL would refuse the row, and the sender would
    # retry for ever.
    ds = series[0]
    ds.AccessionNumber = "A" * 30
    ds.PatientID = "P" * 80
    ingestor.store(encode(ds))
    with sessions() as s:
        study = s.scalars(select(Study)).one()
        assert study.accession_number == "A" * 16 and study.patient_id == "P" * 64


def test_deflate_bomb_is_refused_without_inflating_it(ingestor: Ingestor, sessions) -> None:
    # 300 MiB of zero pixels deflate to about 300 KiB; pydicom would inflate them all.
    bomb = deflate_bomb(300)
    assert len(bomb) < 2 * 2**20
    with pytest.raises(InstanceTooLarge, match="inflates beyond"):
        ingestor.store(bomb)
    assert files(ingestor) == []
