"""Priors from a real PACS: Orthanc answers C-FIND and C-MOVEs the prior to our listener.

The node's own listener receives what Orthanc sends (the durable path, like any
image); the priors stage then chooses the series to compare with. A PACS that
refuses, has nothing, is down or says nothing: the job goes on without, and says why.
"""

from __future__ import annotations

import argparse
import socket
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from sqlalchemy import select

from dicomnode.cli.job_output import print_job
from dicomnode.config import ListenerSettings, Settings, parse_settings
from dicomnode.db import Job, Series, jobs, transaction, utcnow
from dicomnode.db.jobs import Claim
from dicomnode.db.queries import detail_of
from dicomnode.errors import JobInterrupted, WaitingForPriors
from dicomnode.imaging import load_registry
from dicomnode.listener import Listener
from dicomnode.pipeline import encode
from dicomnode.pipeline.priors import Priors, resolve
from dicomnode.queue.completion import sweep
from dicomnode.store import Ingestor, Spool
from tests.conftest import free_port
from tests.factories import ct_series
from tests.integration.orthanc import Orthanc

pytestmark = pytest.mark.system

PATIENT = "PRIOR-TEST-01"


def study(date: str, *, patient: str = PATIENT, slices: int = 6) -> list[Dataset]:
    """A study of one thin axial CT series and a localizer, on ``date``."""
    study_uid = generate_uid()
    thin = ct_series(np.zeros((slices, 8, 8), np.float32), patient_id=patient)
    scout = ct_series(np.zeros((1, 8, 8), np.float32), patient_id=patient)
    for number, series in ((2, thin), (1, scout)):
        for ds in series:
            ds.StudyInstanceUID, ds.StudyDate, ds.SeriesNumber = study_uid, date, number
    for ds in scout:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    return thin + scout


def c_store(port: int, called: str, datasets: list[Dataset]) -> None:
    ae = AE(ae_title="UPLOADER")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established
    try:
        for ds in datasets:
            assert assoc.send_c_store(ds).Status == 0
    finally:
        assoc.release()


