"""``dicomnode import`` into real databases and spools, then the completion sweep; and
``dicomnode send`` of folders and of a real job's outputs to a real Orthanc and to
staged storage SCPs (statuses, a closed port, a lost association). All on 127.0.0.1."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import torch
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from sqlalchemy import select

from dicomnode.config import load_settings
from dicomnode.db import (
    Delivery,
    Instance,
    Job,
    JobState,
    Output,
    Series,
    SeriesState,
    audit,
    make_engine,
    session_factory,
)
from dicomnode.imaging import load_registry
from dicomnode.inference import ModelCache
from dicomnode.pipeline import Pipeline
from dicomnode.queue import Worker
from dicomnode.queue.completion import sweep
from dicomnode.store import Spool
from tests.conftest import free_port
from tests.factories import ct_series, lung_phantom, write_series
from tests.integration.counting_scp import CountingSCP
from tests.integration.orthanc import Orthanc
from tests.integration.test_pipeline import make_settings, receive_phantom
from tests.unit.cli.test_transfer import one_line, run, write_config


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    with Orthanc(tmp_path_factory.mktemp("orthanc")) as pacs:
        yield pacs


def orthanc_uids(pacs: Orthanc) -> set[str]:
    """The SOP Instance UIDs Orthanc holds, read over its REST API."""
    return {i["MainDicomTags"]["SOPInstanceUID"] for i in pacs.get("/instances?expand")}


def rows(db_url: str) -> tuple[list[Instance], list[Series]]:
    engine = make_engine(db_url)
    try:
        with session_factory(engine)() as s:
            found = list(s.scalars(select(Instance).order_by(Instance.instance_number)))
            series = list(s.scalars(select(Series)))
            s.expunge_all()
            return found, series
    finally:
        engine.dispose()


def spool_files(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "spool" / "incoming").rglob("*.dcm"))


def truncated(source: Path, target: Path) -> Path:
    target.write_bytes(source.read_bytes()[:-300])
    return target


# --- import ----------------------------------------------------------------------------


def test_import_a_series_then_the_sweep_completes_it(
    tmp_path: Path, db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, db_url)
    folder = tmp_path / "backfill"
    datasets = ct_series(lung_phantom(slices=6, size=32))
    paths = write_series(datasets, folder / "study" / "series")
    (folder / "README.txt").write_text("exported from the old PACS")
    truncated(paths[0], folder / "study" / "broken.dcm")

    code, out, err = run(capsys, config, "import", str(folder), "--json")
    assert code == 1 and err == ""  # the truncated copy was refused
    report = json.loads(out)
    assert {k: report[k] for k in ("imported", "duplicates", "replaced", "series", "studies")} == {
        "imported": 6,
        "duplicates": 0,
        "replaced": 0,
        "series": 1,
        "studies": 1,
    }
    assert (report["refused"], report["skipped"], report["stopped"]) == (1, 1, None)
    assert report["problems"] == [
        {
            "file": "README.txt",
            "outcome": "skipped",
            "reason": "not a DICOM file (no DICM prefix)",
        },
        {
            "file": "study/broken.dcm",
            "outcome": "refused",
            "reason": "PixelData is truncated: its length is 2048 bytes, 1748 arrived",
        },
    ]
    instances, [series] = rows(db_url)
    assert [i.sop_instance_uid for i in instances] == [ds.SOPInstanceUID for ds in datasets]
    assert {i.calling_ae for i in instances} == {"IMPORT"}
    assert series.series_uid == datasets[0].SeriesInstanceUID
    assert series.state == SeriesState.RECEIVING and series.instance_count == 6
    files = spool_files(tmp_path)
    assert sorted(tmp_path / "spool" / i.path for i in instances) == files
    for instance in instances:
        stored = tmp_path / "spool" / instance.path
        assert stored.parts[-3:-1] == (datasets[0].StudyInstanceUID, datasets[0].SeriesInstanceUID)
        assert pydicom.dcmread(stored).SOPInstanceUID == instance.sop_instance_uid

    # Again: identical resends are duplicates, no second row; the human summary.
    code, out, _ = run(capsys, config, "import", str(folder))
    assert code == 1
    assert out.splitlines() == [
        "imported 6 instance(s) in 1 series of 1 study(ies) (6 duplicate(s)), 1 refused, 1 skipped",
        "skipped  README.txt: not a DICOM file (no DICM prefix)",
        "refused  study/broken.dcm: PixelData is truncated: its length is 2048 bytes, 1748 arrived",
    ]
    assert len(rows(db_url)[0]) == 6 and len(spool_files(tmp_path)) == 6

    # A corrected object under a known UID replaces the old one (file and row).
    (folder / "study" / "broken.dcm").unlink()
    changed = datasets[2]
    changed.PixelData = (np.ones((32, 32), np.int16) * 7).tobytes()
    changed.save_as(paths[2], enforce_file_format=True)
    code, out, _ = run(capsys, config, "import", str(folder))
    assert code == 0
    assert out.splitlines()[:2] == [
        "imported 6 instance(s) in 1 series of 1 study(ies) (5 duplicate(s)), 0 refused, 1 skipped",
        "1 replaced an earlier object with the same SOP Instance UID",
    ]
    instances, _ = rows(db_url)
    assert len(instances) == 6 and len(spool_files(tmp_path)) == 6
    assert pydicom.dcmread(tmp_path / "spool" / instances[2].path).PixelData == changed.PixelData

    # The node's completion sweep takes it from here, as for a received series.
    settings = load_settings(config)
    engine = make_engine(settings.database.url)
    try:
        assert sweep(session_factory(engine), settings, {}, Spool(settings.storage.path)) == 1
    finally:
        engine.dispose()
    [series] = rows(db_url)[1]
    assert series.state == SeriesState.COMPLETE and series.completed_at is not None


def test_import_real_ct_files(
    tmp_path: Path, db_url: str, lidc1: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, db_url)
    folder = tmp_path / "LIDC" / "deep" / "er"
    folder.mkdir(parents=True)
    for path in lidc1[:3]:
        shutil.copy(path, folder / path.name)
    code, out, err = run(capsys, config, "import", str(tmp_path / "LIDC"), "--calling-ae", "LIDC")
    assert (code, err) == (0, "")
    assert out.strip() == (
        "imported 3 instance(s) in 1 series of 1 study(ies) (0 duplicate(s)), 0 refused, 0 skipped"
    )
    instances, [series] = rows(db_url)
    expected = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in lidc1[:3]}
    assert {i.sop_instance_uid for i in instances} == expected
    assert {i.calling_ae for i in instances} == {"LIDC"}
    assert series.modality == "CT" and series.instance_count == 3
    for instance, path in zip(
        sorted(instances, key=lambda i: i.sop_instance_uid),
        sorted(lidc1[:3], key=lambda p: str(pydicom.dcmread(p).SOPInstanceUID)),
        strict=True,
    ):
        assert (tmp_path / "spool" / instance.path).read_bytes() == path.read_bytes()


# --- send to Orthanc -------------------------------------------------------------------


def test_send_a_folder_to_orthanc(
    tmp_path: Path, orthanc: Orthanc, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, destinations={"orthanc": orthanc.dicom_port})
    datasets = ct_series(lung_phantom(slices=4, size=32))
    write_series(datasets, tmp_path / "out" / "series")
    (tmp_path / "out" / "notes.txt").write_text("not DICOM")
    code, out, err = run(capsys, config, "send", str(tmp_path / "out"), "orthanc", "--progress")
    assert code == 0
    assert out.splitlines() == [
        f"sent 4 object(s) to orthanc (ORTHANC@127.0.0.1:{orthanc.dicom_port}), 1 skipped",
        "skipped  notes.txt: not a DICOM file (no DICM prefix)",
    ]
    assert "[4/4] #################### 100%" in err and "Traceback" not in err
    assert {str(ds.SOPInstanceUID) for ds in datasets} <= orthanc_uids(orthanc)

    # One file, in JSON: the statuses.
    one = tmp_path / "out" / "series" / "0000.dcm"
    code, out, err = run(capsys, config, "send", str(one), "orthanc", "--json")
    assert (code, err) == (0, "")
    report = json.loads(out)
    assert (report["sent"], report["failed"], report["warnings"]) == (1, 0, 0)
    assert report["objects"] == [
        {
            "file": "0000.dcm",
            "outcome": "stored",
            "sop_instance_uid": datasets[0].SOPInstanceUID,
            "status": 0,
            "status_hex": "0x0000",
            "reason": None,
        }
    ]


def test_send_to_a_closed_port_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    config = write_config(tmp_path, destinations={"pacs": port})
    write_series(ct_series(np.zeros((2, 8, 8), np.float32)), tmp_path / "out")
    for extra in ((), ("--json",)):
        code, out, err = run(capsys, config, "send", str(tmp_path / "out"), "pacs", *extra)
        assert code == 1 and out == ""
        assert one_line(err) == f"dicomnode: destination pacs: cannot connect to 127.0.0.1:{port}"
    # Both tries are in the audit trail, as failures.
    engine = make_engine(f"sqlite:///{tmp_path / 'node.db'}")
    try:
        with session_factory(engine)() as s:
            tries = list(audit.entries(s, events=("results-resent",)))
    finally:
        engine.dispose()
    assert [(t["outcome"], t["count"], t["destination"]) for t in tries] == [
        ("failure", 0, "pacs"),
        ("failure", 0, "pacs"),
    ]
    assert "cannot connect" in tries[0]["detail"]


def test_send_a_jobs_outputs_to_orthanc_leaves_its_deliveries_alone(
    tmp_path: Path, db_url: str, sessions, orthanc: Orthanc, capsys: pytest.CaptureFixture[str]
) -> None:
    # A finished job through the real pipeline: a small model, SEG and SR, delivered.
    with CountingSCP() as counter:
        settings = make_settings(tmp_path, db_url, counter.port)
        models = load_registry(settings.models.path)
        spool = Spool(settings.storage.path)
        pipeline = Pipeline(settings, sessions, spool, models, ModelCache(torch.device("cpu")))
        worker = Worker(sessions, pipeline, settings.worker, threading.Event())
        node = {"settings": settings, "models": models, "spool": spool, "sessions": sessions}
        receive_phantom(node)
        assert worker.run_once()
        assert len(counter.received) == 2

    def snapshot() -> tuple[int, list[tuple[Any, ...]], list[str]]:
        with sessions() as s:
            job = s.scalars(select(Job)).one()
            assert job.state == JobState.DONE, job.last_error
            deliveries = [
                (d.id, d.destination, d.state, d.attempts, d.sent_at, d.last_error, d.warning)
                for d in s.scalars(select(Delivery))
            ]
            outputs = [o.sop_instance_uid for o in s.scalars(select(Output))]
            return job.id, deliveries, outputs

    job_id, deliveries, outputs = snapshot()
    assert len(outputs) == 2 and len(deliveries) == 1

    config = write_config(
        tmp_path, db_url, destinations={"orthanc": orthanc.dicom_port}, migrated=False
    )
    code, out, err = run(capsys, config, "send", f"job:{job_id}", "orthanc")
    assert (code, err) == (0, "")
    assert out.strip() == f"sent 2 object(s) to orthanc (ORTHANC@127.0.0.1:{orthanc.dicom_port})"
    assert set(outputs) <= orthanc_uids(orthanc)
    arrived = {
        i["MainDicomTags"]["SOPInstanceUID"]: i["ID"] for i in orthanc.get("/instances?expand")
    }
    classes = {
        str(pydicom.dcmread(BytesIO(orthanc.download(arrived[u]))).SOPClassUID) for u in outputs
    }
    assert classes == {"1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.88.34"}

    code, out, _ = run(capsys, config, "send", str(job_id), "orthanc", "--json")  # a re-send
    assert code == 0
    report = json.loads(out)
    assert [o["sop_instance_uid"] for o in report["objects"]] == outputs
    assert all(o["file"].startswith("results/") for o in report["objects"])
    assert snapshot() == (job_id, deliveries, outputs)


# --- send: statuses and a lost association, from a staged SCP ---------------------------


class StatusSCP:
    """A CT storage SCP that answers each instance (by Instance Number) with a status.

    It accepts CT Image Storage in Explicit VR Little Endian only, and can abort the
    association after N C-STOREs.
    """

    def __init__(self, statuses: dict[int, int], abort_after: int | None = None) -> None:
        self.port = free_port()
        self.statuses = statuses
        self.abort_after = abort_after
        self.received: list[int] = []
        ae = AE(ae_title="STAGED")
        ae.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian])
        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )

    def _store(self, event: evt.Event) -> int:
        number = int(event.dataset.InstanceNumber)
        self.received.append(number)
        if self.abort_after is not None and len(self.received) >= self.abort_after:
            event.assoc.abort()
        return self.statuses.get(number, 0x0000)

    def __enter__(self) -> StatusSCP:
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()


def test_send_reports_each_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    datasets = ct_series(np.zeros((5, 8, 8), np.float32))
    datasets[4].file_meta.TransferSyntaxUID = ImplicitVRLittleEndian  # not accepted by the SCP
    write_series(datasets, tmp_path / "out")
    with StatusSCP({2: 0xB000, 3: 0xA700}) as scp:
        config = write_config(tmp_path, destinations={"staged": scp.port})
        code, out, err = run(capsys, config, "send", str(tmp_path / "out"), "staged")
        assert code == 1 and err == ""
        assert out.splitlines() == [
            f"sent 3 object(s) to staged (STAGED@127.0.0.1:{scp.port}), 1 stored with a "
            "warning, 2 not stored",
            "warning  0001.dcm: stored with warning 0xB000 (Coercion of Data Elements)",
            "failed   0002.dcm: status 0xA700 (Refused: Out of Resources)",
            "failed   0004.dcm: the destination does not accept SOP class "
            "1.2.840.10008.5.1.4.1.1.2 (CT Image Storage) in transfer syntax 1.2.840.10008.1.2 "
            "(Implicit VR Little Endian)",
        ]
        assert sorted(scp.received) == [1, 2, 3, 4]  # each once; the refused context not
        code, out, _ = run(capsys, config, "send", str(tmp_path / "out"), "staged", "--json")
        assert code == 1
        report = json.loads(out)
        assert (report["sent"], report["warnings"], report["failed"]) == (3, 1, 2)
        assert [(o["outcome"], o["status"]) for o in report["objects"]] == [
            ("stored", 0),
            ("warning", 0xB000),
            ("failed", 0xA700),
            ("stored", 0),
            ("failed", None),
        ]
        assert report["objects"][2]["status_hex"] == "0xA700"


def test_a_lost_association_ends_the_send(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_series(ct_series(np.zeros((4, 8, 8), np.float32)), tmp_path / "out")
    with StatusSCP({}, abort_after=2) as scp:
        # pynetdicom sometimes notices the abort only at its timeout: keep that short.
        config = write_config(tmp_path, destinations={"staged": scp.port}, timeout=2)
        code, out, err = run(capsys, config, "send", str(tmp_path / "out"), "staged", "--json")
    assert code == 1
    assert one_line(err) == "dicomnode: destination staged: no reply to C-STORE (connection lost)"
    report = json.loads(out)
    assert [o["outcome"] for o in report["objects"]] == ["stored", "failed", "not sent", "not sent"]
    assert report["objects"][1]["reason"] == (
        "no reply (connection lost): it may or may not have been stored"
    )
    assert report["error"] == "destination staged: no reply to C-STORE (connection lost)"
    assert (report["sent"], report["failed"]) == (1, 3)
