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

import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

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


REJECT_REASONS = ("called_ae", "calling_ae", "too_many", "address")


def rejection_reason(assoc: Any) -> str:
    """Tell why an association was rejected: called_ae, calling_ae, too_many or address.

    pynetdicom does not pass the A-ASSOCIATE-RJ to the event, so the reason is worked
    out again from the request, in pynetdicom's own order (the last check wins).

    Parameters
    ----------
    assoc : pynetdicom.association.Association
        The association of the EVT_REJECTED event.

    Returns
    -------
    str
        The reason.
    """
    reason = "address"  # our own check of allowed_networks (scp._reject_at_negotiation)
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


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    # A slow scraper must not hold up /healthz, nor a stuck one the shutdown.
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        # One line per scrape every 15 s would drown the node's own log.
        pass


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
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

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
        app = self._app(make_wsgi_app(registry))
        try:
            server = make_server(
                self.settings.host,
                self.settings.port,
                app,
                server_class=_ThreadingServer,
                handler_class=_QuietHandler,
            )
        except OSError as exc:
            disable()
            raise DicomnodeError(
                f"metrics: cannot listen on {self.settings.host}:{self.settings.port}: "
                f"{exc.strerror or exc}"
            ) from None
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="metrics", daemon=True
        )
        self._thread.start()
        log.info("metrics endpoint started address=%s:%d", self.settings.host, self.port)

    def stop(self) -> None:
        """Stop serving and make the hooks no-ops."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
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
