"""A nodule job with priors, end to end: the prior moved from Orthanc, the nodule tracked.

The prior study (a year earlier, the patient lying 10 mm to the side, the nodule
8 mm) is on Orthanc; the node receives today's (the nodule 12 mm). The worker runs
the route's job: the priors stage has Orthanc C-MOVE the prior to the node's
listener, the detection model runs on both scans, the prior is registered onto
today's, and the nodule is matched: it keeps the prior's Tracking UID, and the job's
summary and the SR (checked by dciodvfy before it left) give its growth and volume
doubling time. Without a prior on the PACS the job still completes and says why.
"""

from __future__ import annotations

import argparse
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pytest
import torch
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from sqlalchemy import select

from dicomnode.cli.job_output import print_job
from dicomnode.cli.main import main as cli
from dicomnode.config import ListenerSettings, Settings, parse_settings
from dicomnode.db import Job, JobState, Output, Series
from dicomnode.db.queries import detail_of, series_input
from dicomnode.imaging import load_registry
from dicomnode.inference import ModelCache
from dicomnode.listener import Listener
from dicomnode.outputs import Provenance
from dicomnode.pipeline import Pipeline, encode
from dicomnode.pipeline.follow_up import finding_tracking_uid
from dicomnode.queue import Worker
from dicomnode.queue.completion import sweep
from dicomnode.store import Ingestor, Spool
from tests.conftest import free_port
from tests.factories import ct_series
from tests.integration.orthanc import Orthanc
from tests.integration.test_priors import c_store
from tests.unit.cli.test_main import write_config
from tests.unit.inference.packages import build_detection_package, build_package

pytestmark = pytest.mark.system

SHIFT_MM = np.array([10.0, -5.0, 0.0])  # where the patient lay a year earlier


def phantom(nodule_mm: float, study_uid: str, date: str, shift: np.ndarray) -> list[Dataset]:
    """A chest phantom with one nodule, as in tests/unit/inference/test_detect.py."""
    slices, size = 30, 96
    z, y, x = np.mgrid[0:slices, 0:size, 0:size].astype(np.float64)
    hu = np.full((slices, size, size), 40.0, np.float32)
    hu[(np.abs(x - 48) < 38) & (np.abs(y - 48) < 38) & (z > 1) & (z < slices - 2)] = -850.0
    mm = np.stack([z * 2.5, y, x], axis=-1)
    hu[np.linalg.norm(mm - np.array([15 * 2.5, 40.0, 35.0]), axis=-1) <= nodule_mm / 2] = 30.0
    origin = np.array([-100.0, -100.0, -50.0]) + shift
    datasets = ct_series(hu, spacing=(1.0, 1.0), slice_spacing=2.5, origin=origin,
                         patient_id="FOLLOW-UP-1")  # fmt: skip
    for ds in datasets:
        ds.StudyInstanceUID, ds.StudyDate = study_uid, date
    return datasets


@dataclass
class Node:
    """An in-process node (listener, worker) whose nodule route has priors from Orthanc."""

    settings: Settings
    sessions: Any
    spool: Spool
    models: dict[str, Any]
    worker: Worker

    def receive_and_run(self, datasets: list[Dataset]) -> Job:
        ingestor = Ingestor(self.spool, self.sessions)
        for ds in datasets:
            ingestor.store(encode(ds))
        assert sweep(self.sessions, self.settings, self.models, self.spool) == 1
        assert self.worker.run_once()
        with self.sessions() as s:
            job = s.scalars(select(Job).order_by(Job.id.desc()).limit(1)).one()
            s.expunge(job)
        assert job.state == JobState.DONE, job.last_error
        return job


