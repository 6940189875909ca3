"""A running node: listener, scheduler and workers assembled from the settings.

``dicomnode serve`` runs all three roles in one process; the same pieces run
separately when a site scales out (one listener host, many worker hosts, one
PostgreSQL database and one shared storage path).
"""

from __future__ import annotations

import contextlib
import errno
import faulthandler
import io
import logging
import os
import resource
import signal
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

import dicomnode
from dicomnode.config import ListenerSettings, Settings
from dicomnode.db import is_sqlite, make_engine, migrate, session_factory
from dicomnode.errors import ConfigError, DicomnodeError, NodeAlreadyRunning
from dicomnode.imaging import ModelSpec, load_registry
from dicomnode.inference import ModelCache, configure_threads, select_device
from dicomnode.listener import Listener, Receivers, build_listener, make_ssl_context
from dicomnode.metrics_server import MetricsServer
from dicomnode.pipeline import Pipeline
from dicomnode.queue import Announcer, Doorbell, ModelSlots, WakeListener, Worker, make_scheduler
from dicomnode.store import ListenerLock, Spool

log = logging.getLogger(__name__)
# The lines an operator (and a test starting a node) waits for, "serving:" and
# "shutting down", keep the logger name they were documented with.
serve_log = logging.getLogger("dicomnode")

# Descriptors one association holds: its socket and the reactor's eventfd (measured:
# 2.0 per idle association), the file being received and a database connection.
# A connection still sending its A-ASSOCIATE-RQ holds one (its socket).
DESCRIPTORS_PER_ASSOCIATION = 4
# What the process holds besides associations: the database, logs, the metrics port,
# the listening socket, the model files.
DESCRIPTORS_BASELINE = 64


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


def check_configuration(settings: Settings) -> dict[str, ModelSpec]:
    """Check what a node needs to start, without starting it.

    Parameters
    ----------
    settings : Settings
        The settings: model packages, routes and the listener's TLS files.

    Returns
    -------
    dict[str, ModelSpec]
        The installed model packages.

    Raises
    ------
    ConfigError, ModelPackageError
        If a model package, a route or a TLS file is not usable.
    """
    models = load_registry(settings.models.path)
    check_routes(settings, models)
    make_ssl_context(settings.listener)  # TLS files exist and load
    return models


def database_connections(settings: Settings, *, listen: bool, work: bool) -> int:
    """Return how many threads of a node may hold a database connection at once.

    Each association stores on its own thread; each worker holds one connection and
    its lease heartbeat another. The pool is sized to this (plus headroom), so a
    store never waits for a connection that a quiet moment would have freed.

    Parameters
    ----------
    settings : Settings
        ``listener.max_associations`` and ``worker.count``.
    listen, work : bool
        The roles the node runs.

    Returns
    -------
    int
        The number of threads.
    """
    return (settings.listener.max_associations if listen else 0) + (
        2 * settings.worker.count if work else 0
    )


def open_database(
    settings: Settings, *, auto_migrate: bool, connections: int | None = None
) -> Engine:
    """Open the database and make sure its schema is current.

    Parameters
    ----------
    settings : Settings
        The database URL.
    auto_migrate : bool
        Apply migrations to an embedded SQLite database; other databases must be
        migrated by their operator with ``dicomnode db upgrade``.
    connections : int, optional
        Threads that may hold a connection at once (:func:`database_connections`).

    Returns
    -------
    Engine
        The engine.

    Raises
    ------
    DicomnodeError
        If a database that may not be migrated here is not at the current revision.
    """
    engine = make_engine(settings.database.url, connections=connections)
    if auto_migrate and is_sqlite(engine):
        migrate.upgrade(engine)
    else:
        migrate.require_current(engine)
    return engine


def holder_line() -> str:
    """Describe this process for a second node that finds its locks taken (no PHI).

    Returns
    -------
    str
        ``pid N on host H, started YYYY-MM-DDTHH:MM:SSZ``.
    """
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return f"pid {os.getpid()} on host {socket.gethostname()}, started {started}"


