"""Prometheus metrics and the small HTTP server that exposes them.

Optional: ``pip install 'dicomnode[metrics]'`` and ``[metrics] enabled = true``. The
rest of dicomnode calls the hooks below (:func:`instance_stored`,
:func:`association_accepted`, ...) unconditionally; until :func:`enable` has run
they return at once, so a node without metrics pays one global lookup per hook and
never imports prometheus_client.

What is counted here is counted in this process only. With ``listener.processes``
above 1 the receiver child processes take most associations, and their counters
are not scraped (prometheus_client's multiprocess mode would need a shared folder
and a cleanup protocol; not worth it for a receive-side count). The jobs-by-state
and disk-free gauges are read from the database and the spool at scrape time, so
they are right in every process, and the same in every process of a scaled-out
site: aggregate them with ``max``, not ``sum``.

No label carries patient data: labels are job states, stage names, model names,
destination names and rejection reasons, all from the configuration or the code.
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
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.config import MetricsSettings
from dicomnode.db.engine import read_only
from dicomnode.db.models import Job, JobState
from dicomnode.errors import DicomnodeError
from dicomnode.store.spool import Spool

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Histogram
    from prometheus_client.core import Metric

log = logging.getLogger(__name__)

# Seconds, from a fast send to a slow model on the CPU or a long quiet period.
STAGE_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

# Job timing keys (see dicomnode.pipeline) -> the ``stage`` label; "outputs" is the sum
# of building the SEG, the SR and the overlay, which an operator sees as one step.
STAGES: dict[str, tuple[str, ...]] = {
    "receive": ("receive_s",),
    "wait": ("wait_s",),
    "inference": ("inference_s",),
    "outputs": ("seg_s", "sr_s", "sc_s"),
    "send": ("send_s",),
}


@dataclass
class _Metrics:
    registry: CollectorRegistry
    instances: Counter
    received_bytes: Counter
    accepted: Counter
    rejected: Counter
    stage_seconds: Histogram
    inference_seconds: Histogram
    delivery_failures: Counter
    retention_bytes: Counter
    retention_series: Counter


_active: _Metrics | None = None


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


def enable(sessions: sessionmaker[Session], spool: Spool) -> CollectorRegistry:
    """Create the metrics of this process and make the hooks record into them.

    Each call starts from zero in a registry of its own (not prometheus_client's
    global one), so a test can build several nodes in one process.

    Parameters
    ----------
    sessions : sessionmaker
        For counting jobs by state at scrape time.
    spool : Spool
        Whose free space is reported.

    Returns
    -------
    CollectorRegistry
        The registry the HTTP server exposes.
    """
    global _active
    from prometheus_client import (
        GC_COLLECTOR,
        PLATFORM_COLLECTOR,
        PROCESS_COLLECTOR,
        CollectorRegistry,
        Counter,
        Histogram,
    )

    registry = CollectorRegistry()
    for standard in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(standard)  # memory, CPU and open files, as exporters usually give
    registry.register(_StateCollector(sessions, spool))
    _active = _Metrics(
        registry=registry,
        instances=Counter(
            "dicomnode_instances_received",
            "Instances stored after a successful C-STORE (this process).",
            registry=registry,
        ),
        received_bytes=Counter(
            "dicomnode_received_bytes",
            "Bytes of the instances stored (this process).",
            registry=registry,
        ),
        accepted=Counter(
            "dicomnode_associations_accepted",
            "Associations accepted (this process).",
            registry=registry,
        ),
        rejected=Counter(
            "dicomnode_associations_rejected",
            "Associations rejected, by reason (this process).",
            ["reason"],
            registry=registry,
        ),
        stage_seconds=Histogram(
            "dicomnode_stage_seconds",
            "Seconds per stage of the jobs done: receive, wait, inference, outputs, send.",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=registry,
        ),
        inference_seconds=Histogram(
            "dicomnode_inference_seconds",
            "Seconds of model inference per job done, by model.",
            ["model"],
            buckets=STAGE_BUCKETS,
            registry=registry,
        ),
        delivery_failures=Counter(
            "dicomnode_delivery_failures",
            "Failed attempts to send results, by destination.",
            ["destination"],
            registry=registry,
        ),
        retention_bytes=Counter(
            "dicomnode_retention_deleted_bytes",
            "Bytes of instances and results retention deleted, by reason: scheduled or "
            "emergency (this process).",
            ["reason"],
            registry=registry,
        ),
        retention_series=Counter(
            "dicomnode_retention_deleted_series",
            "Series whose instances retention deleted, by reason (this process).",
            ["reason"],
            registry=registry,
        ),
    )
    # Zero series exist from the start, so rate() and alerts see them before the first event.
    for reason in REJECT_REASONS:
        _active.rejected.labels(reason=reason)
    for stage in STAGES:
        _active.stage_seconds.labels(stage=stage)
    for reason in ("scheduled", "emergency"):
        _active.retention_bytes.labels(reason=reason)
        _active.retention_series.labels(reason=reason)
    return registry


def disable() -> None:
    """Make the hooks no-ops again (the node stopped)."""
    global _active
    _active = None


# -- hooks: one call each from the listener, the ingestor and the pipeline ----------


def instance_stored(size: int) -> None:
    """Count an instance stored and acknowledged, of ``size`` bytes."""
    m = _active
    if m is None:
        return
    m.instances.inc()
    m.received_bytes.inc(size)


def retention_deleted(reason: str, size: int) -> None:
    """Count a series retention deleted.

    Parameters
    ----------
    reason : str
        ``scheduled`` or ``emergency``.
    size : int
        Bytes freed.
    """
    m = _active
    if m is not None:
        m.retention_series.labels(reason=reason).inc()
        m.retention_bytes.labels(reason=reason).inc(size)


def association_accepted() -> None:
    """Count an accepted association."""
    m = _active
    if m is not None:
        m.accepted.inc()


# The gate's reasons (dicomnode.net.scp, dicomnode.net.admission) and "other" for a
# rejection pynetdicom made itself (a User Identity it refused, say).
REJECT_REASONS = (
    "called_ae",
    "calling_ae",
    "too_many",
    "too_many_from_address",
    "address",
    "other",
)


def rejection_reason(assoc: Any) -> str:
    """Tell why pynetdicom rejected an association: called_ae, calling_ae, too_many or other.

    The gate rejects almost everything before pynetdicom sees it and knows its
    reasons; this is for what gets past it. pynetdicom does not pass the
    A-ASSOCIATE-RJ to the event, so the reason is worked out again from the request,
    in pynetdicom's own order (the last check wins).

    Parameters
    ----------
    assoc : pynetdicom.association.Association
        The association of the EVT_REJECTED event.

    Returns
    -------
    str
        The reason.
    """
    reason = "other"
    try:
        ae = assoc.ae
        request = assoc.acse.requestor.primitive
        if ae.require_calling_aet and request.calling_ae_title not in [
            s.strip() for s in ae.require_calling_aet
        ]:
            reason = "calling_ae"
        if ae.require_called_aet and request.called_ae_title != ae.ae_title.strip():
            reason = "called_ae"
        acceptors = [a for a in ae.active_associations if a.is_acceptor]
        if len(acceptors) > ae.maximum_associations:
            reason = "too_many"
    except Exception:  # telling must never break the listener
        log.debug("cannot tell why an association was rejected", exc_info=True)
    return reason


def association_rejected(reason: str) -> None:
    """Count a rejected association.

    Parameters
    ----------
    reason : str
        From :func:`rejection_reason`.
    """
    m = _active
    if m is None:
        return
    m.rejected.labels(reason=reason).inc()


def job_finished(model: str, timings: Mapping[str, Any]) -> None:
    """Observe the stage durations of a job that finished.

    Parameters
    ----------
    model : str
        The job's model (a package name, no patient data).
    timings : Mapping[str, Any]
        The job's timings (``receive_s``, ``inference_s``, ...); absent stages are skipped.
    """
    m = _active
    if m is None:
        return
    for stage, keys in STAGES.items():
        values = [float(timings[k]) for k in keys if isinstance(timings.get(k), int | float)]
        if values:
            m.stage_seconds.labels(stage=stage).observe(max(sum(values), 0.0))
    inference = timings.get("inference_s")
    if isinstance(inference, int | float):
        m.inference_seconds.labels(model=model).observe(float(inference))


def delivery_failed(destination: str) -> None:
    """Count a failed attempt to send a job's results to ``destination``."""
    m = _active
    if m is not None:
        m.delivery_failures.labels(destination=destination).inc()


# -- the HTTP endpoint --------------------------------------------------------------


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

        registry = enable(self.sessions, self.spool)
        try:
            server = _BoundedServer((self.settings.host, self.settings.port))
        except OSError as exc:
            disable()
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
        disable()

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
