"""``dicomnode import`` and ``send``: bad input is one line and the right exit code; the
import's refusals, skips and limits, on a real SQLite database and spool."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    MediaStorageDirectoryStorage,
    generate_uid,
)
from sqlalchemy import select

from dicomnode.cli.main import main
from dicomnode.cli.subcommands import ae_title
from dicomnode.cli.transfer import parse_source
from dicomnode.db import Instance, Series, make_engine, migrate, session_factory, transaction
from dicomnode.db import jobs as queue
from dicomnode.pipeline import encode
from dicomnode.store import Ingestor, Spool
from tests.conftest import free_port
from tests.factories import ct_series, write_series

RT_STRUCT = UID("1.2.840.10008.5.1.4.1.1.481.3")  # not among the listener's SOP classes


def write_config(
    tmp_path: Path,
    db_url: str | None = None,
    *,
    destinations: dict[str, int] | None = None,
    storage: str = "",
    migrated: bool = True,
    timeout: float = 5,
) -> str:
    """Write a node configuration: its database, its spool, destinations name -> port."""
    db_url = db_url or f"sqlite:///{tmp_path / 'node.db'}"
    dests = destinations if destinations is not None else {"pacs": free_port()}
    text = f'[database]\nurl = "{db_url}"\n[storage]\npath = "{tmp_path / "spool"}"\n{storage}\n'
    text += "[completion]\nquiet_seconds = 0\n"
    for name, port in dests.items():
        text += (
            f'[[destinations]]\nname = "{name}"\nae_title = "{name.upper()}"\n'
            f'host = "127.0.0.1"\nport = {port}\ntimeout_seconds = {timeout}\n'
        )
    config = tmp_path / "node.toml"
    config.write_text(text)
    if migrated:
        engine = make_engine(db_url)
        migrate.upgrade(engine)
        engine.dispose()
    return str(config)


def run(capsys: pytest.CaptureFixture[str], config: str, *args: str) -> tuple[int, str, str]:
    code = main(["--log-level", "WARNING", "--config", config, *args])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def instances(tmp_path: Path) -> list[Instance]:
    engine = make_engine(f"sqlite:///{tmp_path / 'node.db'}")
    try:
        with session_factory(engine)() as s:
            rows = list(s.scalars(select(Instance).order_by(Instance.instance_number)))
            s.expunge_all()
            return rows
    finally:
        engine.dispose()


def small_series(folder: Path, slices: int = 3, size: int = 16) -> list[Path]:
    return write_series(ct_series(np.zeros((slices, size, size), np.float32)), folder)


def dicomdir(path: Path) -> Path:
    """A minimal DICOMDIR: a Part 10 file whose SOP class is Media Storage Directory."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MediaStorageDirectoryStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.FileSetID = "BACKUP"
    ds.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity = 0
    ds.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity = 0
    ds.FileSetConsistencyFlag = 0
    ds.DirectoryRecordSequence = []
    ds.save_as(path, enforce_file_format=True)
    return path


# --- argument checks --------------------------------------------------------------------


def test_ae_title_and_source_parsing() -> None:
    assert ae_title(" BACKFILL ") == "BACKFILL"
    for bad in ("", "   ", "A" * 17, "BACK\\FILL", "ÄRZTE", "TAB\tAE"):
        with pytest.raises(Exception, match="not an AE title"):
            ae_title(bad)
    assert parse_source("12") == 12
    assert parse_source("job:7") == 7
    assert parse_source("./12") == Path("12")
    assert parse_source("studies/ct") == Path("studies/ct")
    for bad in ("job:", "job:x", "job:-1"):
        with pytest.raises(ValueError, match="not a job id"):
            parse_source(bad)


@pytest.mark.system
def test_import_usage_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path)
    gone = tmp_path / "gone"
    code, out, err = run(capsys, config, "import", str(tmp_path), str(gone))
    assert code == 2 and out == ""
    assert one_line(err) == f"dicomnode: no such file or folder: {gone}"

    with pytest.raises(SystemExit) as info:
        main(["--config", config, "import", str(tmp_path), "--calling-ae", "WAY_TOO_LONG_AE_TITLE"])
    assert info.value.code == 2
    assert "not an AE title" in one_line(capsys.readouterr().err)
    with pytest.raises(SystemExit) as info:
        main(["--config", config, "import"])
    assert info.value.code == 2
    assert "the following arguments are required: PATH" in one_line(capsys.readouterr().err)