def start_node(tmp_path: Path, db_url: str, sessions, pacs: Orthanc, port: int, request) -> Node:
    models_path = tmp_path / "models"
    build_package(models_path, "test-lungs")
    build_detection_package(models_path, "test-nodules")
    settings = parse_settings(
        {
            "database": {"url": db_url},
            "listener": {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": port},
            "storage": {"path": str(tmp_path / "spool")},
            "completion": {"quiet_seconds": 0},
            "models": {"path": str(models_path)},
            "outputs": {"validate": "dciodvfy"},
            "destinations": [{"name": "pacs", "ae_title": pacs.aet, "host": "127.0.0.1",
                              "port": pacs.dicom_port, "timeout_seconds": 30}],
            "routes": [{"name": "nodules", "match": {"Modality": "CT"},
                        "models": ["test-nodules"], "send_to": ["pacs"],
                        "priors": {"destination": "pacs", "match": {"Modality": "CT"}}}],
        },
        environ={},
    )  # fmt: skip
    spool = Spool(settings.storage.path)
    listener = Listener(ListenerSettings(ae_title="DICOMNODE", host="127.0.0.1", port=port),
                        Ingestor(spool, sessions))  # fmt: skip
    listener.start()
    request.addfinalizer(listener.stop)
    models = load_registry(models_path)
    pipeline = Pipeline(settings, sessions, spool, models, ModelCache(torch.device("cpu")))
    worker = Worker(sessions, pipeline, settings.worker, threading.Event())
    return Node(settings, sessions, spool, models, worker)


@pytest.mark.parametrize("prior_on_pacs", [True, False], ids=["prior", "no-prior"])
def test_a_growing_nodule_is_tracked_from_the_prior_on_the_pacs(
    tmp_path: Path,
    db_url: str,
    sessions,
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
    prior_on_pacs: bool,
) -> None:
    port = free_port()
    prior = phantom(8.0, generate_uid(), "20230101", SHIFT_MM)
    today = phantom(12.0, generate_uid(), "20240101", np.zeros(3))
    modalities = {"node": ["DICOMNODE", "127.0.0.1", port]}
    with Orthanc(tmp_path / "orthanc", modalities=modalities) as pacs:
        if prior_on_pacs:
            c_store(pacs.dicom_port, pacs.aet, prior)
        node = start_node(tmp_path, db_url, sessions, pacs, port, request)
        models = node.models
        job = node.receive_and_run(today)
        with sessions() as s:
            prior_row = s.scalar(select(Series).where(Series.prior.is_(True)))
            prior_digest = None if prior_row is None else series_input(s, prior_row.id).digest
        sent = {
            series["MainDicomTags"].get("Modality"): pacs.download(series["Instances"][0])
            for series in pacs.get("/series?expand")
            if series["MainDicomTags"].get("Modality") in ("SEG", "SR")
        }

    comparison = job.summary["comparison"]
    sr = hd.sr.srread(_file(tmp_path, sent["SR"]))
    evaluations = _texts(sr)
    if not prior_on_pacs:
        reason = "no earlier study of the patient on pacs within 1500 days"
        # The SR, sent to the PACS, says it in a fixed phrase; the job's record names it.
        heading = "No comparison: no earlier study of the patient within 1500 days"
        assert comparison == {"heading": heading, "reason": reason,
                              "lines": []}  # fmt: skip
        assert evaluations[codes.DCM.ComparisonToPreviousStudies.value] == [heading]
        assert "PertinentOtherEvidenceSequence" not in sr
        return

    assert job.priors["source"] == "pacs"
    assert comparison["prior_study_uid"] == prior[0].StudyInstanceUID
    assert comparison["interval_days"] == 365
    assert comparison["prior_findings_from"] == "this job"  # no earlier job on the prior
    assert np.allclose(comparison["registration"]["translation_mm"], SHIFT_MM, atol=2.0)
    assert (comparison["matched"], comparison["new"], comparison["no_longer_seen"]) == (1, 0, 0)
    (nodule,) = comparison["nodules"]
    before, now = nodule["diameter_mm"]
    assert before == pytest.approx(8.0, abs=2.0) and now == pytest.approx(12.0, abs=2.0)
    v0, v1 = nodule["volume_ml"]
    assert nodule["trend"] == "growing" and v1 > v0
    # From the volumes shown (0.01 mL); the node computes it from unrounded ones.
    assert nodule["doubling_days"] == pytest.approx(365 * math.log(2) / math.log(v1 / v0), rel=0.03)
    # Spheres of 8 and 12 mm a year apart double in 208 days; measured on voxels, within 15%
    # (199 days here).
    true_days = 365 * math.log(2) / (3 * math.log(12 / 8))
    assert nodule["doubling_days"] == pytest.approx(true_days, rel=0.15)
    # `jobs show` prints the comparison.
    with sessions() as s:
        print_job(detail_of(s.get(Job, job.id)), argparse.Namespace(json=False))
    shown = capsys.readouterr().out.splitlines()
    assert f"comparison    {comparison['heading']}" in shown
    assert f"  {comparison['lines'][0]}" in shown
    # So does `studies show`.
    config = str(write_config(tmp_path, db_url))
    assert cli(["--log-level", "WARNING", "--config", config, "studies", "show",
                today[0].StudyInstanceUID]) == 0  # fmt: skip
    assert f"job {job.id} {comparison['heading']}" in capsys.readouterr().out.splitlines()
    # The SR says the same, names the prior study, and the SEG keeps the prior's identity.
    assert evaluations[codes.DCM.ComparisonToPreviousStudies.value] == [comparison["heading"]]
    assert comparison["heading"].startswith(
        f"Compared with study {prior[0].StudyInstanceUID} (2023-01-01): 1 matched"
    )
    assert evaluations[codes.DCM.DescriptionOfChange.value] == comparison["lines"]
    assert f"volume doubling time {nodule['doubling_days']:.0f} days" in comparison["lines"][0]
    # The prior's images are the report's Pertinent Other Evidence, under the prior study.
    (other,) = sr.PertinentOtherEvidenceSequence
    assert other.StudyInstanceUID == prior[0].StudyInstanceUID
    listed = {
        i.ReferencedSOPInstanceUID
        for s in other.ReferencedSeriesSequence
        for i in s.ReferencedSOPSequence
    }
    assert listed == {ds.SOPInstanceUID for ds in prior}
    seg = hd.seg.segread(_file(tmp_path, sent["SEG"]))
    provenance = Provenance(model_name="test-nodules", model_version=models["test-nodules"].version,
                            clinical_use=models["test-nodules"].clinical_use)  # fmt: skip
    expected = finding_tracking_uid(provenance, prior[0].SeriesInstanceUID, "nodules",
                                    "test-nodules", 1, str(prior_digest))  # fmt: skip
    assert str(seg.SegmentSequence[0].TrackingUID) == expected


def _file(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / f"out-{len(list(tmp_path.glob('out-*')))}.dcm"
    path.write_bytes(data)
    return path


def _texts(report: Dataset) -> dict[str, list[str]]:
    """The report's Qualitative Evaluations items, by concept code value."""
    found: dict[str, list[str]] = {}
    for item in report.ContentSequence:
        if item.ConceptNameCodeSequence[0].CodeMeaning != "Qualitative Evaluations":
            continue
        for entry in item.ContentSequence:
            code = entry.ConceptNameCodeSequence[0].CodeValue
            value = entry.get("TextValue", entry.get("UID"))
            found.setdefault(code, []).append(str(value))
    return found


def test_a_prior_this_node_ran_on_lends_its_findings_and_their_identity(
    tmp_path: Path, db_url: str, sessions, request: pytest.FixtureRequest
) -> None:
    port = free_port()
    first_scan = phantom(8.0, generate_uid(), "20230101", SHIFT_MM)
    second_scan = phantom(12.0, generate_uid(), "20240101", np.zeros(3))
    third_scan = phantom(14.0, generate_uid(), "20250101", -SHIFT_MM)
    modalities = {"node": ["DICOMNODE", "127.0.0.1", port]}
    with Orthanc(tmp_path / "orthanc", modalities=modalities) as pacs:
        node = start_node(tmp_path, db_url, sessions, pacs, port, request)
        first = node.receive_and_run(first_scan)  # nothing to compare with yet
        assert first.summary["comparison"]["reason"].startswith("no earlier study")
        second = node.receive_and_run(second_scan)
        third = node.receive_and_run(third_scan)
    assert second.priors["source"] == "node"
    comparison = second.summary["comparison"]
    assert comparison["prior_findings_from"] == first.id  # the model did not run again
    assert comparison["matched"] == 1
    # The third study compares with the second, the newest prior.
    assert third.summary["comparison"]["prior_study_uid"] == second_scan[0].StudyInstanceUID
    assert third.summary["comparison"]["prior_findings_from"] == second.id
    with sessions() as s:
        segs = {
            job_id: hd.seg.segread(node.spool.absolute(path))
            for job_id, path in s.execute(
                select(Output.job_id, Output.path).where(Output.kind == "seg")
            )
        }
    # One nodule, one identity through three studies: each segment has the first's
    # Tracking UID, in three different SEG series.
    uids = {str(segs[j.id].SegmentSequence[0].TrackingUID) for j in (first, second, third)}
    assert len(uids) == 1
    assert len({segs[j.id].SeriesInstanceUID for j in (first, second, third)}) == 3
    assert third.summary["detection"]["findings"][0]["tracking_uid"] == uids.pop()


def test_a_prior_that_cannot_be_compared_leaves_today_s_results_whole(
    tmp_path: Path, db_url: str, sessions, request: pytest.FixtureRequest
) -> None:
    port = free_port()
    prior = phantom(8.0, generate_uid(), "20230101", SHIFT_MM)
    for ds in prior[1:3]:  # two phases at one table position: no single volume
        ds.ImagePositionPatient = list(prior[0].ImagePositionPatient)
    modalities = {"node": ["DICOMNODE", "127.0.0.1", port]}
    with Orthanc(tmp_path / "orthanc", modalities=modalities) as pacs:
        c_store(pacs.dicom_port, pacs.aet, prior)
        node = start_node(tmp_path, db_url, sessions, pacs, port, request)
        job = node.receive_and_run(phantom(12.0, generate_uid(), "20240101", np.zeros(3)))
    comparison = job.summary["comparison"]
    assert comparison["heading"] == "No comparison: the prior study could not be compared"
    assert comparison["reason"].startswith("the prior could not be compared (PermanentJobError:")
    assert len(job.summary["detection"]["findings"]) == 1  # today's results are whole
