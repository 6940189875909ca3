"""Sending by hand without the CLI: planning, association groups, a job's outputs, the trail.

C-STORE to real peers (statuses, a lost association, Orthanc) is tested through the
command in tests/integration/test_cli_transfer.py; its output and exit codes in
tests/unit/cli/test_transfer.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select

from dicomnode.config import Destination
from dicomnode.db import Job, JobState, Output, audit, migrate, transaction
from dicomnode.db.models import AuditEvent
from dicomnode.errors import DicomnodeError, TransientJobError
from dicomnode.send import planning, send_source
from dicomnode.send.planning import (
    MAX_CONTEXTS,
    PlannedFile,
    SendReport,
    _groups,
    job_outputs,
    plan,
)
from dicomnode.store import SourceFile
from tests.factories import add_series, ct_series, write_series
from tests.unit.cli.test_transfer import dicomdir
from tests.unit.store.test_staging import Steps, settings_for

PACS = Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=104)


def part10(path: Path, meta: dict[str, str], **elements: str) -> Path:
    """A file with the DICM prefix and only the file meta and elements given."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    for keyword, value in meta.items():
        setattr(ds.file_meta, keyword, value)
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    ds.preamble = b"\0" * 128
    pydicom.dcmwrite(path, ds, implicit_vr=False, little_endian=True)
    return path


def test_plan_reads_each_header_and_records_what_cannot_be_sent(tmp_path: Path) -> None:
    [ct] = write_series(ct_series(np.zeros((1, 4, 4), np.float32)), tmp_path / "in")
    notes = tmp_path / "notes.txt"
    notes.write_text("x")
    short = tmp_path / "short"
    short.write_bytes(b"\0" * 128 + b"DIC")
    uid = generate_uid()
    no_syntax = {"MediaStorageSOPClassUID": CTImageStorage, "MediaStorageSOPInstanceUID": uid}
    no_class = {"TransferSyntaxUID": ExplicitVRLittleEndian, "MediaStorageSOPInstanceUID": uid}
    files = [
        SourceFile(tmp_path / "gone.dcm", "gone.dcm"),
        SourceFile(notes, "notes.txt"),
        SourceFile(dicomdir(tmp_path / "DICOMDIR"), "DICOMDIR"),
        SourceFile(ct, "0000.dcm"),
        SourceFile(short, "short"),
        SourceFile(part10(tmp_path / "a.dcm", no_syntax, SOPInstanceUID=uid), "a.dcm"),
        SourceFile(part10(tmp_path / "b.dcm", no_class, SOPInstanceUID=uid), "b.dcm"),
    ]
    report = SendReport(PACS)

    [planned] = plan(files, report)

    assert (planned.index, planned.source.name) == (3, "0000.dcm")
    assert planned.transfer_syntax_uid == ExplicitVRLittleEndian
    assert [(r["file"], r["outcome"], r["reason"]) for r in report.objects] == [
        ("gone.dcm", "failed", "file not found"),
        ("notes.txt", "skipped", "not a DICOM file (no DICM prefix)"),
        ("DICOMDIR", "skipped", "a DICOMDIR (Media Storage Directory), not an instance"),
        ("short", "skipped", "not a DICOM file (no DICM prefix)"),
        ("a.dcm", "failed", "TransferSyntaxUID is missing"),
        ("b.dcm", "failed", "SOPClassUID is missing"),
    ]


def test_no_association_proposes_more_than_128_contexts(tmp_path: Path) -> None:
    source = SourceFile(tmp_path / "x", "x")
    planned = [
        PlannedFile(i, source, f"1.2.3.{i % (MAX_CONTEXTS + 2)}", ExplicitVRLittleEndian, None)
        for i in range(300)
    ]
    groups = list(_groups(planned))
    assert [len({p.sop_class_uid for p in g}) for g in groups] == [MAX_CONTEXTS, 2]
    assert sorted(p.index for g in groups for p in g) == list(range(300))


