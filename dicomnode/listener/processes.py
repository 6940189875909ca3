"""Extra receiver processes: several listeners on one port, one per CPU core.

pynetdicom decodes PDUs in Python, so one process receives on one core however
many scanners send at once. With ``listener.processes = N`` the node starts N-1
child processes that each bind the same port with SO_REUSEPORT; the kernel hands
every new association to one of the N listeners. Each child has its own database
connections and writes to the same spool, exactly like the parent's listener, so
the durability rules do not change. Children import no model code.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
import threading
from multiprocessing.process import BaseProcess
from types import FrameType

from sqlalchemy.orm import Session, sessionmaker

from dicomnode.config import Settings
from dicomnode.db import make_engine, session_factory
from dicomnode.listener.scp import Listener
from dicomnode.logs import setup_logging
from dicomnode.store import Ingestor, Spool

log = logging.getLogger(__name__)


def build_listener(
    settings: Settings, sessions: sessionmaker[Session], spool: Spool, *, reuse_port: bool
) -> Listener:
    """Return a listener (not started) that stores into ``spool`` and ``sessions``.

    Parameters
    ----------
    settings : Settings
        Listener and storage settings.
    sessions : sessionmaker[Session]
        Database sessions.
    spool : Spool
        The spool.
    reuse_port : bool
        Share the port with other receiver processes.

    Returns
    -------
    Listener
        The listener.
    """
    ingestor = Ingestor(
        spool,
        sessions,
        min_free_bytes=settings.storage.min_free_mb * 2**20,
        max_instance_bytes=settings.storage.max_instance_mb * 2**20,
    )
    return Listener(
        settings.listener, ingestor, reuse_port=reuse_port, destinations=settings.destinations
    )


def receiver_main(settings: Settings, index: int, parent: int) -> None:
    """Run one extra receiver until SIGTERM or SIGINT, or until the parent is gone.

    Parameters
    ----------
    settings : Settings
        The node's settings.
    index : int
        The receiver's number, for the log.
    parent : int
        The node's pid: if the node died while this process was starting, its
        parent is already someone else, and it must not start listening.
    """
    setup_logging(settings.logging.level, settings.logging.format)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    if not _die_with(parent):
        return  # the node is gone already: listening now would take its images
    # Each association stores on its own thread: the pool holds one connection for each.
    engine = make_engine(settings.database.url, connections=settings.listener.max_associations)
    listener = build_listener(
        settings, session_factory(engine), Spool(settings.storage.path), reuse_port=True
    )
    try:
        listener.start()
        log.info("receiver %d started pid=%d", index, os.getpid())
        # A receiver whose node died must not go on accepting images alone.
        while not stop.wait(1.0) and os.getppid() == parent:
            pass
    finally:
        listener.stop()
        engine.dispose()


_PR_SET_PDEATHSIG = 1


def _die_with(parent: int) -> bool:
    """Have the kernel send SIGTERM the moment the node's process ends (Linux).

    Polling ``getppid`` alone left a killed node's receivers holding the port for up
    to a second, long enough for a new node started at once to share it with them
    and lose images to a receiver that writes into the old node's database. The
    signal is tied to the thread that started this process, which is the node's
    main thread; the poll in :func:`receiver_main` stays as the fallback.

    Parameters
    ----------
    parent : int
        The node's pid.

    Returns
    -------
    bool
        Whether the node is still this process's parent.
    """
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    # The node may have died before the request took effect.
    return os.getppid() == parent


class Receivers:
    """The extra receiver processes of one node.

    Parameters
    ----------
    settings : Settings
        The node's settings; ``listener.processes - 1`` children are started.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.processes: list[BaseProcess] = []

    def start(self) -> None:
        """Start the children (spawned, so they share nothing but the port)."""
        context = multiprocessing.get_context("spawn")
        for index in range(1, self.settings.listener.processes):
            process = context.Process(
                target=receiver_main,
                args=(self.settings, index, os.getpid()),
                name=f"receiver-{index}",
                daemon=True,
            )
            process.start()
            self.processes.append(process)

    def alive(self) -> int:
        """Return how many children are running."""
        return sum(1 for p in self.processes if p.is_alive())

    def stop(self, timeout: float = 30.0) -> None:
        """Ask every child to finish its associations and exit; kill the stragglers.

        Parameters
        ----------
        timeout : float
            Seconds to wait for each child.
        """
        for process in self.processes:
            if process.is_alive() and process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)
        for process in self.processes:
            process.join(timeout)
            if process.is_alive():
                process.kill()
                process.join(5)
        self.processes = []
