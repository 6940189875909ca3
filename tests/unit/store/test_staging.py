"""Import staging without the CLI: which files are found, what is taken, what the trail says.

The command's output and exit codes are tested in tests/unit/cli/test_transfer.py, and
an import the completion sweep completes in tests/integration/test_cli_transfer.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from sqlalchemy import select

from dicomnode.config import Settings, parse_settings
from dicomnode.db import Instance, session_factory
from dicomnode.db.models import AuditEvent
from dicomnode.dimse import ACCEPTED_SOP_CLASSES, ACCEPTED_TRANSFER_SYNTAXES
from dicomnode.store import (
    Accepted,
    SourceFile,
    find_files,
    import_files,
    uid_name,
)
from tests.factories import ct_series, write_series

LISTENER = Accepted(ACCEPTED_SOP_CLASSES, ACCEPTED_TRANSFER_SYNTAXES)


class Steps:
    """A progress sink that writes down what it was told."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def start(self, total: int) -> None:
        self.calls.append(f"start {total}")

    def advance(self) -> None:
        self.calls.append("advance")

    def stop(self) -> None:
        self.calls.append("stop")


def settings_for(tmp_path: Path, db_url: str, **storage: object) -> Settings:
    return parse_settings(
        {"database": {"url": db_url}, "storage": {"path": str(tmp_path / "spool"), **storage}}
    )


def test_find_files_walks_folders_in_order_and_leaves_out_the_spool(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    for name in ("b/2.dcm", "a/1.dcm", "c.dcm", "spool/incoming/x.dcm"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"x")
    single = tmp_path / "single.dcm"
    single.write_bytes(b"x")

    found = find_files([folder, single], exclude=folder / "spool")
    assert [f.name for f in found] == ["a/1.dcm", "b/2.dcm", "c.dcm", "single.dcm"]
    assert found[-1] == SourceFile(single, "single.dcm")
    assert "spool/incoming/x.dcm" in [f.name for f in find_files([folder])]


def test_uid_names() -> None:
    assert uid_name(ExplicitVRLittleEndian) == "1.2.840.10008.1.2.1 (Explicit VR Little Endian)"
    assert uid_name("1.2.3.4") == "1.2.3.4"


def test_the_dicm_prefix_and_a_file_that_cannot_be_read(
    tmp_path: Path, engine: object, db_url: str
) -> None:
    [path] = write_series(ct_series(np.zeros((1, 4, 4), np.float32)), tmp_path / "in")
    short = tmp_path / "short"
    short.write_bytes(b"\0" * 128 + b"DIC")  # one byte short of the prefix
    gone = tmp_path / "gone"

    report = import_files(
        settings_for(tmp_path, db_url), [path, short, gone], "IMPORT", LISTENER, Steps()
    )

    assert report.imported == 1
    assert report.problems == [
        {"file": "short", "outcome": "skipped", "reason": "not a DICOM file (no DICM prefix)"},
        {"file": "gone", "outcome": "refused", "reason": "cannot be read (ENOENT)"},
    ]


def test_import_files_takes_what_is_accepted_and_records_each_series(
    tmp_path: Path, engine: object, db_url: str
) -> None:
    folder = tmp_path / "in"
    implicit, good = ct_series(np.zeros((2, 8, 8), np.float32))
    implicit.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    write_series([implicit, good], folder)
    (folder / "notes.txt").write_text("not DICOM")
    steps = Steps()
    # The lists are the caller's: narrower than the listener's, the import takes less.
    only_explicit = Accepted({CTImageStorage}, {ExplicitVRLittleEndian})

    report = import_files(settings_for(tmp_path, db_url), [folder], "OLDPACS", only_explicit, steps)

    assert report.summary() == (
        "imported 1 instance(s) in 1 series of 1 study(ies) (0 duplicate(s)), 1 refused, 1 skipped"
    )
    assert report.problems == [
        {
            "file": "0000.dcm",
            "outcome": "refused",
            "reason": "transfer syntax 1.2.840.10008.1.2 (Implicit VR Little Endian) is not "
            "accepted by the node",
        },
        {"file": "notes.txt", "outcome": "skipped", "reason": "not a DICOM file (no DICM prefix)"},
    ]
    assert report.stopped is None
    assert steps.calls == ["start 3", "advance", "advance", "advance", "stop"]
    with session_factory(engine)() as s:  # type: ignore[arg-type]
        [row] = s.scalars(select(Instance)).all()
        assert (row.sop_instance_uid, row.calling_ae) == (good.SOPInstanceUID, "OLDPACS")
        [event] = s.scalars(select(AuditEvent).where(AuditEvent.event == "instances-imported"))
        assert (event.series_uid, event.count) == (good.SeriesInstanceUID, 1)
        assert event.size_bytes == (folder / "0001.dcm").stat().st_size
        assert event.detail == "dicomnode import as calling AE OLDPACS"
    assert list((tmp_path / "spool" / "tmp").iterdir()) == []  # no copy left behind

    # Again: the same instance is a duplicate, and the trail says so.
    again = import_files(settings_for(tmp_path, db_url), [folder], "OLDPACS", LISTENER, Steps())
    assert (again.imported, again.duplicates, again.count("refused")) == (2, 1, 0)
    with session_factory(engine)() as s:  # type: ignore[arg-type]
        details = s.scalars(
            select(AuditEvent.detail)
            .where(AuditEvent.event == "instances-imported")
            .order_by(AuditEvent.id)
        ).all()
    assert details[-1] == "dicomnode import as calling AE OLDPACS; 1 identical to what was stored"


def test_storage_low_stops_the_import_and_ends_the_progress(
    tmp_path: Path, engine: object, db_url: str
) -> None:
    write_series(ct_series(np.zeros((2, 8, 8), np.float32)), tmp_path / "in")
    steps = Steps()
    settings = settings_for(tmp_path, db_url, min_free_mb=2**40)

    report = import_files(settings, [tmp_path / "in"], "IMPORT", LISTENER, steps)

    assert report.stopped == "storage is below its free-space watermark"
    assert (report.imported, report.problems) == (0, [])
    assert steps.calls == ["start 2", "stop"]