def test_a_jobs_outputs_are_its_files_in_the_spool(tmp_path: Path, sessions: Any) -> None:
    with transaction(sessions) as s:
        series = add_series(s)
        ids = []
        for n in (0, 1):
            job = Job(
                series_id=series.id, route="r", model="m", model_version="1",
                idempotency_key=f"k{n}", state=JobState.DONE if n else JobState.QUEUED,
                attempts=1,
            )  # fmt: skip
            s.add(job)
            s.flush()
            ids.append(job.id)
        for uid in ("1.2.3.9.2", "1.2.3.9.1"):
            s.add(
                Output(job_id=ids[1], kind="seg", sop_class_uid="1.2", sop_instance_uid=uid,
                       series_uid="1.2.3.9", path=f"results/{uid}.dcm", size_bytes=1)
            )  # fmt: skip

    root = tmp_path / "spool"
    assert job_outputs(sessions, root, ids[1]) == [
        SourceFile(tmp_path / "spool" / "results/1.2.3.9.2.dcm", "results/1.2.3.9.2.dcm"),
        SourceFile(tmp_path / "spool" / "results/1.2.3.9.1.dcm", "results/1.2.3.9.1.dcm"),
    ]
    with pytest.raises(DicomnodeError, match=r"\(queued\) has no stored outputs to send"):
        job_outputs(sessions, root, ids[0])
    with pytest.raises(LookupError, match="no job with id 999"):
        job_outputs(sessions, root, 999)


def test_an_unreachable_destination_is_recorded_and_raised(
    tmp_path: Path, sessions: Any, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_series(ct_series(np.zeros((2, 4, 4), np.float32)), tmp_path / "in")

    def unreachable(*args: object) -> None:
        raise TransientJobError("destination pacs: cannot connect to 127.0.0.1:104\nmore")

    monkeypatch.setattr(planning, "send_planned", unreachable)
    steps, warnings = Steps(), []
    with pytest.raises(TransientJobError):
        send_source(settings_for(tmp_path, db_url), tmp_path / "in", PACS, steps, warnings.append)
    assert steps.calls == ["start 2", "stop"] and warnings == []
    with sessions() as s:
        [event] = s.scalars(select(AuditEvent).where(AuditEvent.event == "results-resent"))
        assert (event.outcome, event.count, event.job_id) == ("failure", 0, None)
        assert event.peer == "PACS@127.0.0.1:104" and event.destination == "pacs"
        assert event.detail == (
            "dicomnode send: 0 stored, 0 not; destination pacs: cannot connect to 127.0.0.1:104"
        )


def stored(destination: Destination, planned: list[PlannedFile], *args: Any) -> None:
    """Stands in for :func:`send_planned`: the destination stores every file."""
    report: SendReport = args[1]
    for item in planned:
        report.set(item.index, item.source, "stored", status=0)


def test_a_jobs_send_opens_the_database_once_and_records_the_job(
    tmp_path: Path, sessions: Any, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    datasets = ct_series(np.zeros((2, 4, 4), np.float32))
    paths = write_series(datasets, tmp_path / "spool" / "results")
    with transaction(sessions) as s:
        series = add_series(s)
        job = Job(
            series_id=series.id, route="r", model="m", model_version="1",
            idempotency_key="k", state=JobState.DONE, attempts=1,
        )  # fmt: skip
        s.add(job)
        s.flush()
        for ds, path in zip(datasets, paths, strict=True):
            s.add(
                Output(job_id=job.id, kind="seg", sop_class_uid=ds.SOPClassUID,
                       sop_instance_uid=ds.SOPInstanceUID, series_uid=ds.SeriesInstanceUID,
                       path=f"results/{path.name}", size_bytes=path.stat().st_size)
            )  # fmt: skip
        job_id = job.id
    opened: list[str] = []
    open_current = migrate.open_current

    def counted(url: str) -> Any:
        opened.append(url)
        return open_current(url)

    monkeypatch.setattr(migrate, "open_current", counted)
    monkeypatch.setattr(planning, "send_planned", stored)
    warnings: list[str] = []

    report = send_source(settings_for(tmp_path, db_url), job_id, PACS, Steps(), warnings.append)

    assert [o["file"] for o in report.objects] == ["results/0000.dcm", "results/0001.dcm"]
    assert report.record()["sent"] == 2 and warnings == []
    assert opened == [db_url]  # the job's outputs and the trail, through one engine
    with sessions() as s:
        [event] = s.scalars(select(AuditEvent).where(AuditEvent.event == "results-resent"))
        assert (event.outcome, event.count, event.job_id) == ("success", 2, job_id)
        assert event.detail == "dicomnode send: 2 stored, 0 not"


def test_a_send_the_trail_cannot_record_only_warns(
    tmp_path: Path, engine: object, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_series(ct_series(np.zeros((2, 4, 4), np.float32)), tmp_path / "in")

    def refused(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the trail is away")

    monkeypatch.setattr(planning, "send_planned", stored)
    monkeypatch.setattr(audit, "record", refused)
    warnings: list[str] = []
    report = send_source(
        settings_for(tmp_path, db_url), tmp_path / "in", PACS, Steps(), warnings.append
    )
    assert report.record()["sent"] == 2 and report.error is None
    assert warnings == ["the send was not recorded in the audit trail: RuntimeError"]