@pytest.mark.system
def test_import_needs_a_current_schema(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, migrated=False)
    small_series(tmp_path / "in")
    code, out, err = run(capsys, config, "import", str(tmp_path / "in"))
    assert code == 1 and out == ""
    assert "run `dicomnode db upgrade`" in one_line(err)


@pytest.mark.system
def test_send_usage_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)
    small_series(tmp_path / "in")
    code, out, err = run(capsys, config, "send", str(tmp_path / "in"), "nowhere")
    assert code == 2 and out == ""
    assert one_line(err) == (
        "dicomnode: configuration error: unknown destination 'nowhere' (known: pacs)"
    )
    code, out, err = run(capsys, config, "send", "job:x", "pacs")
    assert code == 2 and out == ""
    assert one_line(err) == "dicomnode: not a job id: 'job:x' (job:ID, ID a number)"
    gone = tmp_path / "gone"
    code, out, err = run(capsys, config, "send", str(gone), "pacs")
    assert code == 2 and out == ""
    assert one_line(err) == f"dicomnode: no such file or folder: {gone}"
    with pytest.raises(SystemExit) as info:
        main(["--config", config, "send", str(tmp_path / "in")])
    assert info.value.code == 2
    assert "required: DESTINATION_NAME" in one_line(capsys.readouterr().err)


@pytest.mark.system
def test_send_an_unknown_job_or_one_without_outputs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path)
    for source in ("42", "job:42"):
        code, out, err = run(capsys, config, "send", source, "pacs")
        assert code == 1 and out == ""
        assert one_line(err) == "dicomnode: no job with id 42"

    # A queued job (real ingest and queue code) has no outputs yet.
    engine = make_engine(f"sqlite:///{tmp_path / 'node.db'}")
    sessions = session_factory(engine)
    for ds in ct_series(np.zeros((2, 4, 4), np.float32)):
        Ingestor(Spool(tmp_path / "spool"), sessions).store(encode(ds))
    with transaction(sessions) as s:
        series = s.scalars(select(Series)).one()
        job = queue.enqueue(s, series, route="r", model="m", version="1", max_attempts=1)
        assert job is not None
        job_id = job.id
    engine.dispose()
    code, out, err = run(capsys, config, "send", f"job:{job_id}", "pacs")
    assert code == 1 and out == ""
    assert one_line(err) == f"dicomnode: job {job_id} (queued) has no stored outputs to send"


@pytest.mark.system
def test_send_needs_a_current_schema_for_a_job(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, migrated=False)
    code, _, err = run(capsys, config, "send", "1", "pacs")
    assert code == 1 and "run `dicomnode db upgrade`" in one_line(err)


# --- import: what is taken, refused and skipped ------------------------------------------


@pytest.mark.system
def test_non_dicom_files_and_a_dicomdir_are_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path)
    folder = tmp_path / "cd"
    (folder / "docs").mkdir(parents=True)
    (folder / "README.TXT").write_text("Patient CD viewer")
    (folder / "docs" / "empty").write_bytes(b"")
    (folder / "docs" / "short.dcm").write_bytes(b"\0" * 64)
    dicomdir(folder / "DICOMDIR")
    small_series(folder / "IMAGES")
    code, out, err = run(capsys, config, "import", str(folder))
    assert code == 0, out + err
    lines = out.splitlines()
    assert lines[0] == (
        "imported 3 instance(s) in 1 series of 1 study(ies) (0 duplicate(s)), 0 refused, 4 skipped"
    )
    assert sorted(lines[1:]) == [
        "skipped  DICOMDIR: a DICOMDIR (Media Storage Directory), not an instance",
        "skipped  README.TXT: not a DICOM file (no DICM prefix)",
        "skipped  docs/empty: not a DICOM file (no DICM prefix)",
        "skipped  docs/short.dcm: not a DICOM file (no DICM prefix)",
    ]
    assert err == ""
    assert [i.calling_ae for i in instances(tmp_path)] == ["IMPORT"] * 3


