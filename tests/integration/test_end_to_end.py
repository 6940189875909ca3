"""The whole path for real: storescu -> dicomnode serve -> lung U-Net -> SEG + SR -> Orthanc.

Runs once on the embedded SQLite database and once on a fresh PostgreSQL database.
Every process is real: dcmtk's storescu, `dicomnode serve` as a subprocess, Debian's
Orthanc as the PACS, dciodvfy on what arrives there.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from io import BytesIO
from pathlib import Path

import highdicom as hd
import pydicom
import pytest

from tests.dcmtk import STORESCU
from tests.integration.node_process import NodeProcess, listener_port, write_config
from tests.integration.orthanc import Orthanc

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not all(shutil.which(t) for t in (STORESCU, "Orthanc", "dciodvfy")),
        reason="dcmtk, orthanc and dicom3tools are installed by .ci/run",
    ),
]

RESULT_TIMEOUT_S = 600  # 133 slices on two CPU cores take about a minute


def wait_for_results(pacs: Orthanc, node: NodeProcess) -> dict[str, list[dict]]:
    deadline = time.monotonic() + RESULT_TIMEOUT_S
    while time.monotonic() < deadline:
        by_modality = pacs.series_by_modality()
        if "SEG" in by_modality and "SR" in by_modality:
            return by_modality
        if node.proc is not None and node.proc.poll() is not None:
            pytest.fail(f"dicomnode exited:\n{node.log()[-3000:]}")
        time.sleep(1)
    pytest.fail(f"no SEG and SR in the PACS after {RESULT_TIMEOUT_S} s:\n{node.log()[-3000:]}")


def test_ct_in_seg_and_sr_out(tmp_path: Path, db_url: str, lidc1: list[Path]) -> None:
    source = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in lidc1}
    first = pydicom.dcmread(lidc1[0], stop_before_pixels=True)

    with Orthanc(tmp_path / "orthanc") as pacs:
        config = write_config(tmp_path, db_url=db_url, pacs_port=pacs.dicom_port)
        if db_url.startswith("postgresql"):
            # PostgreSQL is migrated by its operator, not by `serve`.
            upgrade = NodeProcess(config).cli("db", "upgrade")
            assert upgrade.returncode == 0, upgrade.stderr
            assert "database at revision" in upgrade.stdout
        with NodeProcess(config) as node:
            echo = node.cli("echo", "pacs")
            assert echo.returncode == 0 and echo.stdout.startswith("pacs ok ("), echo.stderr

            sent = subprocess.run(
                [STORESCU, "-aec", "DICOMNODE", "-to", "30", "127.0.0.1",
                 str(listener_port(config)), *map(str, lidc1)],
                capture_output=True, text=True, timeout=300, check=False,
            )  # fmt: skip
            assert sent.returncode == 0, sent.stderr

            by_modality = wait_for_results(pacs, node)
            seg_series, sr_series = by_modality["SEG"][0], by_modality["SR"][0]
            assert len(seg_series["Instances"]) == 1 and len(sr_series["Instances"]) == 1
            seg_bytes = pacs.download(seg_series["Instances"][0])
            sr_bytes = pacs.download(sr_series["Instances"][0])

            listing = node.cli("jobs", "list", "--json")
            assert listing.returncode == 0, listing.stderr
            jobs = json.loads(listing.stdout)
            shown = node.cli("jobs", "show", str(jobs[0]["id"]), "--json")
            assert shown.returncode == 0, shown.stderr
            job = json.loads(shown.stdout)
            human = node.cli("jobs", "show", str(jobs[0]["id"]))
            assert human.returncode == 0 and "timings (s)" in human.stdout
            code = node.stop()
            log = node.log()

    # --- the node shut down cleanly on SIGTERM
    assert code == 0, log[-2000:]
    assert "node stopped" in log

    # --- one job, done, with every stage timed and the delivery recorded
    assert len(jobs) == 1 and jobs[0]["state"] == "done"
    assert job["series_uid"] == first.SeriesInstanceUID
    for stage in ("receive_s", "wait_s", "load_s", "inference_s", "seg_s", "sr_s", "send_s"):
        assert job["timings"][stage] >= 0, stage
    assert [d["state"] for d in job["deliveries"]] == ["sent"]
    assert sorted(o["kind"] for o in job["outputs"]) == ["seg", "sr"]

    # --- SEG and SR sit in the same study in the PACS
    assert len(by_modality["SEG"]) == 1 and len(by_modality["SR"]) == 1
    assert seg_series["ParentStudy"] == sr_series["ParentStudy"]
    assert "CT" not in by_modality  # dicomnode sends results, never the source images

    # --- both validate cleanly
    for name, data in (("seg", seg_bytes), ("sr", sr_bytes)):
        path = tmp_path / f"{name}.dcm"
        path.write_bytes(data)
        out = subprocess.run(["dciodvfy", "-new", str(path)], capture_output=True, text=True)
        errors = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("Error")]
        assert errors == [], errors

    # --- the SEG references the source series and every frame a source image
    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(BytesIO(seg_bytes)))
    assert seg.StudyInstanceUID == first.StudyInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
    referenced = {
        item.ReferencedSOPInstanceUID
        for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    }
    assert referenced <= source and len(referenced) > 50
    labels = {d.SegmentLabel: d for d in seg.SegmentSequence}
    assert set(labels) == {"Left lung", "Right lung"}
    assert labels["Left lung"].SegmentedPropertyTypeCodeSequence[0].CodeValue == "44029006"
    assert "NOT FOR CLINICAL USE" in seg.SeriesDescription

    # --- the SR holds a plausible lung volume and references the SEG
    sr = hd.sr.srread(BytesIO(sr_bytes))
    assert "NOT FOR CLINICAL USE" in sr.SeriesDescription
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == 2
    volumes = {}
    for group in groups:
        assert group.referenced_segment.referenced_sop_instance_uid == seg.SOPInstanceUID
        measured = {
            (m.name.meaning, m.derivation and m.derivation.meaning): m.value
            for m in group.get_measurements()
        }
        volumes[group.tracking_identifier] = measured[("Volume", None)]
        assert -950 < measured[("Attenuation Coefficient", "Mean")] < -600  # aerated lung, HU
        assert 0 < measured[("Attenuation Coefficient", "Standard Deviation")] < 400
    total_litres = sum(volumes.values()) / 1000
    assert 2.0 < total_litres < 8.0, volumes
    assert job["summary"]["total_volume_ml"] == pytest.approx(sum(volumes.values()), rel=1e-3)

    # --- no patient data in the log
    for phi in (first.PatientID, str(first.PatientName), first.get("PatientBirthDate", "")):
        if phi:
            assert phi not in log
