"""The metrics endpoint over HTTP: ``/metrics`` and ``/healthz``, beside the node.

The counters and histograms live in :mod:`dicomnode.metrics`, which imports nothing
else of ours; this module adds what needs the node's parts: the gauges read at
scrape time (jobs by state from the database, the spool's free space), so they are
right in every process and the same in every process of a scaled-out site (aggregate
them with ``max``, not ``sum``), and a small HTTP server with bounded threads.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, sessionmaker

from dicomnode import metrics
from dicomnode.config import MetricsSettings
from dicomnode.db import Job, JobState, read_only
from dicomnode.errors import DicomnodeError
from dicomnode.store import Spool

if TYPE_CHECKING:
    from prometheus_client.core import Metric

log = logging.getLogger(__name__)


class _StateCollector:
    """Jobs by state and the spool's free space, read when Prometheus scrapes."""

    def __init__(self, sessions: sessionmaker[Session], spool: Spool) -> None:
        self.sessions = read_only(sessions)  # a scrape must never wait for, or block, ingest
        self.spool = spool

    def describe(self) -> list[Metric]:
        # Without describe() registering would call collect(), i.e. query the database.
        from prometheus_client.core import GaugeMetricFamily

        return [
            GaugeMetricFamily("dicomnode_jobs", "Jobs by state.", labels=["state"]),
            GaugeMetricFamily("dicomnode_spool_free_bytes", "Free bytes on the spool's disk."),
        ]

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        try:
            with self.sessions() as session:
                rows = session.execute(select(Job.state, func.count()).group_by(Job.state)).all()
        except Exception as exc:  # a scrape must not fail because the database is away
            log.warning("metrics: cannot count jobs: %s", type(exc).__name__)
        else:
            counts = {str(state): 0 for state in JobState}
            counts.update({str(state): int(n) for state, n in rows})
            jobs = GaugeMetricFamily("dicomnode_jobs", "Jobs by state.", labels=["state"])
            for state, n in counts.items():
                jobs.add_metric([state], n)
            yield jobs
        try:
            free = self.spool.free_bytes()
        except OSError as exc:
            log.warning("metrics: cannot read the spool's free space: %s", exc.strerror)
        else:
            yield GaugeMetricFamily(
                "dicomnode_spool_free_bytes", "Free bytes on the spool's disk.", value=free
            )


# The endpoint answers a scrape every 15 s and a health probe now and then, so a few
# threads are plenty; what must not happen is one thread per connection, which lets
# anyone who can reach the port grow the node by a thread per half-sent request.
HTTP_HANDLER_THREADS = 4  # threads that run the WSGI app (and the database query)
HTTP_REQUEST_SECONDS = 5.0  # for the whole request head to arrive, and for each reply
HTTP_MAX_PENDING = 64  # connections whose request head is still arriving
HTTP_MAX_QUEUED = 16  # complete requests waiting for a handler thread
HTTP_MAX_HEAD_BYTES = 16384  # a scrape's request head is a few hundred bytes
_BUSY_REPLY = (
    b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Connection: close\r\n\r\nbusy\n"
)


@dataclass
class _Pending:
    """A connection whose request head is still arriving."""

    address: Any
    deadline: float
    head: bytearray = field(default_factory=bytearray)


class _QuietHandler(WSGIRequestHandler):
    """Runs one request whose head the server has already read."""

    # setup() puts this on the socket: a client that does not read its answer holds a
    # handler thread for at most this long (sendall's timeout is for the whole reply).
    timeout = HTTP_REQUEST_SECONDS

    def __init__(self, request: Any, client_address: Any, server: Any, head: bytes = b"") -> None:
        self._head = head
        super().__init__(request, client_address, server)

    def setup(self) -> None:
        super().setup()
        self.rfile.close()
        # No body is read: /metrics and /healthz are GETs, and a body would only be
        # a client keeping a thread busy.
        self.rfile = io.BytesIO(self._head)

    def log_message(self, format: str, *args: Any) -> None:
        # One line per scrape every 15 s would drown the node's own log.
        pass


