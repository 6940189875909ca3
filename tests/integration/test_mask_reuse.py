"""A detection job reuses the lung mask a lung job already made on the same series.

Two routes on one series (as in config.example.toml): the lung model's job runs
first and records its SEG; the nodule model's job then reads that SEG back instead
of running the lung model again. Only a mask of the same model version and of the
same series generation counts; anything else, or a SEG that does not read, means
the mask is computed as before.
"""

from __future__ import annotations

import logging
import threading
from io import BytesIO
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch
from sqlalchemy import select, update

from dicomnode.config import Settings, parse_settings
from dicomnode.db import Job, JobState, Output, transaction
from dicomnode.imaging import Volume, load_registry, load_series
from dicomnode.inference import ModelCache
from dicomnode.inference.detect import detect
from dicomnode.outputs import detection_summary
from dicomnode.pipeline import Pipeline, encode
from dicomnode.queue import Worker
from dicomnode.queue.completion import sweep
from dicomnode.store import Ingestor, Spool
from tests.integration.test_pipeline import (  # noqa: F401 - scp is a fixture
    CountingSCP,
    scp,
)
from tests.unit.inference.packages import build_detection_package, build_package
from tests.unit.inference.test_detect import nodule_volume

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
MASK_STAGES = {"mask_inference_s", "mask_postprocess_s"}


class TwoRouteNode:
    """A lung route and a nodule route on every CT series, in this process."""

    def __init__(
        self,
        tmp_path: Path,
        db_url: str,
        sessions: Any,
        scp: CountingSCP,  # noqa: F811
        *,
        lung_route: bool = True,
        lung_seg: dict[str, Any] | None = None,
        nodule_route: dict[str, Any] | None = None,
    ) -> None:
        models = tmp_path / "models"
        build_package(models, "test-lungs")
        build_detection_package(models, "test-nodules", lung_model="test-lungs")
        routes = []
        if lung_route:
            routes.append({"name": "lungs", "match": {"Modality": "CT"},
                           "models": ["test-lungs"], "send_to": ["counter"],
                           "seg": lung_seg or {}})  # fmt: skip
        routes.append({"name": "nodules", "match": {"Modality": "CT"},
                       "models": ["test-nodules"], "send_to": ["counter"],
                       **(nodule_route or {})})  # fmt: skip
        self.settings: Settings = parse_settings(
            {
                "database": {"url": db_url},
                "storage": {"path": str(tmp_path / "spool")},
                "completion": {"quiet_seconds": 0},
                "worker": {"lease_seconds": 30, "retry_base_seconds": 1},
                "models": {"path": str(models)},
                "outputs": {"validate": "dciodvfy"},
                "destinations": [
                    {"name": "counter", "ae_title": "COUNTER", "host": "127.0.0.1",
                     "port": scp.port, "timeout_seconds": 5},
                ],
                "routes": routes,
            },
            environ={},
        )  # fmt: skip
        self.sessions = sessions
        self.scp = scp
        self.models = load_registry(self.settings.models.path)
        self.spool = Spool(self.settings.storage.path)
        pipeline = Pipeline(
            self.settings, sessions, self.spool, self.models, ModelCache(torch.device("cpu"))
        )
        self.worker = Worker(sessions, pipeline, self.settings.worker, threading.Event())
        scp.start()

    def receive(self, volume: Volume) -> None:
        """Store the phantom's slices as the listener would, and complete the series."""
        ingestor = Ingestor(self.spool, self.sessions)
        for k, ds in enumerate(volume.datasets):
            ds.PixelData = (volume.pixels[k] + 1024).astype(np.int16).tobytes()
            ingestor.store(encode(ds))
        assert sweep(self.sessions, self.settings, self.models, self.spool) == 1

    def run(self) -> None:
        """Run the queued jobs in the order the worker claims them."""
        while self.worker.run_once():
            pass

    def job(self, model: str, generation: int = 0) -> Job:
        with self.sessions() as s:
            job = s.scalars(
                select(Job).where(Job.model == model, Job.generation == generation)
            ).one()
            s.expunge(job)
            return job

    def computed(self, job: Job) -> dict[str, Any]:
        """Return the detection summary of a run that computes the mask on the job's input."""
        with self.sessions() as s:
            paths = [i.path for i in s.get(Job, job.id).series.instances]
        volume = load_series([self.spool.absolute(p) for p in paths])
        result = detect(
            self.models["test-nodules"],
            self.models["test-lungs"],
            volume,
            ModelCache(torch.device("cpu")),
        )
        assert "mask_inference_s" in result.timings  # it did compute the mask
        return {
            "summary": detection_summary(result, volume),
            "labels": result.labels(volume.shape),
        }


def seg_labels(ds: pydicom.Dataset, volume: Volume) -> np.ndarray:
    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(BytesIO(encode(ds))))
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[str(d.SOPInstanceUID) for d in volume.datasets],
        combine_segments=True,
        assert_missing_frames_are_empty=True,
    )
    return np.asarray(pixels)


def assert_computed_itself(job: Job) -> None:
    assert job.state == JobState.DONE, job.last_error
    assert set(job.timings) >= MASK_STAGES and "mask_load_s" not in job.timings
    assert job.summary["detection"]["mask_from_job"] is None


