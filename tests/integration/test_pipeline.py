"""Jobs through the real pipeline and worker, with a small model and a counting SCP.

The destination is a pynetdicom storage SCP on loopback that records what it
receives, so delivery failures and retries can be staged and checked from both
sides: the job table and the receiver.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, evt
from sqlalchemy import select, update

from dicomnode.config import Settings, parse_settings
from dicomnode.db import (
    Delivery,
    DeliveryState,
    Job,
    JobState,
    Output,
    Series,
    jobs,
    transaction,
    utcnow,
)
from dicomnode.db.models import JobEvent
from dicomnode.errors import JobSuperseded, PermanentJobError
from dicomnode.imaging import load_registry
from dicomnode.inference import ModelCache
from dicomnode.pipeline import Pipeline, encode
from dicomnode.queue import Worker
from dicomnode.queue.completion import sweep
from dicomnode.store import Ingestor, Spool
from tests.conftest import free_port
from tests.factories import ct_series, lung_phantom
from tests.unit.inference.packages import build_package


class CountingSCP:
    """A storage SCP that keeps what it receives; it can be stopped and started again."""

    def __init__(self, port: int, status: int = 0x0000) -> None:
        self.port = port
        self.status = status
        self.refuse: set[str] = set()  # SOP classes not to accept at negotiation
        self.received: list[Dataset] = []
        self.server = None

    def _on_store(self, event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        self.received.append(ds)
        return self.status

    def start(self) -> CountingSCP:
        ae = AE(ae_title="COUNTER")
        ae.supported_contexts = [
            c for c in AllStoragePresentationContexts if c.abstract_syntax not in self.refuse
        ]
        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None


@pytest.fixture
def scp() -> Iterator[CountingSCP]:
    receiver = CountingSCP(free_port())
    yield receiver
    receiver.stop()


def make_settings(
    tmp_path: Path,
    db_url: str,
    scp_port: int,
    models: Path | None = None,
    model: str = "",
    overlay: bool = False,
) -> Settings:
    """Settings for one CT route to ``model`` (the test lung package, built here, by
    default) with its results sent to the counting SCP on ``scp_port``; ``overlay``
    adds the Secondary Capture overlay series."""
    if models is None:
        models = tmp_path / "models"
        build_package(models)
    return parse_settings(
        {
            "database": {"url": db_url},
            "storage": {"path": str(tmp_path / "spool")},
            "completion": {"quiet_seconds": 0},
            "worker": {"lease_seconds": 30, "retry_base_seconds": 1},
            "models": {"path": str(models)},
            "outputs": {"validate": "dciodvfy"},
            "destinations": [
                {"name": "counter", "ae_title": "COUNTER", "host": "127.0.0.1",
                 "port": scp_port, "timeout_seconds": 5},
            ],
            "routes": [
                {"name": "lungs", "match": {"Modality": "CT"}, "models": [model or "test-lungs"],
                 "send_to": ["counter"], "overlay": overlay},
            ],
        },
        environ={},
    )  # fmt: skip


@pytest.fixture
def node(tmp_path: Path, db_url: str, sessions, scp: CountingSCP):
    settings = make_settings(tmp_path, db_url, scp.port)
    models = load_registry(settings.models.path)
    spool = Spool(settings.storage.path)
    pipeline = Pipeline(settings, sessions, spool, models, ModelCache(torch.device("cpu")))
    stop = threading.Event()
    worker = Worker(sessions, pipeline, settings.worker, stop)
    return {"settings": settings, "models": models, "spool": spool, "worker": worker,
            "stop": stop, "sessions": sessions}  # fmt: skip


def receive_phantom(node: dict, **kwargs: object) -> list[Dataset]:
    datasets = ct_series(lung_phantom(), **kwargs)
    ingestor = Ingestor(node["spool"], node["sessions"])
    for ds in datasets:
        ingestor.store(encode(ds))
    assert sweep(node["sessions"], node["settings"], node["models"], node["spool"]) == 1
    return datasets


def job_row(sessions) -> Job:
    with sessions() as s:
        job = s.scalars(select(Job)).one()
        s.expunge(job)
        return job


def test_job_runs_and_delivers_seg_and_sr(node: dict, scp: CountingSCP, sessions) -> None:
    scp.start()
    sources = receive_phantom(node)
    assert node["worker"].run_once()
    job = job_row(sessions)
    assert job.state == JobState.DONE and job.attempts == 1 and job.last_error is None
    assert {"load_s", "inference_s", "seg_s", "sr_s", "send_s"} <= set(job.timings)
    assert [s["label"] for s in job.summary["segments"]] == ["Left lung", "Right lung"]
    received = {str(ds.SOPClassUID): ds for ds in scp.received}
    assert set(received) == {"1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.88.34"}
    for ds in scp.received:
        assert ds.StudyInstanceUID == sources[0].StudyInstanceUID
    assert not node["worker"].run_once()  # nothing else to do


def test_route_with_overlay_also_sends_a_secondary_capture(
    tmp_path: Path, db_url: str, sessions, scp: CountingSCP
) -> None:
    settings = make_settings(tmp_path, db_url, scp.port, overlay=True)
    models = load_registry(settings.models.path)
    spool = Spool(settings.storage.path)
    pipeline = Pipeline(settings, sessions, spool, models, ModelCache(torch.device("cpu")))
    worker = Worker(sessions, pipeline, settings.worker, threading.Event())
    node = {"settings": settings, "models": models, "spool": spool, "sessions": sessions}
    scp.start()
    sources = receive_phantom(node)
    assert worker.run_once()
    job = job_row(sessions)
    assert job.state == JobState.DONE, job.last_error
    assert "sc_s" in job.timings
    received = {str(ds.SOPClassUID): ds for ds in scp.received}
    assert set(received) == {
        "1.2.840.10008.5.1.4.1.1.66.4",
        "1.2.840.10008.5.1.4.1.1.88.34",
        "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color Secondary Capture
    }
    sc = received["1.2.840.10008.5.1.4.1.1.7.4"]
    assert sc.StudyInstanceUID == sources[0].StudyInstanceUID
    assert sc.PhotometricInterpretation == "RGB" and sc.BurnedInAnnotation == "YES"
    assert sc.SeriesInstanceUID not in {d.SeriesInstanceUID for d in scp.received if d is not sc}
    assert sc.SeriesDescription == "AI test-lungs overlay - RESEARCH, NOT FOR CLINICAL USE"
    referenced = {i.ReferencedSOPInstanceUID for i in sc.SourceImageSequence}
    assert referenced <= {d.SOPInstanceUID for d in sources} and referenced
    with sessions() as s:
        kinds = sorted(o.kind for o in s.scalars(select(Output)))
    assert kinds == ["sc", "seg", "sr"]


def test_pacs_down_then_up_resends_without_rerunning_the_model(
    node: dict, scp: CountingSCP, sessions
) -> None:
    receive_phantom(node)
    assert node["worker"].run_once()  # the destination is not listening
    job = job_row(sessions)
    assert job.state == JobState.QUEUED and job.attempts == 1
    assert "destination counter: cannot connect" in job.last_error
    assert job.run_after > utcnow()  # backoff
    with sessions() as s:
        outputs = s.scalars(select(Output)).all()
        assert sorted(o.kind for o in outputs) == ["seg", "sr"]  # made and kept
        delivery = s.scalars(select(Delivery)).one()
        assert delivery.state == DeliveryState.PENDING and delivery.attempts == 1
    first_inference = job.timings["inference_s"]

    scp.start()
    with transaction(sessions) as s:
        s.execute(update(Job).values(run_after=utcnow() - timedelta(seconds=1)))
    assert node["worker"].run_once()
    job = job_row(sessions)
    assert job.state == JobState.DONE and job.attempts == 2
    assert job.timings["inference_s"] == first_inference  # not run again
    assert len(scp.received) == 2
    with sessions() as s:
        delivery = s.scalars(select(Delivery)).one()
        assert delivery.state == DeliveryState.SENT and delivery.attempts == 2
        assert len(s.scalars(select(Output)).all()) == 2


def test_destination_refusing_fails_the_job(node: dict, scp: CountingSCP, sessions) -> None:
    scp.status = 0xA900  # "data set does not match SOP class": sending again will not help
    scp.start()
    receive_phantom(node)
    assert node["worker"].run_once()
    job = job_row(sessions)
    assert job.state == JobState.FAILED
    assert "C-STORE failed with status 0xA900" in job.last_error
    with sessions() as s:
        assert s.scalars(select(Delivery)).one().state == DeliveryState.FAILED


def test_series_the_model_cannot_take_fails_at_once(node: dict, scp: CountingSCP, sessions) -> None:
    scp.start()
    receive_phantom(
        node, positions=lambda k: (0.0, 0.0, [0, 2, 4, 9, 11, 13, 15, 17, 19, 21, 23, 25][k])
    )
    assert node["worker"].run_once()
    job = job_row(sessions)
    assert job.state == JobState.FAILED and job.attempts == 1
    assert "uneven slice spacing" in job.last_error
    assert scp.received == []


def test_stopping_worker_releases_the_job(node: dict, scp: CountingSCP, sessions) -> None:
    scp.start()
    receive_phantom(node)
    node["stop"].set()  # shutting down before the first stage
    assert node["worker"].run_once()
    job = job_row(sessions)
    assert job.state == JobState.QUEUED and job.attempts == 0 and job.lease_owner is None
    assert scp.received == []


def test_malformed_birth_date_does_not_fail_the_job_or_leak(
    node: dict, scp: CountingSCP, sessions
) -> None:
    scp.start()
    datasets = ct_series(lung_phantom(), patient_name="ROE^RICHARD")
    for ds in datasets:
        ds.PatientBirthDate = "1970013"  # not a valid DA; highdicom would refuse it
    ingestor = Ingestor(node["spool"], sessions)
    for ds in datasets:
        ingestor.store(encode(ds))
    sweep(sessions, node["settings"], node["models"], node["spool"])
    assert node["worker"].run_once()
    job = job_row(sessions)
    assert job.state == JobState.DONE, job.last_error
    assert len(scp.received) == 2
    assert all(ds.PatientBirthDate == "" for ds in scp.received)


def test_job_of_a_reopened_series_is_cancelled_not_run(
    node: dict, scp: CountingSCP, sessions
) -> None:
    scp.start()
    receive_phantom(node)
    claim = jobs.claim(sessions, "other-worker", 60)  # a job that was already running...
    assert claim is not None
    late = ct_series(lung_phantom(slices=1))[0]  # ...when a late instance arrives
    with sessions() as s:
        series_uid = s.scalars(select(Job)).one().series.series_uid
        study_uid = s.scalars(select(Job)).one().series.study.study_uid
    late.SeriesInstanceUID, late.StudyInstanceUID = series_uid, study_uid
    late.ImagePositionPatient = [-100.0, -100.0, -50.0 + 2.0 * 12]
    Ingestor(node["spool"], sessions).store(encode(late))
    with pytest.raises(JobSuperseded):
        node["worker"].pipeline.run(claim, lambda: False)
    assert scp.received == []


def test_destination_without_the_sop_class_fails_before_sending(
    node: dict, scp: CountingSCP, sessions
) -> None:
    scp.refuse = {"1.2.840.10008.5.1.4.1.1.88.34"}  # a PACS that cannot store 3D SR
    scp.start()
    receive_phantom(node)
    assert node["worker"].run_once()
    job = job_row(sessions)
    assert job.state == JobState.FAILED
    assert "does not accept SOP class 1.2.840.10008.5.1.4.1.1.88.34" in job.last_error
    assert scp.received == []  # not half a result set


def claimed_job(node: dict, scp: CountingSCP, sessions) -> tuple[Pipeline, jobs.Claim]:
    """A received phantom whose job this test holds, with the receiver listening."""
    scp.start()
    receive_phantom(node)
    claim = jobs.claim(sessions, "test", 60)
    assert claim is not None
    return node["worker"].pipeline, claim


def test_route_gone_or_model_changed_fails_the_job_clearly(
    node: dict, scp: CountingSCP, sessions
) -> None:
    pipeline, claim = claimed_job(node, scp, sessions)
    without_route = dataclasses.replace(node["settings"], routes=[])
    gone = Pipeline(without_route, sessions, node["spool"], node["models"], pipeline.cache)
    with pytest.raises(PermanentJobError, match="route lungs is no longer configured"):
        gone.run(claim, lambda: False)
    spec = node["models"]["test-lungs"]
    newer = {"test-lungs": dataclasses.replace(spec, version="0.2")}
    changed = Pipeline(node["settings"], sessions, node["spool"], newer, pipeline.cache)
    with pytest.raises(PermanentJobError, match=r"now version 0\.2, job wants 0\.1"):
        changed.run(claim, lambda: False)
    assert scp.received == []


def test_object_failing_validation_is_not_sent_and_kept_aside(
    node: dict, scp: CountingSCP, sessions
) -> None:
    pipeline, claim = claimed_job(node, scp, sessions)
    ctx = pipeline._context(claim)
    built, summary, timings = pipeline._make_outputs(ctx, pipeline._route(ctx), lambda: None)
    seg = next(b for b in built if b.kind == "seg")
    # A defect only dciodvfy catches: a Code String in lower case.
    seg.dataset.ContentLabel = "lower case"
    with pytest.raises(PermanentJobError, match=r"failed validation: Error .*kept at rejected/"):
        pipeline._store_outputs(claim, ctx, built, summary, timings)
    spool = node["spool"].root
    assert list((spool / "rejected").rglob("*.dcm"))
    assert not (spool / "results").exists() or not list((spool / "results").rglob("*.dcm"))
    with sessions() as s:
        assert s.scalars(select(Output)).all() == []
    assert scp.received == []


def test_object_failing_our_own_checks_is_not_sent_either(
    node: dict, scp: CountingSCP, sessions
) -> None:
    pipeline, claim = claimed_job(node, scp, sessions)
    ctx = pipeline._context(claim)
    built, summary, timings = pipeline._make_outputs(ctx, pipeline._route(ctx), lambda: None)
    seg = next(b for b in built if b.kind == "seg")
    del seg.dataset.SegmentSequence  # highdicom cannot read it back as a SEG
    with pytest.raises(
        PermanentJobError, match=r"failed our checks: does not parse as its IOD.*kept at rejected/"
    ):
        pipeline._store_outputs(claim, ctx, built, summary, timings)
    assert scp.received == []


def gated_node(tmp_path: Path, db_url: str, sessions, scp: CountingSCP, requires: dict) -> dict:
    """Two routes: the lung model, and a second model that needs the lungs' verdict."""
    models = tmp_path / "models"
    build_package(models)
    build_package(models, "second-model")
    settings = parse_settings(
        {
            "database": {"url": db_url},
            "storage": {"path": str(tmp_path / "spool")},
            "completion": {"quiet_seconds": 0},
            "worker": {"lease_seconds": 30, "retry_base_seconds": 1},
            "models": {"path": str(models)},
            "outputs": {"validate": "off"},
            "destinations": [
                {"name": "counter", "ae_title": "COUNTER", "host": "127.0.0.1",
                 "port": scp.port, "timeout_seconds": 5},
            ],
            "routes": [
                {"name": "gated", "match": {"Modality": "CT"}, "models": ["second-model"],
                 "send_to": ["counter"], "requires": requires},
                {"name": "lungs", "match": {"Modality": "CT"}, "models": ["test-lungs"],
                 "send_to": ["counter"]},
            ],
        },
        environ={},
    )  # fmt: skip
    registry = load_registry(settings.models.path)
    spool = Spool(settings.storage.path)
    pipeline = Pipeline(settings, sessions, spool, registry, ModelCache(torch.device("cpu")))
    worker = Worker(sessions, pipeline, settings.worker, threading.Event())
    return {"settings": settings, "models": registry, "spool": spool, "worker": worker,
            "sessions": sessions}  # fmt: skip


