"""Prometheus metrics of this process: the hooks the rest of dicomnode calls.

A sink: it imports nothing else of dicomnode, so any layer may call it. Optional:
``pip install 'dicomnode[metrics]'`` and ``[metrics] enabled = true``. The rest of
dicomnode calls the hooks below (:func:`instance_stored`, :func:`association_accepted`,
...) unconditionally; until :func:`enable` has run they return at once, so a node
without metrics pays one global lookup per hook and never imports prometheus_client.
The HTTP endpoint that exposes them, and the gauges read from the database and the
spool at scrape time, are in :mod:`dicomnode.metrics_server`.

What is counted here is counted in this process only. With ``listener.processes``
above 1 the receiver child processes take most associations, and their counters
are not scraped (prometheus_client's multiprocess mode would need a shared folder
and a cleanup protocol; not worth it for a receive-side count).

No label carries patient data: labels are job states, stage names, model names,
destination names and rejection reasons, all from the configuration or the code.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Histogram
    from prometheus_client.registry import Collector

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


def enable(collectors: Iterable[Collector] = ()) -> CollectorRegistry:
    """Create the metrics of this process and make the hooks record into them.

    Each call starts from zero in a registry of its own (not prometheus_client's
    global one), so a test can build several nodes in one process.

    Parameters
    ----------
    collectors : Iterable[Collector]
        More collectors to register beside the hooks' metrics (the node's gauges read
        at scrape time: jobs by state, the spool's free space).

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
    for collector in collectors:
        registry.register(collector)
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


# The gate's reasons (dicomnode.listener.scp, dicomnode.listener.admission) and "other" for a
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
