"""The audit trail's event names, apart from its SQL so that a parser can list them."""

from __future__ import annotations

EVENTS = (
    "instances-received",
    "instances-refused",
    "association-rejected",
    "commitment-report-refused",
    "instances-imported",
    "job-queued",
    "job-ended",
    "results-sent",
    "results-resent",
    "instances-deleted",
    "admin",
    "audit-pruned",
)