def jobs_by_model(sessions) -> dict[str, Job]:
    with sessions() as s:
        rows = s.scalars(select(Job)).all()
        for job in rows:
            s.expunge(job)
        return {j.model: j for j in rows}


def receive_gated(node: dict, **kwargs: object) -> None:
    ingestor = Ingestor(node["spool"], node["sessions"])
    for ds in ct_series(lung_phantom(), **kwargs):
        ingestor.store(encode(ds))
    assert sweep(node["sessions"], node["settings"], node["models"], node["spool"]) == 1


def test_a_route_waits_for_another_models_verdict(
    tmp_path: Path, db_url: str, sessions, scp: CountingSCP
) -> None:
    scp.start()
    requires = {"model": "test-lungs", "min_volume_ml": 1, "min_slices": 5, "axial": True}
    node = gated_node(tmp_path, db_url, sessions, scp, requires)
    receive_gated(node)
    # The gated job comes first (its route is first) and must wait for the lungs.
    assert node["worker"].run_once()
    gated = jobs_by_model(sessions)["second-model"]
    assert gated.state == JobState.QUEUED and gated.attempts == 0
    assert gated.last_error == "waiting for test-lungs on this series"
    assert node["worker"].run_once()  # the lungs job
    assert jobs_by_model(sessions)["test-lungs"].state == JobState.DONE
    with transaction(sessions) as s:
        s.execute(update(Job).values(run_after=utcnow() - timedelta(seconds=1)))
    assert node["worker"].run_once()
    gated = jobs_by_model(sessions)["second-model"]
    assert gated.state == JobState.DONE and gated.attempts == 1
    assert len(scp.received) == 4  # SEG and SR from each model


