"""LIDC-IDRI-0132 end to end: one real study on Orthanc as the prior, the other sent to the node.

The shipped nodule model runs on today's study; the priors stage has Orthanc C-MOVE the
other study's series to the node's listener, the model runs on it too, the two scans
are registered on the lungs and the findings matched. The SR (checked by dciodvfy) names
the prior study and states each nodule's change; TCIA set both study dates to
2000-01-01, so it says plainly that there is no doubling time. Measured here: 8
findings today, 7 on the prior, 3 matched, the readers' 26 mm mass among them (the rest
are the model's false positives, which the card counts); about a minute in all.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from dicomnode.db import JobState
from tests.conftest import free_port
from tests.integration.inprocess import node_sending_to
from tests.integration.orthanc import Orthanc
from tests.integration.test_follow_up import _texts
from tests.integration.test_pipeline import job_row

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not all(shutil.which(t) for t in ("Orthanc", "dciodvfy")),
        reason="orthanc and dicom3tools are installed by .ci/run",
    ),
]

CASE = "LIDC-IDRI-0132"
PRIOR, TODAY = "151647338241909635299641922057", "254176853278710432756285662989"
MASS_TODAY = np.array([83.4, -101.2, -100.7])  # the readers' 26 mm mass, LPS mm


def test_the_prior_is_retrieved_and_the_mass_tracked(tmp_path: Path, data_dir: Path) -> None:
    case = data_dir / "ct" / CASE
    port = free_port()
    route = {"name": "nodules", "models": ["lung-nodule-cnn"],
             "priors": {"destination": "pacs", "match": {"Modality": "CT"}}}  # fmt: skip
    modalities = {"node": ["DICOMNODE", "127.0.0.1", port]}
    with (
        Orthanc(tmp_path / "orthanc", modalities=modalities) as pacs,
        node_sending_to(tmp_path, pacs.dicom_port, [route], listener_port=port) as node,
    ):
        for path in sorted((case / PRIOR).glob("*.dcm")):
            pacs.upload(path)
        node.receive(sorted((case / TODAY).glob("*.dcm")))
        assert node.sweep() == 1
        node.run()
        job = job_row(node.sessions)
        assert job.state == JobState.DONE, job.last_error
        sr_ids = [
            s["Instances"][0]
            for s in pacs.get("/series?expand")
            if s["MainDicomTags"].get("Modality") == "SR"
        ]
        report = pydicom.dcmread(pydicom.filebase.DicomBytesIO(pacs.download(sr_ids[0])))

    prior_study = str(pydicom.dcmread(next((case / PRIOR).glob("*.dcm"))).StudyInstanceUID)
    assert job.priors["source"] == "pacs"
    comparison = job.summary["comparison"]
    assert comparison["prior_study_uid"] == prior_study
    assert comparison["prior_findings_from"] == "this job"
    assert 480 < np.linalg.norm(comparison["registration"]["translation_mm"]) < 505
    findings = job.summary["detection"]["findings"]
    # The mass is found today and matched with the prior's finding.
    mass = min(findings, key=lambda f: np.linalg.norm(np.array(f["center_mm"]) - MASS_TODAY))
    assert np.linalg.norm(np.array(mass["center_mm"]) - MASS_TODAY) < 15
    tracked = {n["number"]: n for n in comparison["nodules"] if n["status"] == "matched"}
    assert mass["number"] in tracked
    assert tracked[mass["number"]]["note"] == "the interval is not positive"  # same date
    assert comparison["matched"] == len(tracked) >= 1
    texts = _texts(report)
    assert report.PertinentOtherEvidenceSequence[0].StudyInstanceUID == prior_study
    assert texts[codes.DCM.ComparisonToPreviousStudies.value] == [comparison["heading"]]
    assert texts[codes.DCM.DescriptionOfChange.value] == comparison["lines"]
    assert hd.sr.Comprehensive3DSR.from_dataset(report) is not None
