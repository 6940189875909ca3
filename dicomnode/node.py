"""A running node: listener, scheduler and workers assembled from the settings.

``dicomnode serve`` runs all three roles in one process; the same pieces run
separately when a site scales out (one listener host, many worker hosts, one
PostgreSQL database and one shared storage path).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.config import Settings
from dicomnode.db import migrate
from dicomnode.db.engine import is_sqlite, make_engine, session_factory
from dicomnode.errors import ConfigError
from dicomnode.inference.device import configure_threads, select_device
from dicomnode.inference.registry import ModelSpec, load_registry
from dicomnode.inference.segment import ModelCache
from dicomnode.metrics import MetricsServer
from dicomnode.net.receivers import Receivers, build_listener
from dicomnode.net.scp import Listener
from dicomnode.pipeline import Pipeline
from dicomnode.queue.doorbell import Doorbell
from dicomnode.queue.scheduler import make_scheduler
from dicomnode.queue.wakeup import Announcer, WakeListener
from dicomnode.queue.worker import ModelSlots, Worker
from dicomnode.store.spool import Spool

log = logging.getLogger(__name__)


def check_routes(settings: Settings, models: dict[str, ModelSpec]) -> None:
    """Refuse routes and worker settings naming models that are not installed.

    Parameters
    ----------
    settings : Settings
        The routes.
    models : dict[str, ModelSpec]
        The installed model packages.

    Raises
    ------
    ConfigError
        Naming the route and the unknown model.
    """
    known = ", ".join(sorted(models)) or "none installed"
    for i, route in enumerate(settings.routes):
        for name in route.models:
            if name not in models:
                raise ConfigError(f"routes[{i}].models: unknown model {name!r} (known: {known})")
        needed = route.requires.model
        if needed and needed not in models:
            raise ConfigError(
                f"routes[{i}].requires.model: unknown model {needed!r} (known: {known})"
            )
        if needed and models[needed].task != "segmentation":
            # The verdict is the volume it segmented; other tasks have none to give.
            raise ConfigError(
                f"routes[{i}].requires.model: {needed!r} is a {models[needed].task} model; "
                "the check needs a segmentation model's volume"
            )
    for key, names in (
        ("worker.models", settings.worker.models),
        ("worker.model_concurrency", list(settings.worker.model_concurrency)),
    ):
        for name in names:
            if name not in models:
                raise ConfigError(f"{key}: unknown model {name!r} (known: {known})")


def open_database(settings: Settings, *, auto_migrate: bool) -> Engine:
    """Open the database and make sure its schema is current.

    Parameters
    ----------
    settings : Settings
        The database URL.
    auto_migrate : bool
        Apply migrations to an embedded SQLite database; other databases must be
        migrated by their operator with ``dicomnode db upgrade``.

    Returns
    -------
    Engine
        The engine.

    Raises
    ------
    DicomnodeError
        If a database that may not be migrated here is not at the current revision.
    """
    engine = make_engine(settings.database.url)
    if auto_migrate and is_sqlite(engine):
        migrate.upgrade(engine)
    else:
        migrate.require_current(engine)
    return engine


@dataclass
class Node:
    """All roles of one dicomnode process.

    Build it with :meth:`from_settings`, then :meth:`start` and :meth:`stop`.
    """

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    spool: Spool
    models: dict[str, ModelSpec]
    listener: Listener | None = None
    receivers: Receivers | None = None
    scheduler: BackgroundScheduler | None = None
    workers: list[Worker] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)
    stop_event: threading.Event = field(default_factory=threading.Event)
    doorbell: Doorbell = field(default_factory=Doorbell)
    announcer: Announcer | None = None
    wake_listener: WakeListener | None = None
    metrics: MetricsServer | None = None

    @classmethod
    def from_settings(cls, settings: Settings, *, listen: bool = True, work: bool = True) -> Node:
        """Assemble a node with the roles asked for; nothing runs until :meth:`start`.

        Parameters
        ----------
        settings : Settings
            Validated settings.
        listen : bool
            Receive instances and run the completion sweep (``dicomnode listen``).
        work : bool
            Run jobs with ``worker.count`` workers (``dicomnode worker``).

        Returns
        -------
        Node
            The assembled node.

        Raises
        ------
        ConfigError, ModelPackageError, DicomnodeError
            If the models, routes or database are not usable.
        """
        models = load_registry(settings.models.path)
        check_routes(settings, models)
        engine = open_database(settings, auto_migrate=True)
        sessions = session_factory(engine)
        spool = Spool(settings.storage.path)
        removed = spool.clean_tmp()
        if removed:
            log.info("removed %d partial files left by an interrupted write", removed)
        node = cls(settings, engine, sessions, spool, models)
        node.announcer = Announcer(engine, spool.root)
        node.doorbell.remote = node.announcer.announce
        if settings.metrics.enabled:
            node.metrics = MetricsServer(settings.metrics, sessions, spool)
        if listen:
            extra = settings.listener.processes > 1
            node.listener = build_listener(settings, sessions, spool, reuse_port=extra)
            node.receivers = Receivers(settings) if extra else None
        # Every role reaps expired leases: a transactional no-op when another did.
        node.scheduler = make_scheduler(
            settings, sessions, models, spool, completion=listen, doorbell=node.doorbell
        )
        if work:
            threads = configure_threads(settings.worker.threads)
            cache = ModelCache(
                select_device(settings.worker.device),
                backend=settings.worker.backend,
                precision=settings.worker.precision,
                threads=threads,
            )
            pipeline = Pipeline(settings, sessions, spool, models, cache)
            node.wake_listener = WakeListener(engine, spool.root, node.doorbell, node.stop_event)
            slots = ModelSlots(settings.worker.model_concurrency)
            node.workers = [
                Worker(
                    sessions, pipeline, settings.worker, node.stop_event, i, node.doorbell, slots
                )
                for i in range(settings.worker.count)
            ]
        return node

    def start(self) -> None:
        """Start the metrics endpoint, the listener, the scheduler and the worker threads."""
        if self.metrics is not None:
            self.metrics.start()  # first: the listener's first association is counted
        if self.listener is not None:
            self.listener.start()
        if self.receivers is not None:
            self.receivers.start()
        if self.wake_listener is not None:
            self.wake_listener.start()
        if self.scheduler is not None:
            self.scheduler.start()
        for i, worker in enumerate(self.workers):
            thread = threading.Thread(target=worker.run_forever, name=f"worker-{i}", daemon=True)
            thread.start()
            self.threads.append(thread)

    def stop(self, timeout: float = 60.0) -> None:
        """Stop accepting, stop scheduling, and let workers finish or release their jobs.

        Parameters
        ----------
        timeout : float
            Seconds to wait for each worker thread.
        """
        if self.receivers is not None:
            self.receivers.stop()
        if self.listener is not None:
            self.listener.stop()
        if self.scheduler is not None and self.scheduler.running:
            self.scheduler.shutdown(wait=True)
        self.stop_event.set()
        self.doorbell.ring()  # idle workers see the stop now, not after their poll
        for thread in self.threads:
            thread.join(timeout)
        if self.wake_listener is not None and self.wake_listener.ident is not None:
            self.wake_listener.join(5)  # it looks at the stop event every second
        if self.announcer is not None:
            self.announcer.close()
        if self.metrics is not None:
            self.metrics.stop()  # last: a scrape during shutdown still gets an answer
        self.engine.dispose()
        log.info("node stopped")
