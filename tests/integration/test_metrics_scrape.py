"""The Prometheus endpoint scraped over HTTP after a whole node ran a job end to end.

A real node (listener, completion sweep, worker, metrics endpoint) receives a CT
series over DICOM, runs the test lung model and sends the SEG and SR to a counting
SCP; then ``/metrics`` must count what happened and ``/healthz`` must answer.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage
from sqlalchemy import func, select

pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families

from dicomnode.config import Settings, parse_settings
from dicomnode.db import Job, JobState
from dicomnode.node import Node
from tests.conftest import free_port, wait_for
from tests.factories import ct_series, lung_phantom
from tests.integration.counting_scp import CountingSCP
from tests.unit.inference.packages import build_package

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def settings_for(tmp_path: Path, pacs_port: int) -> Settings:
    models = tmp_path / "models"
    build_package(models)
    return parse_settings(
        {
            "listener": {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": free_port()},
            "database": {"url": f"sqlite:///{tmp_path / 'node.db'}"},
            "storage": {"path": str(tmp_path / "spool"), "min_free_mb": 0},
            "completion": {"quiet_seconds": 0, "counted_quiet_seconds": 0,
                           "sweep_seconds": 0.2},
            "worker": {"poll_seconds": 0.2, "device": "cpu", "backend": "torch"},
            "models": {"path": str(models)},
            "outputs": {"validate": "off"},
            "metrics": {"enabled": True, "host": "127.0.0.1", "port": free_port()},
            "destinations": [
                {"name": "counter", "ae_title": "COUNTER", "host": "127.0.0.1",
                 "port": pacs_port, "timeout_seconds": 10},
            ],
            "routes": [
                {"name": "lungs", "match": {"Modality": "CT"}, "models": ["test-lungs"],
                 "send_to": ["counter"]},
            ],
        },
        environ={},
    )  # fmt: skip


@pytest.fixture
def pacs() -> Iterator[CountingSCP]:
    with CountingSCP() as scp:
        yield scp


@pytest.fixture
def node(tmp_path: Path, pacs: CountingSCP) -> Iterator[Node]:
    running = Node.from_settings(settings_for(tmp_path, pacs.port))
    running.start()
    try:
        yield running
    finally:
        running.stop(timeout=30)


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(node: Node) -> Samples:
    assert node.metrics is not None
    status, body = get(f"http://127.0.0.1:{node.metrics.port}/metrics")
    assert status == 200
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def associate(node: Node, called: str = "DICOMNODE"):
    assert node.listener is not None
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    return ae.associate("127.0.0.1", node.listener.port, ae_title=called)


def send(node: Node, datasets: list[Dataset]) -> None:
    assoc = associate(node)
    assert assoc.is_established
    try:
        for ds in datasets:
            assert int(assoc.send_c_store(ds).Status) == 0x0000
    finally:
        assoc.release()


def jobs_by_state(node: Node) -> dict[str, int]:
    with node.sessions() as session:
        rows = session.execute(select(Job.state, func.count()).group_by(Job.state)).all()
    return {str(state): int(n) for state, n in rows}


def test_scrape_after_an_end_to_end_job(node: Node, pacs: CountingSCP) -> None:
    datasets = ct_series(lung_phantom())
    send(node, datasets)
    rejected = associate(node, called="NOT-US")  # a sender calling another node
    assert rejected.is_rejected
    assert wait_for(lambda: jobs_by_state(node).get("done") == 1, timeout=240), jobs_by_state(node)
    assert wait_for(lambda: len(pacs.segs()) == 1 and len(pacs.srs()) == 1, timeout=10)

    samples = scrape(node)
    assert value(samples, "dicomnode_instances_received_total") == len(datasets)
    assert value(samples, "dicomnode_received_bytes_total") > len(datasets) * 64 * 64 * 2
    assert value(samples, "dicomnode_associations_accepted_total") >= 1
    assert value(samples, "dicomnode_associations_rejected_total", reason="called_ae") == 1
    assert value(samples, "dicomnode_associations_rejected_total", reason="calling_ae") == 0
    in_db = jobs_by_state(node)
    for state in JobState:
        assert value(samples, "dicomnode_jobs", state=str(state)) == in_db.get(str(state), 0)
    assert value(samples, "dicomnode_jobs", state="done") == 1
    for stage in ("receive", "wait", "inference", "outputs", "send"):
        assert value(samples, "dicomnode_stage_seconds_count", stage=stage) == 1, stage
    assert value(samples, "dicomnode_inference_seconds_count", model="test-lungs") == 1
    assert value(samples, "dicomnode_inference_seconds_sum", model="test-lungs") > 0
    assert value(samples, "dicomnode_spool_free_bytes") > 0
    assert not [k for k in samples if k[0] == "dicomnode_delivery_failures_total"]
    # No patient data in any label: only the names the node itself gives.
    patient = {str(datasets[0].PatientName), str(datasets[0].PatientID)}
    assert not {v for _, labels in samples for _, v in labels} & patient

    assert get(f"http://127.0.0.1:{node.metrics.port}/healthz") == (200, "ok\n")  # type: ignore[union-attr]


def test_endpoint_goes_away_when_the_node_stops(tmp_path: Path, pacs: CountingSCP) -> None:
    running = Node.from_settings(settings_for(tmp_path, pacs.port))
    running.start()
    assert running.metrics is not None
    url = f"http://127.0.0.1:{running.metrics.port}/healthz"
    assert get(url)[0] == 200
    running.stop(timeout=30)
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=5)


@pytest.mark.parametrize(
    ("listener_settings", "calling", "called", "reason"),
    [
        ({}, "TESTSCU", "NOT-US", "called_ae"),
        ({"allowed_calling_aets": ["CT01"]}, "TESTSCU", "DICOMNODE", "calling_ae"),
        ({"allowed_networks": ["10.0.0.0/8"]}, "TESTSCU", "DICOMNODE", "address"),
    ],
)
def test_rejections_are_counted_by_reason(
    tmp_path: Path, sessions, make_listener, listener_settings, calling, called, reason
) -> None:
    from dicomnode.config import MetricsSettings
    from dicomnode.metrics_server import MetricsServer
    from dicomnode.store import Spool

    server = MetricsServer(
        MetricsSettings(enabled=True, port=free_port()), sessions, Spool(tmp_path / "m")
    )
    server.start()
    try:
        listener = make_listener(**listener_settings)
        ae = AE(ae_title=calling)
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", listener.port, ae_title=called)
        assert not assoc.is_established
        status, body = get(f"http://127.0.0.1:{server.port}/metrics")
        assert status == 200
        got = {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(body)
            for s in family.samples
        }
        rejected = {
            dict(k[1])["reason"]: v
            for k, v in got.items()
            if k[0] == "dicomnode_associations_rejected_total"
        }
        assert rejected == {r: (1 if r == reason else 0) for r in rejected} and reason in rejected
        assert got[("dicomnode_associations_accepted_total", frozenset())] == 0
    finally:
        server.stop()
