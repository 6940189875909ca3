"""The node's health: what ``dicomnode status`` gathers and what it judges wrong.

``tests/unit/cli/test_status.py`` checks the command's output against real databases;
here are the gathering and the judging on their own.
"""

from __future__ import annotations

import shutil
import socket
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from dicomnode.config import ListenerSettings, parse_settings
from dicomnode.db.health import FailedAttempt, FailingDestination, QueuedJob, Snapshot
from dicomnode.health import (
    Disk,
    HealthReport,
    ListenerCheck,
    Workers,
    _probe_host,
    check_disk,
    check_listener,
    collect,
    problems,
)
from tests.conftest import free_port

NOW = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
STATES = ("queued", "running", "sending", "done", "failed", "cancelled")
JSON_KEYS = [
    "listener", "workers", "queue", "oldest_queued", "deliveries", "failed_last_hour",
    "stalled", "deliveries_failed_last_day", "failing_destinations", "last_errors", "disk",
    "problems", "healthy", "checked_at",
]  # fmt: skip


def _report(**figures: object) -> HealthReport:
    """A healthy report; ``figures`` replace the database's."""
    snapshot = Snapshot(
        now=NOW,
        busy=(),
        queue=tuple((state, 0) for state in STATES),
        oldest_queued=None,
        deliveries=(("pending", 0), ("failed", 0)),
        failed_last_hour=0,
        stalled=0,
        deliveries_failed_last_day=0,
        failing_destinations=(),
        last_errors=(),
    )
    return HealthReport(
        listener=ListenerCheck("up", "DICOMNODE@127.0.0.1:11112 C-ECHO status 0x0000"),
        workers=Workers(busy=(), processes=0, processes_source="LISTEN connections"),
        figures=replace(snapshot, **figures),  # type: ignore[arg-type]
        disk=Disk(
            Path("spool"), free_mb=500, total_mb=1000, min_free_mb=100, below_watermark=False
        ),
        checked_at=NOW,
    )


def test_a_report_without_problems_is_healthy() -> None:
    report = _report()
    assert problems(report) == [] and report.problems == [] and report.healthy


def test_every_problem_in_order_one_line_each() -> None:
    since = datetime(2024, 5, 6, 1, 2, 3, 999999, tzinfo=UTC)
    failing = FailingDestination("pacs", 2, since, NOW, "destination pacs: refused")
    report = replace(
        _report(
            deliveries_failed_last_day=3,
            failing_destinations=(failing,),
            stalled=4,
            failed_last_hour=5,
        ),
        listener=ListenerCheck("down", "DICOMNODE@127.0.0.1:11112 does not answer"),
        disk=Disk(Path("spool"), free_mb=99, total_mb=1000, min_free_mb=100, below_watermark=True),
    )
    assert problems(report) == [
        "listener down: DICOMNODE@127.0.0.1:11112 does not answer",
        "disk: 99 MiB free, below storage.min_free_mb (100 MiB): the listener refuses instances",
        "3 delivery(ies) failed",
        "destination pacs: latest delivery attempts failed since 2024-05-06 01:02:03 "
        "(2 delivery(ies)): destination pacs: refused",
        "4 job(s) could have run for over 10 min and no worker took them: are workers "
        "running, and do they take these models (worker.models)?",
        "5 job(s) failed in the last hour",
    ]
    assert not report.healthy and report.as_dict()["problems"] == report.problems


@pytest.mark.parametrize("state", ["up", "not checked"])
def test_only_a_listener_that_is_down_is_a_problem(state: str) -> None:
    assert problems(replace(_report(), listener=ListenerCheck(state, "x"))) == []


def test_the_json_report_keeps_its_keys_and_values() -> None:
    oldest = QueuedJob(job_id=7, created_at=NOW - timedelta(minutes=3), age_s=180.5)
    failing = FailingDestination("pacs", 1, NOW, NOW, "destination pacs: refused")
    error = FailedAttempt(7, "lungs", NOW, "queued", "destination pacs: refused")
    report = replace(
        _report(
            busy=("host-b:22:1:cd",),
            oldest_queued=oldest,
            failing_destinations=(failing,),
            last_errors=(error,),
        ),
        workers=Workers(("host-b:22:1:cd",), None, "LISTEN connections"),
    )
    data = report.as_dict()
    assert list(data) == JSON_KEYS
    assert data["listener"] == {
        "state": "up",
        "detail": "DICOMNODE@127.0.0.1:11112 C-ECHO status 0x0000",
    }
    assert data["workers"] == {
        "busy": ["host-b:22:1:cd"],
        "processes": None,
        "processes_source": "LISTEN connections",
    }
    assert data["queue"] == dict.fromkeys(STATES, 0) and list(data["queue"]) == list(STATES)
    assert data["oldest_queued"] == {"job_id": 7, "created_at": oldest.created_at, "age_s": 180.5}
    assert data["deliveries"] == {"pending": 0, "failed": 0}
    assert [list(d) for d in data["failing_destinations"]] == [
        ["destination", "deliveries", "since", "last_failed_at", "error"]
    ]
    assert data["last_errors"] == [
        {"job_id": 7, "model": "lungs", "at": NOW, "outcome": "queued",
         "error": "destination pacs: refused"}
    ]  # fmt: skip
    assert data["disk"] == {
        "path": "spool",
        "free_mb": 500,
        "total_mb": 1000,
        "min_free_mb": 100,
        "below_watermark": False,
    }
    assert list(data["disk"]) == ["path", "free_mb", "total_mb", "min_free_mb", "below_watermark"]
    assert data["problems"] == report.problems and len(report.problems) == 1
    assert data["healthy"] is False and data["checked_at"] == NOW