@pytest.mark.parametrize(
    ("requires", "kwargs", "reason"),
    [
        ({"min_slices": 50}, {}, "content check: 12 slices, fewer than the 50 required"),
        ({"axial": True}, {"orientation": (0, 1, 0, 0, 0, -1)},
         "content check: slices are not axial (90 degrees from head-foot)"),
        ({"model": "test-lungs", "min_volume_ml": 10**6}, {},
         "content check: test-lungs found"),
    ],
)  # fmt: skip
def test_a_series_failing_the_checks_is_cancelled_with_the_reason(
    tmp_path: Path, db_url: str, sessions, scp: CountingSCP, requires, kwargs, reason
) -> None:
    scp.start()
    node = gated_node(tmp_path, db_url, sessions, scp, requires)
    receive_gated(node, **kwargs)
    for _ in range(6):  # until both ended; a postponed job waits, so wake it when idle
        if not node["worker"].run_once():
            with transaction(sessions) as s:
                s.execute(update(Job).values(run_after=utcnow() - timedelta(seconds=1)))
    gated = jobs_by_model(sessions)["second-model"]
    assert gated.state == JobState.CANCELLED and gated.last_error.startswith(reason)
    with sessions() as s:
        notes = s.scalars(select(JobEvent.note).where(JobEvent.job_id == gated.id)).all()
    assert notes[-1] == gated.last_error


def test_a_job_whose_series_was_reopened_while_it_ran_stores_and_sends_nothing(
    node: dict, scp: CountingSCP, sessions
) -> None:
    pipeline, claim = claimed_job(node, scp, sessions)
    ctx = pipeline._context(claim)
    built, summary, timings = pipeline._make_outputs(ctx, pipeline._route(ctx), lambda: None)
    with transaction(sessions) as s:  # a late image arrives meanwhile
        s.execute(update(Series).values(generation=Series.generation + 1))
    with pytest.raises(JobSuperseded, match="re-opened the series"):
        pipeline._store_outputs(claim, ctx, built, summary, timings)
    with sessions() as s:
        assert s.scalars(select(Output)).all() == []
    assert scp.received == []