class _BoundedServer(WSGIServer):
    """A WSGI server with a fixed number of threads, whatever its clients do.

    One thread reads every connection's request head with a selector and drops it
    when the head is not complete within :data:`HTTP_REQUEST_SECONDS`; when
    :data:`HTTP_MAX_PENDING` heads are arriving, a new connection evicts the oldest
    (a real scrape sends its head at once, a stalled client never finishes, so the
    oldest is the one to go). Complete requests go to :data:`HTTP_HANDLER_THREADS`
    threads through a queue of :data:`HTTP_MAX_QUEUED`; beyond that the answer is 503
    at once. Silent or half-sent connections thus cost a descriptor for a few
    seconds, never a thread, and a scrape behind them is still answered.
    """

    request_queue_size = 128  # socketserver's 5 drops a scrape behind a burst

    def __init__(self, address: tuple[str, int]) -> None:
        super().__init__(address, _QuietHandler)
        self._requests: queue.Queue[tuple[socket.socket, Any, bytes] | None] = queue.Queue(
            HTTP_MAX_QUEUED
        )
        self._wake_read, self._wake_write = socket.socketpair()
        self._threads: list[threading.Thread] = []
        self._accept_warned = -60.0

    def start(self) -> None:
        """Start the reading thread and the handler threads."""
        self._threads = [threading.Thread(target=self._read_heads, name="metrics", daemon=True)]
        self._threads += [
            threading.Thread(target=self._handle, name=f"metrics-{i}", daemon=True)
            for i in range(HTTP_HANDLER_THREADS)
        ]
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop reading, let the handler threads finish, close every socket.

        Parameters
        ----------
        timeout : float
            Seconds to wait for each thread.
        """
        with contextlib.suppress(OSError):
            self._wake_write.send(b"x")
        handlers = self._threads[1:]
        if self._threads:
            self._threads[0].join(timeout)  # the reader: it closes the pending connections
        for _ in handlers:
            with contextlib.suppress(queue.Full):
                self._requests.put(None, timeout=timeout)
        for thread in handlers:
            thread.join(timeout)
        self._threads = []
        self.server_close()
        self._wake_read.close()
        self._wake_write.close()

    def _read_heads(self) -> None:
        listening = self.socket
        listening.setblocking(False)
        pending: dict[socket.socket, _Pending] = {}  # oldest first
        with selectors.DefaultSelector() as selector:
            selector.register(listening, selectors.EVENT_READ)
            selector.register(self._wake_read, selectors.EVENT_READ)

            def drop(conn: socket.socket) -> None:
                # Whatever an error below left half done, the connection goes: one
                # that stayed in ``pending`` would be dropped again at every turn.
                with contextlib.suppress(KeyError, ValueError):
                    selector.unregister(conn)
                pending.pop(conn, None)
                conn.close()

            try:
                while True:
                    try:
                        if self._read_once(listening, selector, pending, drop):
                            return
                    except Exception:
                        # This thread is /metrics and /healthz: whatever one connection
                        # did to it, the next scrape and probe must still be read.
                        log.exception("metrics: unexpected error, going on")
                        time.sleep(0.1)
            finally:
                for conn in list(pending):
                    drop(conn)

    def _read_once(
        self,
        listening: socket.socket,
        selector: selectors.BaseSelector,
        pending: dict[socket.socket, _Pending],
        drop: Callable[[socket.socket], None],
    ) -> bool:
        """Wait for one batch of events and handle it; return True once asked to stop."""
        oldest = next(iter(pending.values()), None)
        wait = None if oldest is None else max(oldest.deadline - time.monotonic(), 0)
        for key, _ in selector.select(wait):
            if key.fileobj is self._wake_read:
                return True
            if key.fileobj is listening:
                self._accept(listening, selector, pending, drop)
                continue
            conn = key.fileobj
            assert isinstance(conn, socket.socket)
            if conn in pending:
                self._receive(conn, pending, selector, drop)
        now = time.monotonic()
        # Deadlines are set at accept, so the oldest expire first.
        while pending:
            conn, first = next(iter(pending.items()))
            if first.deadline > now:
                break
            drop(conn)
        return False

    def _accept(
        self,
        listening: socket.socket,
        selector: selectors.BaseSelector,
        pending: dict[socket.socket, _Pending],
        drop: Callable[[socket.socket], None],
    ) -> None:
        while True:
            try:
                conn, address = listening.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    return  # ECONNABORTED and the like: that connection is gone, not us
                # Out of descriptors or memory: the listening socket stays readable, so
                # give one back (the oldest half-sent request) or pause, not spin.
                now = time.monotonic()
                if now - self._accept_warned > 60:
                    self._accept_warned = now
                    log.warning("metrics: cannot accept a connection: %s", exc.strerror)
                if pending:
                    drop(next(iter(pending)))
                else:
                    time.sleep(0.1)
                return
            if len(pending) >= HTTP_MAX_PENDING:
                drop(next(iter(pending)))
            conn.setblocking(False)
            pending[conn] = _Pending(address, time.monotonic() + HTTP_REQUEST_SECONDS)
            selector.register(conn, selectors.EVENT_READ)

    def _receive(
        self,
        conn: socket.socket,
        pending: dict[socket.socket, _Pending],
        selector: selectors.BaseSelector,
        drop: Callable[[socket.socket], None],
    ) -> None:
        try:
            data = conn.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        state = pending[conn]
        state.head += data
        if not data or len(state.head) > HTTP_MAX_HEAD_BYTES:
            drop(conn)
            return
        if b"\r\n\r\n" not in state.head and b"\n\n" not in state.head:
            return
        selector.unregister(conn)
        del pending[conn]
        conn.setblocking(True)
        try:
            self._requests.put_nowait((conn, state.address, bytes(state.head)))
        except queue.Full:
            with contextlib.suppress(OSError):
                conn.setblocking(False)
                conn.send(_BUSY_REPLY)  # fits any socket buffer; never waits
            conn.close()

    def _handle(self) -> None:
        while (request := self._requests.get()) is not None:
            conn, address, head = request
            try:
                _QuietHandler(conn, address, self, head)
            except Exception as exc:  # one bad client must not take a handler thread away
                log.debug("metrics: request failed: %s", type(exc).__name__)
            finally:
                self.shutdown_request(conn)


_App = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class MetricsServer:
    """``/metrics`` (Prometheus text format) and ``/healthz`` on a thread of their own.

    Parameters
    ----------
    settings : MetricsSettings
        Address and port.
    sessions : sessionmaker
        The database, counted at scrape time and pinged by ``/healthz``.
    spool : Spool
        Whose free space is reported.
    """

    def __init__(
        self, settings: MetricsSettings, sessions: sessionmaker[Session], spool: Spool
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.spool = spool
        self._server: _BoundedServer | None = None

    @property
    def port(self) -> int:
        """Return the bound port (the configured one until started)."""
        if self._server is None:
            return self.settings.port
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Enable the metrics and serve them in the background.

        Raises
        ------
        DicomnodeError
            If the address cannot be bound.
        """
        from prometheus_client import make_wsgi_app

        registry = metrics.enable([_StateCollector(self.sessions, self.spool)])
        try:
            server = _BoundedServer((self.settings.host, self.settings.port))
        except OSError as exc:
            metrics.disable()
            raise DicomnodeError(
                f"metrics: cannot listen on {self.settings.host}:{self.settings.port}: "
                f"{exc.strerror or exc}"
            ) from None
        server.set_app(self._app(make_wsgi_app(registry)))
        self._server = server
        server.start()
        log.info("metrics endpoint started address=%s:%d", self.settings.host, self.port)

    def stop(self) -> None:
        """Stop serving and make the hooks no-ops."""
        if self._server is not None:
            self._server.stop()
            self._server = None
        metrics.disable()

    def healthy(self) -> bool:
        """Return whether the database answers; the process answering is the rest."""
        try:
            with read_only(self.sessions)() as session:
                session.execute(text("SELECT 1"))
        except Exception as exc:
            log.warning("healthz: database unreachable: %s", type(exc).__name__)
            return False
        return True

    def _app(self, metrics_app: _App) -> _App:
        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            path = environ.get("PATH_INFO", "")
            if path == "/healthz":
                ok = self.healthy()
                status = "200 OK" if ok else "503 Service Unavailable"
                body = b"ok\n" if ok else b"database unreachable\n"
                start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
                return [body]
            if path in ("/metrics", "/"):
                return metrics_app(environ, start_response)
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"not found: try /metrics or /healthz\n"]

        return app
