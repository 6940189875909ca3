"""A job whose results' disk is full: a real job, on a spool that is a tiny tmpfs.

The spool is mounted as its own small filesystem and filled up, so the writes fail
with a real ENOSPC from the kernel, where the node meets it in production. Mounting
needs root (or password-less sudo, as in CI); elsewhere these tests are skipped.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlalchemy import select, update

from dicomnode.config import StorageSettings
from dicomnode.db import Job, JobState, Output, transaction, utcnow
from dicomnode.db.models import JobEvent
from dicomnode.imaging import load_registry
from dicomnode.inference import ModelCache
from dicomnode.pipeline import Pipeline
from dicomnode.pipeline import run as pipeline_module
from dicomnode.queue import Worker
from dicomnode.store import RESULTS, Spool
from tests.integration.test_pipeline import (  # noqa: F401 - scp is a fixture
    CountingSCP,
    job_row,
    make_settings,
    receive_phantom,
    scp,
)

SPOOL_BYTES = 4 * 2**20


def _mount(command: list[str]) -> bool:
    if os.geteuid() != 0:
        if shutil.which("sudo") is None:
            return False
        command = ["sudo", "-n", *command]
    done = subprocess.run(command, capture_output=True, timeout=30, check=False)
    return done.returncode == 0


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs at ``tmp_path/spool``, unmounted afterwards."""
    path = tmp_path / "spool"
    path.mkdir()
    options = f"size={SPOOL_BYTES},uid={os.getuid()},gid={os.getgid()},mode=0700"
    if not _mount(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)]):
        pytest.skip("mounting a tmpfs needs root or password-less sudo")
    try:
        yield path
    finally:
        _mount(["umount", "-l", str(path)])


def fill(disk: Path) -> Path:
    """Fill ``disk`` to the last byte with one file; return it (delete it to free space)."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        for chunk in (2**16, 2**12, 2**9, 1):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError as exc:
                assert exc.errno == 28  # ENOSPC
    return filler


@pytest.fixture
def node(tmp_path: Path, db_url: str, sessions, scp: CountingSCP, small_disk: Path) -> dict:  # noqa: F811
    settings = make_settings(tmp_path, db_url, scp.port)
    # The spool's own watermark (1 MiB here): below it the model does not run again.
    settings = dataclasses.replace(
        settings, storage=StorageSettings(path=small_disk, min_free_mb=1)
    )
    models = load_registry(settings.models.path)
    spool = Spool(small_disk)
    pipe = Pipeline(settings, sessions, spool, models, ModelCache(torch.device("cpu")))
    worker = Worker(sessions, pipe, settings.worker, threading.Event())
    return {"settings": settings, "models": models, "spool": spool, "worker": worker,
            "sessions": sessions, "disk": small_disk}  # fmt: skip


@pytest.fixture
def inferences(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the model runs (the real segmentation, counted on its way in)."""
    runs: list[int] = []
    real = pipeline_module.segment

    def counted(*args: Any, **kwargs: Any) -> Any:
        runs.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline_module, "segment", counted)
    return runs


def runnable_now(sessions) -> None:
    with transaction(sessions) as s:
        s.execute(update(Job).values(run_after=utcnow() - timedelta(seconds=1)))


def notes(sessions) -> list[str | None]:
    with sessions() as s:
        return list(s.scalars(select(JobEvent.note).order_by(JobEvent.id)))


def test_a_full_disk_is_waited_out_without_running_the_model_again(
    node: dict,
    scp: CountingSCP,  # noqa: F811
    sessions,
    inferences: list[int],
) -> None:
    scp.start()
    receive_phantom(node)
    filler = fill(node["disk"])

    assert node["worker"].run_once()
    job = job_row(sessions)
    assert job.state == JobState.QUEUED, job.last_error  # not failed: retried by time
    assert job.last_error.startswith("no space left on device in the results folder (")
    assert str(node["spool"].absolute(RESULTS)) in job.last_error
    assert job.attempts == 0  # given back: the disk, not the job, failed
    assert len(inferences) == 1

    # Still full: the retry does not run the model for results it cannot write.
    for _ in range(3):
        runnable_now(sessions)
        assert node["worker"].run_once()
        job = job_row(sessions)
        assert job.state == JobState.QUEUED and job.attempts == 0
        assert "the model runs again once 1 MiB are" in job.last_error
    assert len(inferences) == 1

    filler.unlink()  # retention or an admin frees space
    runnable_now(sessions)
    assert node["worker"].run_once()
    job = job_row(sessions)
    assert job.state == JobState.DONE, job.last_error
    assert job.attempts == 1 and len(inferences) == 2
    assert len(scp.received) == 2
    assert sum(1 for n in notes(sessions) if n and n.startswith("no space left")) == 4


def test_objects_written_before_the_disk_filled_are_not_written_again(
    node: dict,
    scp: CountingSCP,  # noqa: F811
    sessions,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    scp.start()
    receive_phantom(node)
    validated: list[Path] = []
    real = pipeline_module.validate_file

    def validate_then_fill(path: Path, mode: str) -> bool:
        ok = real(path, mode)
        validated.append(path)
        if len(validated) == 1:
            fill(node["disk"])  # the SEG is in place; the SR will not fit
        return ok

    monkeypatch.setattr(pipeline_module, "validate_file", validate_then_fill)
    assert node["worker"].run_once()
    job = job_row(sessions)
    assert job.state == JobState.QUEUED and job.last_error.startswith("no space left on device")
    assert "1 of 2 object(s) written" in job.last_error
    (seg,) = validated
    inode = seg.stat().st_ino
    with sessions() as s:
        assert s.scalars(select(Output)).all() == []  # recorded only once all are written

    (node["disk"] / "filler").unlink()
    runnable_now(sessions)
    assert node["worker"].run_once()
    job = job_row(sessions)
    assert job.state == JobState.DONE, job.last_error
    assert seg.stat().st_ino == inode  # the same file: reused, not written again
    assert validated[1] == seg  # and validated again before it is recorded
    with sessions() as s:
        paths = {node["spool"].absolute(o.path) for o in s.scalars(select(Output))}
    assert seg in paths and len(paths) == 2
    assert len(scp.received) == 2
