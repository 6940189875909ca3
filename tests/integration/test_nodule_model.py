"""The shipped lung-nodule-cnn on its held-out scan, through the real pipeline, into Orthanc.

LIDC-IDRI-0001 was never seen in training (the model card says so, and this test
holds the card to it): its one nodule of 3 mm or more, outlined by all four readers,
must be found at the package's threshold with at most the card's number of false
positives. The SEG and SR go to a real Orthanc, come back through its REST API, pass
dciodvfy, and `dicomnode evaluate` scores the SR against the readers' XML.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from dicomnode.cli.main import main as cli
from dicomnode.db import JobState
from tests.integration.inprocess import node_sending_to
from tests.integration.orthanc import Orthanc
from tests.integration.test_pipeline import job_row

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not all(shutil.which(t) for t in ("Orthanc", "dciodvfy")),
        reason="orthanc and dicom3tools are installed by .ci/run",
    ),
]

CARD = Path(__file__).resolve().parents[2] / "models" / "lung-nodule-cnn" / "results.json"
NODULE_CENTER = np.array([56.2, 86.2, -115.9])  # the readers' consensus, LPS mm
NODULE_DIAMETER_MM = 32.8  # mean of the four readers' longest outlines


def test_held_out_nodule_found_sent_validated_and_scored(
    tmp_path: Path, lidc1: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    card = json.loads(CARD.read_text())["held_out"]
    assert card["case"] == "LIDC-IDRI-0001"

    with (
        Orthanc(tmp_path / "orthanc") as pacs,
        node_sending_to(
            tmp_path, pacs.dicom_port, [{"name": "nodules", "models": ["lung-nodule-cnn"]}]
        ) as node,
    ):
        node.receive(lidc1)
        assert node.sweep() == 1
        node.run()
        job = job_row(node.sessions)
        assert job.state == JobState.DONE, job.last_error
        by_modality: dict[str, list[dict]] = {}
        for series in pacs.get("/series?expand"):
            by_modality.setdefault(series["MainDicomTags"]["Modality"], []).append(series)
        assert sorted(by_modality) == ["SEG", "SR"]
        seg_bytes = pacs.download(by_modality["SEG"][0]["Instances"][0])
        sr_bytes = pacs.download(by_modality["SR"][0]["Instances"][0])

    # --- the findings: the nodule among them, sized like the readers' outlines
    found = job.summary["detection"]
    assert found["present"] is True
    centers = np.array([f["center_mm"] for f in found["findings"]])
    distance = np.linalg.norm(centers - NODULE_CENTER, axis=1)
    hit = int(np.argmin(distance))
    assert distance[hit] < NODULE_DIAMETER_MM / 2
    assert found["findings"][hit]["diameter_mm"] == pytest.approx(NODULE_DIAMETER_MM, abs=6.0)
    assert found["findings"][hit]["probability"] >= 0.5
    # As many false positives as the model card reports for this scan at 0.5, no more.
    assert len(found["findings"]) - 1 <= card["at_threshold_0.5"]["false_positives"]

    # --- what Orthanc kept validates, and reads back as TID 1500 with the same values
    for name, data in (("seg", seg_bytes), ("sr", sr_bytes)):
        path = tmp_path / f"{name}.dcm"
        path.write_bytes(data)
        out = subprocess.run(["dciodvfy", "-new", str(path)], capture_output=True, text=True)
        errors = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("Error")]
        assert errors == [], errors
    seg = pydicom.dcmread(tmp_path / "seg.dcm")
    assert len(seg.SegmentSequence) == len(found["findings"])
    content = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(tmp_path / "sr.dcm")).content
    groups = content.get_planar_roi_measurement_groups()
    diameters = sorted(float(g.get_measurements(name=codes.SCT.Diameter)[0].value) for g in groups)
    assert diameters == pytest.approx(sorted(f["diameter_mm"] for f in found["findings"]), abs=0.05)

    # --- dicomnode evaluate scores the SR against the four readers' XML
    ours = tmp_path / "ours"
    ours.mkdir()
    shutil.copy(tmp_path / "sr.dcm", ours / "sr.dcm")
    xml = next(lidc1[0].parent.glob("0*.xml"))  # beside the images
    code = cli(["evaluate", str(ours), str(xml), "--images", str(xml.parent), "--json"])
    out = capsys.readouterr().out
    assert code == 0, out
    report = json.loads(out)
    (case,) = report["detection"]["cases"]
    assert case["nodules"] == 1 and case["findings"] == len(found["findings"])
    assert case["true_positives"] == 1 and case["sensitivity"] == 1.0
    assert case["false_positives"] == len(found["findings"]) - 1