@pytest.mark.parametrize(
    "seg",
    [
        {},  # binary, uncompressed, empty frames left out
        # Every encoding is read back in tests/unit/outputs/test_seg_read.py; the
        # counting SCP takes uncompressed objects only.
        {"empty_frames": True},
    ],
    ids=["binary", "binary-empty-frames"],
)
def test_nodule_job_reuses_the_lung_jobs_mask(
    tmp_path: Path,
    db_url: str,
    sessions: Any,
    scp: CountingSCP,  # noqa: F811
    seg: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    node = TwoRouteNode(
        tmp_path,
        db_url,
        sessions,
        scp,
        lung_seg=seg,
        nodule_route={"requires": {"model": "test-lungs"}},
    )
    volume, _ = nodule_volume()
    node.receive(volume)
    with caplog.at_level(logging.INFO, logger="dicomnode.pipeline"):
        node.run()

    lungs, nodules = node.job("test-lungs"), node.job("test-nodules")
    assert lungs.state == JobState.DONE, lungs.last_error
    assert nodules.state == JobState.DONE, nodules.last_error
    assert nodules.summary["detection"]["mask_from_job"] == lungs.id
    assert "mask_load_s" in nodules.timings and not MASK_STAGES & set(nodules.timings)
    assert f"job {nodules.id}: reusing the mask of job {lungs.id}" in caplog.text

    # The same findings, and the same nodule voxels in its SEG, as computing the mask.
    computed = node.computed(nodules)
    found = as_computed(nodules.summary["detection"])
    assert found == computed["summary"]
    assert found["present"] is True and len(found["findings"]) == 1
    with sessions() as s:
        seg_uid = s.scalars(
            select(Output.sop_instance_uid).where(Output.job_id == nodules.id, Output.kind == "seg")
        ).one()
    sent = next(ds for ds in scp.received if ds.SOPInstanceUID == seg_uid)
    assert str(sent.SOPClassUID) == SEG
    np.testing.assert_array_equal(seg_labels(sent, volume), computed["labels"])


def as_computed(detection: dict[str, Any]) -> dict[str, Any]:
    """A job's detection summary without what only the job adds: which mask it used and
    each finding's Tracking UID (from its SEG, which a bare detection has none of)."""
    found = dict(detection)
    del found["mask_from_job"]
    findings = [dict(f) for f in found["findings"]]
    for finding in findings:
        assert finding.pop("tracking_uid")
    found["findings"] = findings
    return found


def test_without_a_lung_job_the_nodule_job_computes_the_mask(
    tmp_path: Path,
    db_url: str,
    sessions: Any,
    scp: CountingSCP,  # noqa: F811
) -> None:
    node = TwoRouteNode(tmp_path, db_url, sessions, scp, lung_route=False)
    node.receive(nodule_volume()[0])
    node.run()
    nodules = node.job("test-nodules")
    assert_computed_itself(nodules)
    found = as_computed(nodules.summary["detection"])
    assert found == node.computed(nodules)["summary"]


def test_a_lung_job_of_another_model_version_is_not_reused(
    tmp_path: Path,
    db_url: str,
    sessions: Any,
    scp: CountingSCP,  # noqa: F811
) -> None:
    node = TwoRouteNode(
        tmp_path, db_url, sessions, scp, nodule_route={"requires": {"model": "test-lungs"}}
    )
    node.receive(nodule_volume()[0])
    assert node.worker.run_once()  # the lung job
    lungs = node.job("test-lungs")
    assert lungs.state == JobState.DONE, lungs.last_error
    # As if it ran before the lung package was upgraded to the installed 0.1.
    with transaction(sessions) as s:
        s.execute(update(Job).where(Job.id == lungs.id).values(model_version="0.0"))
    node.run()
    assert_computed_itself(node.job("test-nodules"))


def test_a_lung_job_of_an_older_series_generation_is_not_reused(
    tmp_path: Path,
    db_url: str,
    sessions: Any,
    scp: CountingSCP,  # noqa: F811
) -> None:
    # Urgent: the nodule job runs before the lung job of its generation, while the
    # only lung SEG there is is that of the generation before.
    node = TwoRouteNode(tmp_path, db_url, sessions, scp, nodule_route={"priority": "urgent"})
    volume, _ = nodule_volume()
    node.receive(volume)
    node.run()
    assert node.job("test-lungs").state == JobState.DONE

    # A corrected slice re-sent under the same SOP Instance UID: the same grid (the
    # old SEG would fit it) but other pixels, so a new generation of the series.
    volume.pixels[0] += 10.0
    ingestor = Ingestor(node.spool, sessions)
    ds = volume.datasets[0]
    ds.PixelData = (volume.pixels[0] + 1024).astype(np.int16).tobytes()
    ingestor.store(encode(ds))
    assert sweep(sessions, node.settings, node.models, node.spool) == 1
    assert node.worker.run_once()  # the urgent nodule job of generation 1 first
    nodules = node.job("test-nodules", generation=1)
    assert node.job("test-lungs", generation=1).state == JobState.QUEUED
    assert_computed_itself(nodules)

    node.run()  # the lung job of generation 1; a later nodule job would reuse its mask
    assert node.job("test-lungs", generation=1).state == JobState.DONE


def test_a_lung_seg_that_is_gone_means_computing_the_mask(
    tmp_path: Path,
    db_url: str,
    sessions: Any,
    scp: CountingSCP,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    node = TwoRouteNode(
        tmp_path, db_url, sessions, scp, nodule_route={"requires": {"model": "test-lungs"}}
    )
    node.receive(nodule_volume()[0])
    assert node.worker.run_once()  # the lung job
    lungs = node.job("test-lungs")
    with sessions() as s:
        path = s.scalars(
            select(Output.path).where(Output.job_id == lungs.id, Output.kind == "seg")
        ).one()
    node.spool.absolute(path).unlink()  # e.g. an admin cleaned the results folder
    with caplog.at_level(logging.INFO, logger="dicomnode.pipeline"):
        node.run()
    nodules = node.job("test-nodules")
    assert_computed_itself(nodules)
    assert (
        f"job {nodules.id}: not reusing the mask of job {lungs.id} (the SEG file is gone)"
        in caplog.text
    )