def test_the_disk_of_a_spool_not_made_yet_is_measured(tmp_path: Path) -> None:
    spool = tmp_path / "not" / "made" / "yet"
    disk = check_disk(spool, 0)
    usage = shutil.disk_usage(tmp_path)
    assert disk.path == spool and not spool.exists()
    assert disk.total_mb == usage.total // 2**20 and 0 < disk.free_mb <= disk.total_mb
    assert disk.min_free_mb == 0 and disk.below_watermark is False  # 0: no watermark


def test_below_the_watermark(tmp_path: Path) -> None:
    assert check_disk(tmp_path, 2**40).below_watermark is True
    assert check_disk(tmp_path, 1).below_watermark is False


def test_a_wildcard_bind_address_is_probed_on_loopback() -> None:
    assert _probe_host("0.0.0.0") == "127.0.0.1" and _probe_host("") == "127.0.0.1"
    assert _probe_host("::") == "::1" and _probe_host("10.1.2.3") == "10.1.2.3"


def _tls_listener(port: int) -> ListenerSettings:
    return ListenerSettings(
        host="0.0.0.0",
        port=port,
        tls_certificate=Path("node.pem"),
        tls_private_key=Path("node.key"),
    )


@pytest.mark.system
def test_a_tls_listener_is_up_when_its_port_accepts_connections() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        check = check_listener(_tls_listener(port), timeout=2)
    assert check == ListenerCheck(
        "up", f"DICOMNODE@127.0.0.1:{port} accepts connections (TLS, not echoed)"
    )


@pytest.mark.system
def test_a_tls_listener_is_down_when_its_port_refuses() -> None:
    port = free_port()
    check = check_listener(_tls_listener(port), timeout=2)
    assert check == ListenerCheck("down", f"DICOMNODE@127.0.0.1:{port}: Connection refused")


@pytest.mark.system
def test_a_listener_that_does_not_answer_is_down() -> None:
    port = free_port()
    check = check_listener(ListenerSettings(port=port), timeout=2)
    assert check == ListenerCheck("down", f"DICOMNODE@127.0.0.1:{port} does not answer")


def test_a_listener_answers_with_its_echo(make_listener: Callable[..., object]) -> None:
    listener = make_listener()
    check = check_listener(ListenerSettings(port=listener.port), timeout=2)  # type: ignore[attr-defined]
    assert check.state == "up" and check.detail.endswith("C-ECHO status 0x0000")


def test_a_listener_that_rejects_our_ae_title_is_up(
    make_listener: Callable[..., object],
) -> None:
    listener = make_listener(allowed_calling_aets=["SCANNER"])
    port = listener.port  # type: ignore[attr-defined]
    check = check_listener(ListenerSettings(port=port), timeout=2)
    assert check == ListenerCheck(
        "up", f"DICOMNODE@127.0.0.1:{port} answers (association rejected: our AE title)"
    )


def test_collect_reads_the_database_and_skips_the_listener_when_told(
    tmp_path: Path, db_url: str, engine: object
) -> None:
    settings = parse_settings(
        {
            "database": {"url": db_url},
            "storage": {"path": str(tmp_path / "spool"), "min_free_mb": 2**40},
            "listener": {"port": free_port()},
        },
        environ={},
    )
    before = datetime.now(UTC)
    report = collect(settings, None)
    assert report.listener == ListenerCheck("not checked", "--no-listener")
    assert report.workers.busy == () and report.workers.processes == 0
    assert dict(report.figures.queue) == dict.fromkeys(STATES, 0)
    assert report.disk.path == tmp_path / "spool" and report.disk.below_watermark
    assert before <= report.checked_at <= datetime.now(UTC)
    assert report.problems == [problems(report)[0]] and report.problems[0].startswith("disk: ")

    report = collect(replace(settings, storage=replace(settings.storage, min_free_mb=0)), 2)
    assert report.listener.state == "down" and report.problems == [
        f"listener down: {report.listener.detail}"
    ]