@pytest.mark.system
def test_classes_and_syntaxes_the_listener_refuses_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path)
    folder = tmp_path / "in"
    rt, big, good = ct_series(np.zeros((3, 8, 8), np.float32))
    rt.SOPClassUID = rt.file_meta.MediaStorageSOPClassUID = RT_STRUCT
    big.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    write_series([rt, big, good], folder)
    code, out, err = run(capsys, config, "import", str(folder), "--json", "--calling-ae", "OLDPACS")
    assert code == 1 and err == ""
    report = json.loads(out)
    assert (report["imported"], report["refused"], report["skipped"]) == (1, 2, 0)
    assert report["problems"] == [
        {
            "file": "0000.dcm",
            "outcome": "refused",
            "reason": f"SOP class {RT_STRUCT} (RT Structure Set Storage) is not accepted by the "
            "node",
        },
        {
            "file": "0001.dcm",
            "outcome": "refused",
            "reason": "transfer syntax 1.2.840.10008.1.2.2 (Explicit VR Big Endian) is not "
            "accepted by the node",
        },
    ]
    [row] = instances(tmp_path)
    assert row.sop_instance_uid == good.SOPInstanceUID and row.calling_ae == "OLDPACS"
    assert list((tmp_path / "spool" / "tmp").iterdir()) == []  # no copy left behind


@pytest.mark.system
def test_too_large_is_refused_and_the_import_goes_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, storage="max_instance_mb = 1")
    big = ct_series(np.zeros((1, 1024, 1024), np.float32))  # 2 MiB of pixels
    write_series(big, tmp_path / "in" / "big")
    small_series(tmp_path / "in" / "small", slices=2)
    code, out, err = run(capsys, config, "import", str(tmp_path / "in"))
    assert code == 1 and err == ""
    assert out.splitlines() == [
        "imported 2 instance(s) in 1 series of 1 study(ies) (0 duplicate(s)), 1 refused, 0 skipped",
        "refused  big/0000.dcm: instance of 2 MiB exceeds storage.max_instance_mb",
    ]
    assert len(instances(tmp_path)) == 2


@pytest.mark.system
def test_storage_low_stops_the_import_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, storage=f"min_free_mb = {2**40}")
    small_series(tmp_path / "in")
    code, out, err = run(capsys, config, "import", str(tmp_path / "in"))
    assert code == 1
    assert out.startswith("imported 0 instance(s) in 0 series of 0 study(ies)")
    assert one_line(err) == (
        "dicomnode: import stopped: storage is below its free-space watermark "
        "(what was imported stays)"
    )
    code, out, err = run(capsys, config, "import", str(tmp_path / "in"), "--json")
    assert code == 1 and json.loads(out)["stopped"] == "storage is below its free-space watermark"
    assert "import stopped" in one_line(err)
    assert instances(tmp_path) == []


@pytest.mark.system
def test_problem_lines_are_capped_at_20(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)
    folder = tmp_path / "notes"
    folder.mkdir()
    for i in range(25):
        (folder / f"note{i:02d}.txt").write_text("x")
    code, out, _ = run(capsys, config, "import", str(folder))
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 1 + 20 + 1
    assert lines[-1] == "... and 5 more (--json lists them all)"
    code, out, _ = run(capsys, config, "import", str(folder), "--json")
    assert len(json.loads(out)["problems"]) == 25


@pytest.mark.system
def test_progress_bar(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)
    small_series(tmp_path / "in", slices=4)
    code, out, err = run(capsys, config, "import", str(tmp_path / "in"), "--progress")
    assert code == 0 and out.startswith("imported 4 instance(s)")
    assert "[4/4] #################### 100%" in err and err.endswith("\n")
    code, out, err = run(capsys, config, "import", str(tmp_path / "in"), "--no-progress")
    assert code == 0 and "(4 duplicate(s))" in out and err == ""
    code, out, err = run(capsys, config, "import", str(tmp_path / "in"), "--json")
    assert code == 0 and json.loads(out)["duplicates"] == 4 and err == ""  # not a terminal


@pytest.mark.system
def test_the_spool_itself_is_not_imported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path)
    small_series(tmp_path / "in", slices=2)
    code, out, _ = run(capsys, config, "import", str(tmp_path / "in"))
    assert code == 0 and out.startswith("imported 2 instance(s)")
    incoming = tmp_path / "spool" / "incoming"
    code, out, err = run(capsys, config, "import", str(incoming))
    assert code == 2 and out == ""
    assert one_line(err) == (
        f"dicomnode: {incoming} is inside the node's storage path: nothing to import"
    )
    # A folder holding the spool: the spool's files are left out, the rest are duplicates.
    code, out, _ = run(capsys, config, "import", str(tmp_path), "--json")
    report = json.loads(out)
    assert code == 0 and (report["imported"], report["duplicates"]) == (2, 2)
    assert {p["file"] for p in report["problems"]} >= {"node.db", "node.toml"}  # skipped
    assert not any(p["file"].startswith("spool/") for p in report["problems"])
    assert len(instances(tmp_path)) == 2
