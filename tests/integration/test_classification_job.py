"""Classification jobs through the real pipeline: one SR with the series' class, no SEG.

The SR passes dciodvfy before it leaves and is read back with highdicom.
"""

from __future__ import annotations

import threading
from pathlib import Path

import highdicom as hd
import pytest
import torch
from pydicom.sr.codedict import codes

from dicomnode.db import JobState
from dicomnode.evaluate.sr_findings import read_verdicts
from dicomnode.imaging import load_registry
from dicomnode.inference import ModelCache
from dicomnode.pipeline import Pipeline, encode
from dicomnode.queue import Worker
from dicomnode.queue.completion import sweep
from dicomnode.store import Ingestor, Spool
from tests.factories import ct_series, lung_phantom
from tests.integration.test_pipeline import (  # noqa: F401 - scp is a fixture
    CountingSCP,
    job_row,
    make_settings,
    scp,
)
from tests.unit.inference.packages import build_classification_package

LUNG = hd.sr.CodedConcept("39607008", "SCT", "Lung")


def run_classification(tmp_path: Path, db_url: str, sessions, scp: CountingSCP, kind: str):  # noqa: F811
    models = tmp_path / "models"
    build_classification_package(models, "test-classes", kind=kind)
    settings = make_settings(tmp_path, db_url, scp.port, models=models, model="test-classes")
    registry = load_registry(settings.models.path)
    spool = Spool(settings.storage.path)
    ingestor = Ingestor(spool, sessions)
    for ds in ct_series(lung_phantom(slices=10)):
        ingestor.store(encode(ds))
    assert sweep(sessions, settings, registry, spool) == 1
    scp.start()
    pipeline = Pipeline(settings, sessions, spool, registry, ModelCache(torch.device("cpu")))
    assert Worker(sessions, pipeline, settings.worker, threading.Event()).run_once()
    job = job_row(sessions)
    assert job.state == JobState.DONE, job.last_error
    assert [str(ds.SOPClassUID) for ds in scp.received] == ["1.2.840.10008.5.1.4.1.1.88.34"]
    content = hd.sr.Comprehensive3DSR.from_dataset(scp.received[0]).content
    # No measurement group: the verdict has no place on an image (OHIF 3 drops a
    # report whose groups have no coordinates), so it is a Qualitative Evaluation.
    assert content.get_image_measurement_groups() == []
    ((question, (answer, probability)),) = read_verdicts(scp.received[0]).items()
    assert question == ("Lung" if kind == "logits" else "Finding")
    return job, answer, probability


def test_one_class_present_with_its_probability(
    tmp_path: Path,
    db_url: str,
    sessions,
    scp: CountingSCP,  # noqa: F811
) -> None:
    job, answer, probability = run_classification(tmp_path, db_url, sessions, scp, "logits")
    assert job.summary["classification"]["class"] == "Lungs visible"
    assert job.summary["classification"]["probabilities"]["Lungs visible"] == pytest.approx(0.8)
    assert answer == codes.SCT.Present
    assert probability == pytest.approx(0.8, abs=1e-4)
    assert "inference_s" in job.timings and "seg_s" not in job.timings


def test_softmax_reports_the_chosen_class_as_the_finding(
    tmp_path: Path,
    db_url: str,
    sessions,
    scp: CountingSCP,  # noqa: F811
) -> None:
    job, answer, probability = run_classification(tmp_path, db_url, sessions, scp, "softmax")
    assert job.summary["classification"]["class"] == "Lungs visible"
    assert answer == LUNG  # the chosen class is the answer
    assert probability == pytest.approx(0.8, abs=1e-4)
