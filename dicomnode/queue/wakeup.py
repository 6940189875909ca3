"""Wake idle workers when work is queued: in this process, in others, and on other hosts.

In this process, a :class:`Doorbell`: workers that find the queue empty sleep
``worker.poll_seconds`` before they look again, so a job queued by the completion
sweep of the same process (``serve``) waited up to a whole poll interval. The sweep
now rings, and the sleepers answer at once.

The doorbell wakes the workers of one process.
A listener host and separate worker processes need the news to cross processes,
or a new job waits for a worker's next poll (``worker.poll_seconds``).

- **PostgreSQL**: ``NOTIFY`` on a channel that every worker process listens to
  (``LISTEN``) on one dedicated connection. It reaches every host that shares
  the database.
- **SQLite** (one host by construction: the database is a local file): each
  worker process binds a Unix datagram socket in Linux's abstract namespace and
  registers its name in ``spool/run/wake/``; an announcement is one datagram to
  each registered name. A registration whose process has gone is removed by the
  first announcement that finds it dead.

Both are hints only. A lost notification costs at most one poll interval, never
a job: workers still poll, and the job table stays the only source of truth.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

from dicomnode.db import is_sqlite, listen_connections

log = logging.getLogger(__name__)

CHANNEL = "dicomnode_jobs"
RECONNECT_SECONDS = 5.0


class Doorbell:
    """Rings counted, so a ring between a waiter's look and its wait is not missed."""

    def __init__(self, remote: Callable[[], None] | None = None) -> None:
        self._condition = threading.Condition()
        self._rings = 0
        self.remote = remote  # tells other processes; set by the node

    @property
    def rings(self) -> int:
        """Return how many times the bell has rung; pass it to :meth:`wait`."""
        with self._condition:
            return self._rings

    def ring(self) -> None:
        """Wake every waiter."""
        with self._condition:
            self._rings += 1
            self._condition.notify_all()

    def announce(self) -> None:
        """Wake every waiter here and, when the node set it up, in other processes."""
        self.ring()
        if self.remote is not None:
            self.remote()

    def wait(self, seen: int, timeout: float) -> bool:
        """Wait until the bell rings after ``seen`` rings, or ``timeout`` seconds.

        Parameters
        ----------
        seen : int
            :attr:`rings` as it was when the caller last looked for work.
        timeout : float
            The longest wait in seconds.

        Returns
        -------
        bool
            True if it rang.
        """
        with self._condition:
            return self._condition.wait_for(lambda: self._rings != seen, timeout)


def _registry(spool_root: Path) -> Path:
    return spool_root / "run" / "wake"


class Announcer:
    """Tells the worker processes that share this database that jobs are runnable.

    Parameters
    ----------
    engine : Engine
        The node's database.
    spool_root : Path
        The spool; SQLite's registrations live under it.
    """

    def __init__(self, engine: Engine, spool_root: Path) -> None:
        self.engine = engine
        self.registry = _registry(spool_root)
        self.sqlite = is_sqlite(engine)
        self._socket: socket.socket | None = None
        self._lock = threading.Lock()

    def announce(self) -> None:
        """Wake the idle workers of every process; failures are logged, never raised."""
        try:
            if self.sqlite:
                self._datagrams()
            else:
                with self.engine.connect() as conn:
                    conn.execute(text("SELECT pg_notify(:channel, '')"), {"channel": CHANNEL})
                    conn.commit()
        except Exception as exc:  # a hint: the workers' polling covers for it
            log.warning("could not announce new work: %s", type(exc).__name__)

    def _datagrams(self) -> None:
        if not self.registry.is_dir():
            return
        with self._lock:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._socket.setblocking(False)
            for entry in self.registry.iterdir():
                try:
                    address = "\0" + entry.read_text().strip()
                    self._socket.sendto(b"!", address)
                except (ConnectionRefusedError, FileNotFoundError):
                    if not _alive(entry.name):
                        entry.unlink(missing_ok=True)  # its process is gone
                    # else: alive but unreachable (another network namespace): keep it
                except BlockingIOError:
                    pass  # its queue is full: it is awake already
                except OSError:
                    continue

    def close(self) -> None:
        """Close the sending socket."""
        with self._lock:
            if self._socket is not None:
                self._socket.close()
                self._socket = None


