"""The metrics hooks, the endpoint over HTTP, and the [metrics] settings."""

from __future__ import annotations

import importlib.util
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families

from dicomnode import metrics, metrics_server
from dicomnode.config import MetricsSettings, parse_settings
from dicomnode.db import make_engine, session_factory
from dicomnode.errors import ConfigError, DicomnodeError
from dicomnode.metrics_server import MetricsServer
from dicomnode.store import Spool
from tests.conftest import free_port


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def samples(server: MetricsServer) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    status, body = get(f"http://127.0.0.1:{server.port}/metrics")
    assert status == 200
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


@pytest.fixture
def server(tmp_path: Path, sessions) -> Iterator[MetricsServer]:
    running = MetricsServer(
        MetricsSettings(enabled=True, port=free_port()), sessions, Spool(tmp_path / "spool")
    )
    running.start()
    try:
        yield running
    finally:
        running.stop()


def test_hooks_are_no_ops_when_disabled() -> None:
    metrics.disable()
    metrics.instance_stored(10)
    metrics.association_accepted()
    metrics.association_rejected("called_ae")
    metrics.job_finished("m", {"inference_s": 1.0})
    metrics.delivery_failed("pacs")
    assert metrics._active is None


def test_hooks_are_scraped_over_http(server: MetricsServer) -> None:
    metrics.instance_stored(1000)
    metrics.instance_stored(24)
    metrics.association_accepted()
    metrics.delivery_failed("pacs")
    metrics.delivery_failed("pacs")
    metrics.job_finished(
        "lung",
        {"receive_s": 2.0, "wait_s": 1.0, "load_s": 9.0, "inference_s": 3.0,
         "seg_s": 0.5, "sr_s": 0.25, "sc_s": 0.25, "send_s": 0.1},
    )  # fmt: skip
    metrics.job_finished("lung", {"send_s": 0.2})  # a later attempt that only re-sent
    got = samples(server)
    assert got[("dicomnode_instances_received_total", frozenset())] == 2
    assert got[("dicomnode_received_bytes_total", frozenset())] == 1024
    assert got[("dicomnode_associations_accepted_total", frozenset())] == 1
    assert got[("dicomnode_delivery_failures_total", frozenset({("destination", "pacs")}))] == 2
    stage = {k: v for k, v in got.items() if k[0].startswith("dicomnode_stage_seconds_")}
    assert stage[("dicomnode_stage_seconds_count", frozenset({("stage", "send")}))] == 2
    assert stage[("dicomnode_stage_seconds_count", frozenset({("stage", "outputs")}))] == 1
    assert stage[("dicomnode_stage_seconds_sum", frozenset({("stage", "outputs")}))] == 1.0
    assert stage[("dicomnode_stage_seconds_sum", frozenset({("stage", "inference")}))] == 3.0
    assert not [k for k in stage if ("stage", "load") in k[1]]
    assert got[("dicomnode_inference_seconds_count", frozenset({("model", "lung")}))] == 1
    # Series that exist before their first event, so alerts can use rate() at once.
    for reason in metrics.REJECT_REASONS:
        assert got[("dicomnode_associations_rejected_total", frozenset({("reason", reason)}))] == 0


def test_jobs_by_state_and_free_space_are_read_at_scrape_time(server: MetricsServer) -> None:
    got = samples(server)
    jobs = {dict(k[1])["state"]: v for k, v in got.items() if k[0] == "dicomnode_jobs"}
    assert jobs == dict.fromkeys(["queued", "running", "sending", "done", "failed", "cancelled"], 0)
    assert got[("dicomnode_spool_free_bytes", frozenset())] > 0


def test_healthz_and_unknown_paths(server: MetricsServer) -> None:
    assert get(f"http://127.0.0.1:{server.port}/healthz") == (200, "ok\n")
    assert get(f"http://127.0.0.1:{server.port}/nothing")[0] == 404


