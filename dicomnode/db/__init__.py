"""The database: SQLAlchemy models, the engine, the job queue's SQL, and the reads.

:mod:`~dicomnode.db.models` holds the tables, :mod:`~dicomnode.db.engine` the engine and
transactions (SQLite WAL with ``BEGIN IMMEDIATE``, or PostgreSQL), :mod:`~dicomnode.db.jobs`
claiming, leases, retry and cancel, :mod:`~dicomnode.db.purge` purging jobs, and the
read modules what the CLI and the metrics show, as plain values. Nothing here imports
from the layers above (``docs/architecture.md``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dicomnode.exports import lazy_exports

if TYPE_CHECKING:
    from dicomnode.db.engine import (
        Engine,
        Session,
        database_now,
        is_sqlite,
        make_engine,
        read,
        read_only,
        session_factory,
        sessionmaker,
        transaction,
    )
    from dicomnode.db.events import EVENTS
    from dicomnode.db.health import DeliveryCounts, listen_connections
    from dicomnode.db.jobs import (
        URGENT,
        Claim,
        cancel_replaced,
        cancel_superseded,
        enqueue,
        failing_since,
        merge_timings,
        reap_expired,
        requeue_replaced,
        set_state,
    )
    from dicomnode.db.models import (
        Delivery,
        DeliveryState,
        Instance,
        Job,
        JobState,
        Output,
        Series,
        SeriesState,
        Study,
        UTCDateTime,
        utcnow,
    )
    from dicomnode.db.queries import JobDetail, JobView, PreviewSource
    from dicomnode.db.studies import DELIVERY_STATE_ORDER, JOB_STATE_ORDER, StudyStory, StudySummary

# Each public name and the module it lives in. The modules load when a name is first
# used, so importing one of them does not import its siblings (the CLI's start-up).
_HOMES = {
    "Claim": "dicomnode.db.jobs",
    "DELIVERY_STATE_ORDER": "dicomnode.db.studies",
    "Delivery": "dicomnode.db.models",
    "DeliveryCounts": "dicomnode.db.health",
    "DeliveryState": "dicomnode.db.models",
    "EVENTS": "dicomnode.db.events",
    "Engine": "dicomnode.db.engine",
    "Instance": "dicomnode.db.models",
    "JOB_STATE_ORDER": "dicomnode.db.studies",
    "Job": "dicomnode.db.models",
    "JobDetail": "dicomnode.db.queries",
    "JobState": "dicomnode.db.models",
    "JobView": "dicomnode.db.queries",
    "Output": "dicomnode.db.models",
    "PreviewSource": "dicomnode.db.queries",
    "Series": "dicomnode.db.models",
    "SeriesState": "dicomnode.db.models",
    "Session": "dicomnode.db.engine",
    "Study": "dicomnode.db.models",
    "StudyStory": "dicomnode.db.studies",
    "StudySummary": "dicomnode.db.studies",
    "URGENT": "dicomnode.db.jobs",
    "UTCDateTime": "dicomnode.db.models",
    "cancel_replaced": "dicomnode.db.jobs",
    "cancel_superseded": "dicomnode.db.jobs",
    "database_now": "dicomnode.db.engine",
    "enqueue": "dicomnode.db.jobs",
    "failing_since": "dicomnode.db.jobs",
    "is_sqlite": "dicomnode.db.engine",
    "listen_connections": "dicomnode.db.health",
    "make_engine": "dicomnode.db.engine",
    "merge_timings": "dicomnode.db.jobs",
    "read": "dicomnode.db.engine",
    "read_only": "dicomnode.db.engine",
    "reap_expired": "dicomnode.db.jobs",
    "requeue_replaced": "dicomnode.db.jobs",
    "session_factory": "dicomnode.db.engine",
    "sessionmaker": "dicomnode.db.engine",
    "set_state": "dicomnode.db.jobs",
    "transaction": "dicomnode.db.engine",
    "utcnow": "dicomnode.db.models",
}

__all__ = [
    "DELIVERY_STATE_ORDER",
    "EVENTS",
    "JOB_STATE_ORDER",
    "URGENT",
    "Claim",
    "Delivery",
    "DeliveryCounts",
    "DeliveryState",
    "Engine",
    "Instance",
    "Job",
    "JobDetail",
    "JobState",
    "JobView",
    "Output",
    "PreviewSource",
    "Series",
    "SeriesState",
    "Session",
    "Study",
    "StudyStory",
    "StudySummary",
    "UTCDateTime",
    "cancel_replaced",
    "cancel_superseded",
    "database_now",
    "enqueue",
    "failing_since",
    "is_sqlite",
    "listen_connections",
    "make_engine",
    "merge_timings",
    "read",
    "read_only",
    "reap_expired",
    "requeue_replaced",
    "session_factory",
    "sessionmaker",
    "set_state",
    "transaction",
    "utcnow",
]
__getattr__, __dir__ = lazy_exports(__name__, _HOMES)