def _alive(name: str) -> bool:
    """Return whether the process in a registration name (``dicomnode-wake-PID-...``) runs."""
    try:
        pid = int(name.split("-")[2])
    except (IndexError, ValueError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: it exists
    return True


def waiting_workers(engine: Engine, spool_root: Path) -> tuple[str, int | None]:
    """Count the worker processes waiting for work, as this mechanism sees them.

    Parameters
    ----------
    engine : Engine
        The node's database.
    spool_root : Path
        The spool (SQLite's registrations).

    Returns
    -------
    tuple[str, int | None]
        Where the count comes from, and the count (None when PostgreSQL does not let
        this role see the connections).
    """
    if is_sqlite(engine):
        registry = _registry(spool_root)
        names = [e.name for e in registry.iterdir()] if registry.is_dir() else []
        # A registration outlives a killed process until an announcement finds it dead.
        return "registrations in spool/run/wake", sum(
            1 for n in names if not n.endswith(".tmp") and _alive(n)
        )
    return "LISTEN connections", listen_connections(engine, CHANNEL)


class WakeListener(threading.Thread):
    """Rings this process's doorbell whenever another process announces work.

    Parameters
    ----------
    engine : Engine
        The node's database.
    spool_root : Path
        The spool (SQLite's registrations).
    doorbell : Doorbell
        Rung on each announcement.
    stop : threading.Event
        Ends the thread.
    """

    def __init__(
        self, engine: Engine, spool_root: Path, doorbell: Doorbell, stop: threading.Event
    ) -> None:
        super().__init__(name="wake-listener", daemon=True)
        self.engine = engine
        self.registry = _registry(spool_root)
        self.doorbell = doorbell
        self.stop_event = stop
        self.ready = threading.Event()  # set once announcements can reach us
        self._entry: Path | None = None

    def run(self) -> None:
        """Listen until stopped, reconnecting after errors."""
        while not self.stop_event.is_set():
            try:
                if is_sqlite(self.engine):
                    self._listen_socket()
                else:
                    self._listen_postgres()
            except Exception as exc:  # the database restarted, say: listen again soon
                log.warning("wake listener: %s; retrying", type(exc).__name__)
                self.stop_event.wait(RECONNECT_SECONDS)

    def _listen_postgres(self) -> None:
        import psycopg  # the postgres extra; only needed with a PostgreSQL URL

        url = make_url(self.engine.url).set(drivername="postgresql")
        conninfo = url.render_as_string(hide_password=False)
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(f"LISTEN {CHANNEL}")
            self.ready.set()
            while not self.stop_event.is_set():
                # One notification is enough: a ring wakes every idle worker.
                if list(conn.notifies(timeout=1.0, stop_after=1)):
                    self.doorbell.ring()

    def _listen_socket(self) -> None:
        self.registry.mkdir(parents=True, exist_ok=True)
        name = f"dicomnode-wake-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind("\0" + name)
            sock.settimeout(1.0)
            entry = self.registry / name
            tmp = entry.with_suffix(".tmp")
            tmp.write_text(name)
            tmp.replace(entry)  # announcers never read a half-written name
            self._entry = entry
            self.ready.set()
            while not self.stop_event.is_set():
                try:
                    sock.recv(64)
                except TimeoutError:
                    continue
                self._drain(sock)
                self.doorbell.ring()
        finally:
            sock.close()
            if self._entry is not None:
                self._entry.unlink(missing_ok=True)

    @staticmethod
    def _drain(sock: Any) -> None:
        sock.setblocking(False)
        try:
            while True:
                sock.recv(64)
        except (BlockingIOError, OSError):
            pass
        finally:
            sock.settimeout(1.0)