@pytest.mark.system
def test_healthz_fails_when_the_database_is_unreachable(tmp_path: Path) -> None:
    (tmp_path / "db").mkdir()  # a folder where the database file should be
    engine = make_engine(f"sqlite:///{tmp_path / 'db'}")
    running = MetricsServer(
        MetricsSettings(enabled=True, port=free_port()),
        session_factory(engine),
        Spool(tmp_path / "spool"),
    )
    running.start()
    try:
        assert get(f"http://127.0.0.1:{running.port}/healthz")[0] == 503
        # The scrape still answers, without the jobs it cannot count.
        status, body = get(f"http://127.0.0.1:{running.port}/metrics")
        assert status == 200 and "dicomnode_jobs{" not in body
    finally:
        running.stop()
        engine.dispose()


def test_stop_closes_the_port_and_disables_the_hooks(tmp_path: Path, sessions) -> None:
    running = MetricsServer(
        MetricsSettings(enabled=True, port=free_port()), sessions, Spool(tmp_path / "spool")
    )
    running.start()
    port = running.port
    running.stop()
    assert metrics._active is None
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
    running.stop()  # twice is harmless (node.stop after a failed start)


def test_port_in_use_is_a_one_line_error(tmp_path: Path, sessions) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        running = MetricsServer(
            MetricsSettings(enabled=True, port=port), sessions, Spool(tmp_path / "spool")
        )
        with pytest.raises(DicomnodeError, match=rf"^metrics: cannot listen on 127.0.0.1:{port}"):
            running.start()
    assert metrics._active is None


def test_settings_defaults_and_validation() -> None:
    settings = parse_settings({}, environ={})
    assert settings.metrics == MetricsSettings(enabled=False, host="127.0.0.1", port=9464)
    env = {"DICOMNODE_METRICS_PORT": "9500", "DICOMNODE_METRICS_HOST": "0.0.0.0"}
    assert parse_settings({}, environ=env).metrics.port == 9500
    with pytest.raises(ConfigError, match=r"^metrics\.port: must be between 1 and 65535"):
        parse_settings({"metrics": {"port": 70000}}, environ={})
    with pytest.raises(ConfigError, match=r"metrics\.bogus"):
        parse_settings({"metrics": {"bogus": 1}}, environ={})


def test_enabled_without_prometheus_client_names_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "prometheus_client" else real(name, *a),
    )
    with pytest.raises(ConfigError) as info:
        parse_settings({"metrics": {"enabled": True}}, environ={})
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("metrics.enabled:")
    assert "pip install 'dicomnode[metrics]'" in message
    parse_settings({"metrics": {"enabled": False}}, environ={})  # off: not needed


HALF_SENT = 300


def _half_sent(port: int, n: int) -> list[socket.socket]:
    """Open ``n`` connections that each send a request head without its blank line."""
    clients = []
    for _ in range(n):
        client = socket.create_connection(("127.0.0.1", port), timeout=30)
        client.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        clients.append(client)
    return clients


def test_half_sent_requests_neither_grow_threads_nor_block_a_scrape(
    tmp_path: Path, sessions
) -> None:
    import threading

    before = threading.active_count()
    running = MetricsServer(
        MetricsSettings(enabled=True, port=free_port()), sessions, Spool(tmp_path / "spool")
    )
    running.start()
    try:
        clients = _half_sent(running.port, HALF_SENT)
        try:
            # The listen queue is first come, first served: once this scrape is
            # answered, every half-sent connection before it has been accepted.
            assert samples(running)
            assert get(f"http://127.0.0.1:{running.port}/healthz") == (200, "ok\n")
            during = threading.active_count()
        finally:
            for client in clients:
                client.close()
    finally:
        running.stop()
    # The reader and the handler pool, not a thread per connection.
    assert during - before <= metrics_server.HTTP_HANDLER_THREADS + 1, (before, during)


def test_a_silent_client_is_dropped(
    tmp_path: Path, sessions, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics_server, "HTTP_REQUEST_SECONDS", 0.5)
    running = MetricsServer(
        MetricsSettings(enabled=True, port=free_port()), sessions, Spool(tmp_path / "spool")
    )
    running.start()
    try:
        (client,) = _half_sent(running.port, 1)
        with client:
            # Closed by the server once its request deadline passed (the client's own
            # 30 s timeout only bounds the test if nothing closes it).
            assert client.recv(1024) == b""
    finally:
        running.stop()