class PortLock:
    """The listener port's lock on this host, held by the node's main process.

    With ``listener.processes`` above 1 the node binds its port with SO_REUSEPORT,
    which the kernel grants to every socket of the same user that asks for it: a
    second node, with another spool and database, would silently take half of the
    associations. The node's own receiver processes must share the port, so the
    kernel's check cannot be used; this lock replaces it.

    It is a Unix socket bound in Linux's abstract namespace, named after the port
    alone, rather than a lock file in a runtime folder:

    * it vanishes with the process that bound it (kill -9 included) and two
      processes can never bind one name, so there is no stale lock and no race;
    * abstract names belong to the network namespace, exactly like ports, so two
      containers with their own networks may each run a node on one port, while
      every node sharing a network is seen, whatever its user, ``PrivateTmp`` or
      ``/run`` (a lock file would depend on all three);
    * connecting to it gives the holder's pid from the kernel (SO_PEERCRED).

    It is named after the port, not the address: a node on ``0.0.0.0`` and one on a
    given address of the same host would overlap, and with SO_REUSEPORT the kernel
    lets both bind. Two nodes on one host therefore need two ports.

    The holder answers each connection with its :func:`holder_line` and closes it,
    on a thread of its own: a refused node's probe must not stay queued, or a unit
    that restarts every few seconds would fill the backlog.

    Parameters
    ----------
    port : int
        The listener's port.
    holder : str
        What a refused node is told about this one.

    Raises
    ------
    NodeAlreadyRunning
        If another process holds the port's lock; the message names it.
    """

    def __init__(self, port: int, holder: str) -> None:
        self.name = f"\0dicomnode-listener-port-{port}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.name)
        except OSError as exc:
            sock.close()
            if exc.errno != errno.EADDRINUSE:
                raise DicomnodeError(
                    f"cannot lock listener port {port}: {exc.strerror or exc}"
                ) from None
            raise NodeAlreadyRunning(
                f"listener port {port} is in use by another dicomnode on this host "
                f"({_port_holder(self.name)}); one node per port"
            ) from None
        sock.listen(8)
        self._socket: socket.socket | None = sock
        self._answer = holder.encode() + b"\n"
        self._closing = False
        self._thread = threading.Thread(target=self._serve, name="port-lock", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        sock = self._socket
        while sock is not None and not self._closing:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            with conn, contextlib.suppress(OSError):
                if not self._closing:
                    conn.sendall(self._answer)

    def release(self) -> None:
        """Give the port's lock back (the name is free once the socket closes)."""
        if self._socket is None:
            return
        self._closing = True
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as wake:
            wake.settimeout(1)
            wake.connect(self.name)  # ends the thread's accept()
        self._thread.join(5)
        self._socket.close()
        self._socket = None


def _port_holder(name: str) -> str:
    """Ask the holder of a port lock who it is: the kernel's pid and its own line."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(2)
            probe.connect(name)
            creds = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid = struct.unpack("3i", creds)[0]
            said = " ".join(probe.recv(256).decode(errors="replace").split())[:200]
    except OSError:
        return "holder not known"
    # The pid is the kernel's word; the rest only if the holder's line agrees with it.
    return said if said.startswith(f"pid {pid} ") else f"pid {pid}"


def raise_descriptor_limit(listener: ListenerSettings) -> None:
    """Raise this process's soft descriptor limit to its hard limit, and log it.

    Idle connections cost descriptors: at the usual soft limit of 1024 a few hundred
    of them leave none for the next scanner, the spool or the database. The hard
    limit (systemd's ``LimitNOFILE``) is what the administrator allows; the soft one
    is raised to it here, so the unit's setting is all that is needed. Receiver
    processes inherit the limit.

    Parameters
    ----------
    listener : ListenerSettings
        The limit should hold ``max_associations`` associations and
        ``max_pending_connections`` connections waiting for their request.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:  # the kernel refuses an infinite soft limit for descriptors
            target = int(Path("/proc/sys/fs/nr_open").read_text())
        except (OSError, ValueError):
            target = soft
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError) as exc:
            log.debug("cannot raise the descriptor limit: %s", exc)
    needed = (
        listener.max_associations * DESCRIPTORS_PER_ASSOCIATION
        + listener.max_pending_connections
        + DESCRIPTORS_BASELINE
    )
    # docs/deployment.md and docs/troubleshooting.md quote both wordings, which place
    # the values differently: they go by name, so one call serves either.
    if soft < needed:
        level, clause = (
            logging.WARNING,
            "is below the %(needed)d that listener.max_associations=%(associations)d and "
            "max_pending_connections=%(pending)d need: raise LimitNOFILE (docs/deployment.md)",
        )
    else:
        level, clause = (
            logging.INFO,
            "(listener.max_associations=%(associations)d and "
            "max_pending_connections=%(pending)d need %(needed)d)",
        )
    values = {
        "soft": soft,
        "needed": needed,
        "associations": listener.max_associations,
        "pending": listener.max_pending_connections,
    }
    log.log(level, "descriptor limit %(soft)d " + clause, values)


@dataclass
class Node:
    """All roles of one dicomnode process.

    Build it with :meth:`from_settings`, then :meth:`start` and :meth:`stop`, or
    :meth:`run_until` an event is set.
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
    locks: list[ListenerLock | PortLock] = field(default_factory=list)

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
        engine = open_database(
            settings,
            auto_migrate=True,
            connections=database_connections(settings, listen=listen, work=work),
        )
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
        """Start the metrics endpoint, the listener, the scheduler and the worker threads.

        A node that listens first takes the spool's lock and its port's lock, and
        raises its descriptor limit (its receiver processes inherit it).

        Raises
        ------
        NodeAlreadyRunning
            If another node listens on this spool, or on this port on this host.
        DicomnodeError
            If a port cannot be bound.
        """
        if self.listener is not None:
            holder = holder_line()
            self.locks.append(ListenerLock(self.spool.root, holder))
            if self.settings.listener.port:  # port 0: the kernel picks a free one
                self.locks.append(PortLock(self.settings.listener.port, holder))
            raise_descriptor_limit(self.settings.listener)
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
        # Last: the receiver processes, which share the port, are gone by now.
        for lock in reversed(self.locks):
            lock.release()
        self.locks.clear()
        log.info("node stopped")

    def run_until(self, stop: threading.Event) -> None:
        """Start the node, serve until ``stop`` is set, then stop it.

        Parameters
        ----------
        stop : threading.Event
            Set to stop the node (a signal handler, a test).

        Raises
        ------
        NodeAlreadyRunning, DicomnodeError
            If the node cannot start; whatever did start is stopped again first.
        """
        try:
            self.start()
        except BaseException:
            self.stop()  # whatever did start (scheduler, threads, database pool) stops again
            raise
        serve_log.info(
            "dicomnode %s serving: listener=%s workers=%d models=%s",
            dicomnode.__version__,
            f"{self.settings.listener.ae_title}@{self.listener.port}" if self.listener else "off",
            len(self.workers),
            (",".join(sorted(self.models)) if self.workers else "") or "-",
        )
        while not stop.wait(1.0):
            pass
        self.stop()


def serve_until_signal(settings: Settings, *, listen: bool = True, work: bool = True) -> None:
    """Assemble a node and run it until SIGINT or SIGTERM (``dicomnode serve``).

    The signal handlers are this process's for as long as the node runs, and the
    previous ones are put back after.

    Parameters
    ----------
    settings : Settings
        Validated settings.
    listen : bool
        Receive instances and run the completion sweep.
    work : bool
        Run jobs.

    Raises
    ------
    ConfigError, ModelPackageError, NodeAlreadyRunning, DicomnodeError
        If the node cannot be assembled or started.
    """
    node = Node.from_settings(settings, listen=listen, work=work)
    stop = threading.Event()
    # `kill -USR1 PID` writes every thread's stack to stderr (the log): what a node
    # that will not stop, or a stuck worker, is waiting on. Code locations only, no data.
    # A stderr without a file descriptor (the node embedded, or captured) has none.
    with contextlib.suppress(io.UnsupportedOperation, ValueError, AttributeError):
        faulthandler.register(signal.SIGUSR1, all_threads=True)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        serve_log.info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        node.run_until(stop)
    finally:
        faulthandler.unregister(signal.SIGUSR1)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
