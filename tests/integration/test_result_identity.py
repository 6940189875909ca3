"""Re-runs replace their results: one SEG and one SR series per model and input series.

Each re-run (here: late images, twice) writes new instances into the same result
series and rejects the previous run's instances with an IOCM Key Object Selection
("Rejected for Quality Reasons"). Checked in a real Orthanc, through its REST API.
"""

from __future__ import annotations

import shutil
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from dicomnode.db import Job, JobState, Output
from tests.factories import ct_series, lung_phantom
from tests.integration.inprocess import node_sending_to
from tests.integration.orthanc import Orthanc
from tests.unit.inference.packages import build_package

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("Orthanc", "dciodvfy")),
    reason="orthanc and dicom3tools are installed by .ci/run",
)

KOS = "1.2.840.10008.5.1.4.1.1.88.59"


def test_reruns_leave_one_seg_and_one_sr_series_and_reject_the_old(tmp_path: Path) -> None:
    build_package(tmp_path / "models")
    series = ct_series(lung_phantom(slices=14))  # the last 2 slices arrive late, one by one
    with (
        Orthanc(tmp_path / "orthanc") as pacs,
        node_sending_to(
            tmp_path,
            pacs.dicom_port,
            [{"name": "lungs", "models": ["test-lungs"]}],
            models_path=tmp_path / "models",
        ) as node,
    ):
        made: list[dict[str, str]] = []
        for arrived in (12, 13, 14):
            node.receive(series[arrived - 1 if made else 0 : arrived])
            assert node.sweep() == 1
            node.run()
            with node.sessions() as s:
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