def settings_for(tmp_path: Path, listener_port: int, pacs_port: int, **priors: Any) -> Settings:
    return parse_settings(
        {
            "listener": {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": listener_port},
            "storage": {"path": str(tmp_path / "spool")},
            "destinations": [{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1",
                              "port": pacs_port, "timeout_seconds": 3}],
            "routes": [{"name": "lung-study", "scope": "study", "match": {"Modality": "CT"},
                        "models": ["lung-unet2d"], "send_to": ["pacs"],
                        "priors": {"destination": "pacs", "match": {"Modality": "CT"}, **priors}}],
        },
        environ={},
    )  # fmt: skip


class Node:
    """The listener (the move destination) and a job on the current study."""

    def __init__(self, tmp_path: Path, sessions, settings: Settings, current: list[Dataset]):
        self.settings, self.sessions = settings, sessions
        self.spool = Spool(settings.storage.path)
        self.listener = Listener(
            ListenerSettings(ae_title="DICOMNODE", host="127.0.0.1", port=settings.listener.port),
            Ingestor(self.spool, sessions),
        )
        self.listener.start()
        ingestor = Ingestor(self.spool, sessions)
        for ds in current:
            ingestor.store(encode(ds))
        later = utcnow() + timedelta(seconds=31)
        sweep(sessions, settings, load_registry(None), self.spool, now=later)
        self.current = current[0]
        with transaction(sessions) as s:
            series = s.scalars(
                select(Series).where(Series.series_uid == current[0].SeriesInstanceUID)
            ).one()
            job = jobs.enqueue(s, series, route="lung-study", model="lung-unet2d", version="1",
                               max_attempts=3)  # fmt: skip
            assert job is not None
            self.job_id = job.id

    def claim(self) -> Claim:
        claim = jobs.claim(self.sessions, "w1", 60)
        assert claim is not None and claim.job_id == self.job_id
        return claim

    def resolve(self) -> Priors:
        route = self.settings.routes[0]
        return resolve(self.settings, self.sessions, self.spool, route, self.job_id,
                       self.current, checkpoint=lambda: None)  # fmt: skip

    def record(self) -> dict[str, Any]:
        with self.sessions() as s:
            return s.scalar(select(Job.priors).where(Job.id == self.job_id))


@pytest.fixture
def node(request: pytest.FixtureRequest) -> Iterator[list[Node]]:
    made: list[Node] = []
    yield made
    for n in made:
        n.listener.stop()


def test_a_prior_on_the_pacs_is_found_moved_here_and_stored_as_a_prior(
    tmp_path: Path, sessions, node: list[Node], capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    prior = study("20220301")
    older = study("20150101")  # beyond within_days: never asked for
    other = study("20230101", patient="SOMEONE-ELSE")
    with Orthanc(
        tmp_path / "orthanc", modalities={"node": ["DICOMNODE", "127.0.0.1", port]}
    ) as pacs:
        c_store(pacs.dicom_port, pacs.aet, prior + older + other)
        settings = settings_for(tmp_path, port, pacs.dicom_port, within_days=1500)
        current = study("20240101")
        node.append(Node(tmp_path, sessions, settings, current[:6]))
        found = node[0].resolve()

    thin = prior[0].SeriesInstanceUID
    assert [(p.study_uid, p.series_uid, str(p.study_date)) for p in found.found] == [
        (prior[0].StudyInstanceUID, thin, "2022-03-01")
    ]
    record = node[0].record()
    assert record["source"] == "pacs" and record["reason"] is None
    assert record["studies"][0]["chosen"] == thin
    with sessions() as s:
        stored = {x.series_uid: (x.prior, x.instance_count) for x in s.scalars(select(Series))}
    # The thin series came (six images, durable, marked as a prior); the localizer,
    # the older study and the other patient's did not.
    assert stored[thin] == (True, 6)
    assert prior[-1].SeriesInstanceUID not in stored
    assert older[0].SeriesInstanceUID not in stored and other[0].SeriesInstanceUID not in stored
    # A prior runs no routes of its own, though the route matches CT.
    later = utcnow() + timedelta(seconds=31)
    assert sweep(sessions, settings, load_registry(None), node[0].spool, now=later) == 1
    with sessions() as s:
        assert {j.series.series_uid for j in s.scalars(select(Job))} == {
            current[0].SeriesInstanceUID
        }
    # Orthanc is gone now: the next job of the patient finds the prior on this node.
    again = node[0].resolve()
    assert [p.series_uid for p in again.found] == [thin]
    assert node[0].record()["source"] == "node"
    # `jobs show` says which prior and where it came from.
    with sessions() as s:
        detail = detail_of(s.get(Job, node[0].job_id))
    print_job(detail, argparse.Namespace(json=False))
    out = capsys.readouterr().out.splitlines()
    assert "priors        from this node" in out
    assert f"  study {prior[0].StudyInstanceUID} (2022-03-01): {thin}" in out


def test_a_pacs_that_refuses_or_has_nothing_lets_the_job_go_on_and_says_why(
    tmp_path: Path, sessions, node: list[Node]
) -> None:
    port = free_port()
    # It answers C-FIND and C-MOVE from anyone, but does not know our AE title as a move
    # destination.
    extra = {"DicomAlwaysAllowFind": True, "DicomAlwaysAllowMove": True}
    with Orthanc(tmp_path / "orthanc", extra=extra) as pacs:
        c_store(pacs.dicom_port, pacs.aet, study("20220301"))
        settings = settings_for(tmp_path, port, pacs.dicom_port)
        node.append(Node(tmp_path, sessions, settings, study("20240101")[:6]))
        refused = node[0].resolve()
        assert refused.found == []
        # Orthanc answers 0xC000 (Unable to process) for a move destination it does not know.
        assert (
            node[0]
            .record()["reason"]
            .startswith("destination pacs: C-MOVE failed with status 0xC000")
        )
        # Another patient, nothing on the PACS.
        node[0].current = study("20240101", patient="NO-PRIORS")[0]
        assert node[0].resolve().found == []
        assert (
            node[0].record()["reason"] == "no earlier study of the patient on pacs within 1500 days"
        )


def _silent_server() -> tuple[socket.socket, threading.Event]:
    """A peer that accepts connections and never says anything."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    stop = threading.Event()

    def hold() -> None:
        held = []
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue
        for conn in held:
            conn.close()

    threading.Thread(target=hold, daemon=True).start()
    return server, stop


@pytest.mark.parametrize("pacs", ["down", "silent"])
def test_a_pacs_that_is_down_or_silent_delays_the_job_then_it_goes_on_without(
    tmp_path: Path, sessions, node: list[Node], pacs: str
) -> None:
    if pacs == "down":
        pacs_port, server, stop = free_port(), None, None
    else:
        server, stop = _silent_server()
        pacs_port = server.getsockname()[1]
    try:
        settings = settings_for(tmp_path, free_port(), pacs_port, wait_seconds=2)
        node.append(Node(tmp_path, sessions, settings, study("20240101")[:6]))
        claim = node[0].claim()
        with pytest.raises(WaitingForPriors) as waiting:
            node[0].resolve()
        assert waiting.value.seconds == 2
        # As the worker does: back to the queue, the attempt not counted.
        assert jobs.postpone(sessions, claim, waiting.value.seconds, str(waiting.value))
        time.sleep(2.2)
        node[0].claim()
        gave_up = node[0].resolve()
    finally:
        if server is not None and stop is not None:
            stop.set()
            server.close()
    assert gave_up.found == []
    reason = node[0].record()["reason"]
    assert reason.startswith("gave up after 2 s: destination pacs: ")
    expected = "cannot connect" if pacs == "down" else "association"
    assert expected in reason, reason


def test_a_stop_between_retrievals_interrupts_cleanly(
    tmp_path: Path, sessions, node: list[Node]
) -> None:
    port = free_port()
    with Orthanc(
        tmp_path / "orthanc", modalities={"node": ["DICOMNODE", "127.0.0.1", port]}
    ) as pacs:
        c_store(pacs.dicom_port, pacs.aet, study("20220301"))
        settings = settings_for(tmp_path, port, pacs.dicom_port)
        node.append(Node(tmp_path, sessions, settings, study("20240101")[:6]))

        def stop() -> None:
            raise JobInterrupted("stopping")

        with pytest.raises(JobInterrupted):
            resolve(settings, sessions, node[0].spool, settings.routes[0], node[0].job_id,
                    node[0].current, checkpoint=stop)  # fmt: skip
    assert node[0].record() is None  # nothing decided: the next attempt asks again


def test_c_get_brings_the_prior_on_the_node_s_own_association(
    tmp_path: Path, sessions, node: list[Node]
) -> None:
    prior = study("20220301")
    # Orthanc knows nobody: no move destination to configure for a C-GET.
    extra = {"DicomAlwaysAllowFind": True, "DicomAlwaysAllowGet": True}
    with Orthanc(tmp_path / "orthanc", extra=extra) as pacs:
        c_store(pacs.dicom_port, pacs.aet, prior)
        settings = settings_for(tmp_path, free_port(), pacs.dicom_port, retrieve="get")
        node.append(Node(tmp_path, sessions, settings, study("20240101")[:6]))
        found = node[0].resolve()
    thin = prior[0].SeriesInstanceUID
    assert [p.series_uid for p in found.found] == [thin]
    assert node[0].record()["source"] == "pacs"
    with sessions() as s:
        row = s.scalars(select(Series).where(Series.series_uid == thin)).one()
        calling = {i.calling_ae for i in row.instances}
    assert (row.prior, row.instance_count, calling) == (True, 6, {"ORTHANC"})
