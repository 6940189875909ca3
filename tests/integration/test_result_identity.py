"""Re-runs replace their results: one SEG and one SR series per model and input series.

Each re-run (here: late images, twice) writes new instances into the same result
series and rejects the previous run's instances with an IOCM Key Object Selection
("Rejected for Quality Reasons"). Checked in a real Orthanc, through its REST API.
"""

from __future__ import annotations

import shutil
import threading
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
import torch
from sqlalchemy import select

from dicomnode.config import parse_settings
from dicomnode.db import migrate
from dicomnode.db.engine import make_engine, session_factory
from dicomnode.db.models import Job, JobState, Output
from dicomnode.inference.registry import load_registry
from dicomnode.inference.segment import ModelCache
from dicomnode.pipeline import Pipeline, encode
from dicomnode.queue.completion import sweep
from dicomnode.queue.worker import Worker
from dicomnode.store.ingest import Ingestor
from dicomnode.store.spool import Spool
from tests.factories import ct_series, lung_phantom
from tests.integration.orthanc import Orthanc
from tests.unit.inference.packages import build_package

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("Orthanc", "dciodvfy")),
    reason="orthanc and dicom3tools are installed by .ci/run",
)

KOS = "1.2.840.10008.5.1.4.1.1.88.59"


def test_reruns_leave_one_seg_and_one_sr_series_and_reject_the_old(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'node.db'}"
    engine = make_engine(url)
    migrate.upgrade(engine)
    sessions = session_factory(engine)
    build_package(tmp_path / "models")
    series = ct_series(lung_phantom(slices=14))  # the last 2 slices arrive late, one by one
    with Orthanc(tmp_path / "orthanc") as pacs:
        settings = parse_settings(
            {
                "database": {"url": url},
                "storage": {"path": str(tmp_path / "spool")},
                "completion": {"quiet_seconds": 0},
                "models": {"path": str(tmp_path / "models")},
                "outputs": {"validate": "dciodvfy"},
                "destinations": [
                    {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1",
                     "port": pacs.dicom_port, "timeout_seconds": 30},
                ],
                "routes": [
                    {"name": "lungs", "match": {"Modality": "CT"}, "models": ["test-lungs"],
                     "send_to": ["pacs"]},
                ],
            },
            environ={},
        )  # fmt: skip
        models = load_registry(settings.models.path)
        spool = Spool(settings.storage.path)
        ingestor = Ingestor(spool, sessions)
        pipeline = Pipeline(settings, sessions, spool, models, ModelCache(torch.device("cpu")))
        worker = Worker(sessions, pipeline, settings.worker, threading.Event())
        made: list[dict[str, str]] = []
        for arrived in (12, 13, 14):
            for ds in series[arrived - 1 if made else 0 : arrived]:
                ingestor.store(encode(ds))
            assert sweep(sessions, settings, models, spool) == 1
            assert worker.run_once()
            with sessions() as s:
                job = s.scalars(select(Job).order_by(Job.id.desc())).first()
                assert job is not None and job.state == JobState.DONE, job.last_error
                outputs = s.scalars(select(Output).where(Output.job_id == job.id)).all()
                made.append({o.kind: o.sop_instance_uid for o in outputs})

        by_modality: dict[str, list[dict]] = {}
        for found in pacs.get("/series?expand"):
            by_modality.setdefault(found["MainDicomTags"]["Modality"], []).append(found)
        notes = [
            pydicom.dcmread(BytesIO(pacs.download(instance)))
            for found in by_modality["KO"]
            for instance in found["Instances"]
        ]
    engine.dispose()

    # One SEG and one SR series, whatever the number of runs; each run a new instance.
    assert len(by_modality["SEG"]) == 1 and len(by_modality["SR"]) == 1
    assert len(by_modality["SEG"][0]["Instances"]) == 3
    assert [set(m) for m in made] == [
        {"seg", "sr"},
        {"seg", "sr", "rejection"},
        {"seg", "sr", "rejection"},
    ]
    # Each re-run rejects every earlier run's SEG and SR (an earlier note may never have
    # left, so each note is complete on its own).
    assert len(notes) == 2
    rejected = {
        str(note.SOPInstanceUID): {
            str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
            for item in note.ContentSequence
            if "ReferencedSOPSequence" in item
        }
        for note in notes
    }
    assert rejected[made[1]["rejection"]] == {made[0]["seg"], made[0]["sr"]}
    assert rejected[made[2]["rejection"]] == {
        made[0]["seg"], made[0]["sr"], made[1]["seg"], made[1]["sr"]
    }  # fmt: skip
    for note in notes:
        assert note.SOPClassUID == KOS
        assert note.ConceptNameCodeSequence[0].CodeValue == "113001"
