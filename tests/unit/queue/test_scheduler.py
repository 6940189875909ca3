"""Which housekeeping runs where: retention only beside the completion sweep."""

from __future__ import annotations

from pathlib import Path

from dicomnode.config import parse_settings
from dicomnode.queue import scheduler
from dicomnode.store import Spool


def job_ids(tmp_path: Path, sessions, retention: dict, *, completion: bool) -> set[str]:
    settings = parse_settings({"retention": retention}, environ={})
    made = scheduler.make_scheduler(
        settings, sessions, {}, Spool(tmp_path / "spool"), completion=completion
    )
    return {job.id for job in made.get_jobs()}


def test_retention_runs_with_the_completion_sweep_only(tmp_path: Path, sessions) -> None:
    assert {"retention", "disk-watch", "completion-sweep"} <= job_ids(
        tmp_path, sessions, {}, completion=True
    )
    worker_only = job_ids(tmp_path, sessions, {}, completion=False)
    assert "retention" not in worker_only and "disk-watch" not in worker_only


def test_retention_can_be_turned_off(tmp_path: Path, sessions) -> None:
    ids = job_ids(tmp_path, sessions, {"enabled": False}, completion=True)
    assert "retention" not in ids and "disk-watch" not in ids
    ids = job_ids(tmp_path, sessions, {"emergency": False}, completion=True)
    assert "retention" in ids and "disk-watch" not in ids
