"""Detection jobs through the real pipeline and worker: findings in the SEG and the SR.

The outputs pass dciodvfy before they leave (``outputs.validate = "dciodvfy"``), and
the SR is read back with highdicom's TID 1500 parsing and every value checked.
"""

from __future__ import annotations

import threading
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
import torch
from pydicom.sr.codedict import codes

from dicomnode.config import Settings
from dicomnode.db import JobState
from dicomnode.evaluate.sr_findings import read_verdicts
from dicomnode.imaging import load_registry
from dicomnode.inference import ModelCache
from dicomnode.pipeline import Pipeline, encode
from dicomnode.queue import Worker
from dicomnode.queue.completion import sweep
from dicomnode.store import Ingestor, Spool
from tests.integration.test_pipeline import (  # noqa: F401 - scp is a fixture
    CountingSCP,
    job_row,
    make_settings,
    scp,
)
from tests.unit.inference.packages import build_detection_package, build_package
from tests.unit.inference.test_detect import NODULE_MM, nodule_volume

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


def settings_for(tmp_path: Path, db_url: str, port: int) -> Settings:
    models = tmp_path / "models"
    build_package(models, "test-lungs")
    build_detection_package(models, "test-nodules")
    return make_settings(tmp_path, db_url, port, models=models, model="test-nodules")


def run_detection(tmp_path: Path, db_url: str, sessions, scp: CountingSCP, pixels=None):  # noqa: F811
    settings = settings_for(tmp_path, db_url, scp.port)
    models = load_registry(settings.models.path)
    spool = Spool(settings.storage.path)
    pipeline = Pipeline(settings, sessions, spool, models, ModelCache(torch.device("cpu")))
    worker = Worker(sessions, pipeline, settings.worker, threading.Event())
    volume, center = nodule_volume()
    if pixels is not None:
        pixels(volume)
    ingestor = Ingestor(spool, sessions)
    for k, ds in enumerate(volume.datasets):
        ds.PixelData = (volume.pixels[k] + 1024).astype(np.int16).tobytes()
        ingestor.store(encode(ds))
    assert sweep(sessions, settings, models, spool) == 1
    scp.start()
    assert worker.run_once()
    return volume, center


def test_a_nodule_becomes_a_segment_a_circle_and_a_study_finding(
    tmp_path: Path,
    db_url: str,
    sessions,
    scp: CountingSCP,  # noqa: F811
) -> None:
    volume, center = run_detection(tmp_path, db_url, sessions, scp)
    job = job_row(sessions)
    assert job.state == JobState.DONE, job.last_error
    found = job.summary["detection"]
    assert found["present"] is True and len(found["findings"]) == 1
    assert found["findings"][0]["diameter_mm"] == pytest.approx(NODULE_MM, abs=2.0)
    assert {"mask_inference_s", "candidates_s", "inference_s", "seg_s", "sr_s"} <= set(job.timings)

    received = {str(ds.SOPClassUID): ds for ds in scp.received}
    assert set(received) == {SEG, COMPREHENSIVE_3D_SR}
    seg = received[SEG]
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Nodule 1"]
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "786838002"

    content = hd.sr.Comprehensive3DSR.from_dataset(received[COMPREHENSIVE_3D_SR]).content
    planar = content.get_planar_roi_measurement_groups()
    assert len(planar) == 1
    group = planar[0]
    diameter = group.get_measurements(name=codes.SCT.Diameter)[0]
    probability = group.get_measurements(name=codes.DCM.Probability)[0]
    assert float(diameter.value) == pytest.approx(found["findings"][0]["diameter_mm"], abs=0.05)
    assert float(probability.value) == pytest.approx(found["findings"][0]["probability"], abs=1e-4)
    assert 0.5 <= float(probability.value) <= 1.0
    region = group.roi
    assert region.GraphicType == "CIRCLE"
    # The circle lies on the source image through the nodule's centre, centred on it.
    source_uid = region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
    slice_index = [str(d.SOPInstanceUID) for d in volume.datasets].index(source_uid)
    assert abs(slice_index - center[0]) <= 1
    (cx, cy), (ex, _ey) = np.asarray(region.GraphicData).reshape(2, 2)
    assert np.hypot(cx - center[2], cy - center[1]) < 3.0
    assert (ex - cx) == pytest.approx(float(diameter.value) / 2, abs=0.1)  # 1 mm pixels
    # The same finding in the volumetric group: the SEG segment with its volume.
    volumetric = content.get_volumetric_roi_measurement_groups()
    assert len(volumetric) == 1
    assert volumetric[0].tracking_uid == group.tracking_uid
    volume_ml = float(volumetric[0].get_measurements(name=codes.SCT.Volume)[0].value)
    assert volume_ml == pytest.approx(np.pi / 6 * NODULE_MM**3 / 1000, rel=0.3)
    short = float(group.get_measurements(name=codes.SCT.ShortAxis)[0].value)
    assert short == pytest.approx(found["findings"][0]["short_axis_mm"], abs=0.05)
    assert short == pytest.approx(NODULE_MM, abs=2.0)  # a sphere is as wide as it is long
    # The study-level verdict: a Qualitative Evaluation, not a group without coordinates.
    assert content.get_image_measurement_groups() == []
    answer, best = read_verdicts(received[COMPREHENSIVE_3D_SR])["Pulmonary nodule"]
    assert answer == codes.SCT.Present
    assert best == pytest.approx(found["best_probability"], abs=1e-4)


def test_no_nodule_gives_an_sr_that_says_absent_and_no_seg(
    tmp_path: Path,
    db_url: str,
    sessions,
    scp: CountingSCP,  # noqa: F811
) -> None:
    def clear(volume) -> None:
        volume.pixels[(volume.pixels > -500) & (volume.pixels < 35)] = -850.0
        volume.pixels[volume.pixels == 40.0] = 40.0  # the body stays

    run_detection(tmp_path, db_url, sessions, scp, pixels=clear)
    job = job_row(sessions)
    assert job.state == JobState.DONE, job.last_error
    assert job.summary["detection"]["present"] is False
    assert [str(ds.SOPClassUID) for ds in scp.received] == [COMPREHENSIVE_3D_SR]
    content = hd.sr.Comprehensive3DSR.from_dataset(scp.received[0]).content
    assert content.get_planar_roi_measurement_groups() == []
    answer, _ = read_verdicts(scp.received[0])["Pulmonary nodule"]
    assert answer == codes.SCT.Absent
