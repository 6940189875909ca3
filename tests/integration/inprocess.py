"""A whole node in the test process: SQLite, a spool, the worker, results to one PACS.

For tests that run real jobs into a real Orthanc without starting node processes:
``receive`` ingests instances as the listener would, ``sweep`` completes series,
``run`` works off the queue.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydicom.dataset import Dataset
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.config import Settings, parse_settings
from dicomnode.db import make_engine, migrate, session_factory
from dicomnode.imaging import ModelSpec, load_registry
from dicomnode.inference import ModelCache
from dicomnode.listener import Listener
from dicomnode.pipeline import Pipeline, encode
from dicomnode.queue import Worker
from dicomnode.queue.completion import sweep
from dicomnode.queue.study import sweep_studies
from dicomnode.store import Ingestor, Spool


@dataclass
class InProcessNode:
    """The parts of a node that tests drive by hand."""

    settings: Settings
    sessions: sessionmaker[Session]
    models: dict[str, ModelSpec]
    spool: Spool
    worker: Worker

    def receive(self, items: Iterable[Path | Dataset]) -> None:
        """Store instances (files or datasets) as the listener would."""
        ingestor = Ingestor(self.spool, self.sessions)
        for item in items:
            ingestor.store(item.read_bytes() if isinstance(item, Path) else encode(item))

    def sweep(self) -> int:
        """Complete quiet series (then studies) and queue their jobs; return how many series."""
        completed = sweep(self.sessions, self.settings, self.models, self.spool)
        sweep_studies(self.sessions, self.settings, self.models, self.spool)
        return completed

    def run(self, jobs: int = 1) -> None:
        """Run ``jobs`` queued jobs to the end."""
        for _ in range(jobs):
            assert self.worker.run_once()


@contextmanager
def node_sending_to(
    tmp_path: Path,
    pacs_port: int,
    routes: list[dict[str, Any]],
    models_path: Path | None = None,
    listener_port: int | None = None,
) -> Iterator[InProcessNode]:
    """Yield an in-process node whose routes send to the PACS "pacs" on ``pacs_port``.

    Models run with the default back-end choice (OpenVINO on the CPU when installed);
    every output is checked with dciodvfy before it is sent. With ``listener_port`` the
    node also listens (AE title DICOMNODE) there, e.g. as the move destination of priors.
    """
    url = f"sqlite:///{tmp_path / 'node.db'}"
    engine = make_engine(url)
    migrate.upgrade(engine)
    sessions = session_factory(engine)
    settings = parse_settings(
        {
            "database": {"url": url},
            "storage": {"path": str(tmp_path / "spool")},
            "completion": {"quiet_seconds": 0, "study_quiet_seconds": 0},
            "outputs": {"validate": "dciodvfy"},
            **(
                {"listener": {"ae_title": "DICOMNODE", "host": "127.0.0.1",
                              "port": listener_port}}
                if listener_port
                else {}
            ),
            **({"models": {"path": str(models_path)}} if models_path else {}),
            "destinations": [
                {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1",
                 "port": pacs_port, "timeout_seconds": 30},
            ],
            "routes": [{"match": {"Modality": "CT"}, "send_to": ["pacs"], **r} for r in routes],
        },
        environ={},
    )  # fmt: skip
    models = load_registry(settings.models.path)
    spool = Spool(settings.storage.path)
    cache = ModelCache(torch.device("cpu"), backend="auto")
    pipeline = Pipeline(settings, sessions, spool, models, cache)
    worker = Worker(sessions, pipeline, settings.worker, threading.Event())
    listener = None
    if listener_port:
        listener = Listener(settings.listener, Ingestor(spool, sessions))
        listener.start()
    try:
        yield InProcessNode(settings, sessions, models, spool, worker)
    finally:
        if listener is not None:
            listener.stop()
        engine.dispose()
