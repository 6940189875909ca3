"""SQLAlchemy 2.0 models: what was received, which jobs ran, where results went.

The tables are the node's only shared state: the job table is the queue, and a
listener on one host and workers on others coordinate through it alone.
Patient identifiers are stored (the CLI shows them on request) but never logged.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

UID = String(64)  # PS3.5: a UID is at most 64 characters


def utcnow() -> datetime:
    """Return the current time as an aware UTC datetime.

    Returns
    -------
    datetime
        Now, in UTC.
    """
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that is always stored and returned as aware UTC.

    SQLite has no time zone type and returns naive values; this puts UTC back on
    them so that arithmetic with :func:`utcnow` works on both databases.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Convert to UTC (naive on SQLite, which has no time zones); refuse naive input."""
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Return an aware UTC datetime."""
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class SeriesState(enum.StrEnum):
    """Where a series is in its life."""

    RECEIVING = "receiving"
    COMPLETE = "complete"


class JobState(enum.StrEnum):
    """The job state machine: queued -> running -> sending -> done | failed | cancelled."""

    QUEUED = "queued"
    RUNNING = "running"
    SENDING = "sending"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class DeliveryState(enum.StrEnum):
    """Outcome of sending one job's results to one destination.

    Storage Commitment is recorded beside the state, not as a state of its own: a
    delivery is ``sent`` once the destination answered every C-STORE, and the job is
    then done; ``confirmed_at`` is filled in when the commitment report arrives. A
    report of failures, or none within the timeout, puts the delivery back to
    ``pending`` and re-queues its job, which re-sends the stored objects. The queue
    logic therefore keeps its one question, "is every delivery sent?".
    """

    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    # Plain VARCHAR + CHECK rather than a native PostgreSQL ENUM: adding a state later
    # is then an ordinary migration on both databases.
    return Enum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=16,
        values_callable=lambda e: [m.value for m in e],
    )


class Base(DeclarativeBase):
    """Declarative base with a naming convention, so migrations name constraints."""

    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(column_0_label)s",
            "uq": "uq_%(table_name)s_%(column_0_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


class Study(Base):
    """A study, keyed by its Study Instance UID."""

    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(UID, unique=True)
    patient_id: Mapped[str | None] = mapped_column(String(64))  # PHI: never logged
    accession_number: Mapped[str | None] = mapped_column(String(16))  # PHI: never logged
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # For routes with scope = "study". ``pending_since``: a series of the study was
    # completed (first or again) at this time and the study has not been judged since;
    # set by the completion sweep only while study-scope routes exist, so that a route
    # added later does not run on every old study. ``completed_at``: when the study
    # was last found complete (every series complete and the study quiet), and
    # ``generation``: how often; a late series re-opens it (sets ``pending_since``),
    # and its study-scope routes choose their input series again.
    pending_since: Mapped[datetime | None] = mapped_column(UTCDateTime, index=True)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    generation: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Route name -> the latest choice of input series (see dicomnode.imaging.selection),
    # kept also when no series fitted, so that `studies show` can say why.
    selections: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    """A series; its state says whether it is still receiving."""

    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_uid: Mapped[str] = mapped_column(UID, unique=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    state: Mapped[SeriesState] = mapped_column(
        _enum(SeriesState, "series_state"), default=SeriesState.RECEIVING
    )
    # Bumped each time a late instance re-opens a completed series, so that the
    # re-run gets a new idempotency key and its results replace the earlier ones.
    generation: Mapped[int] = mapped_column(Integer, default=0)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    # Images in Acquisition while every instance so far agrees on it (NULL when they
    # carry none, -1 once two disagree): lets a counted series complete early.
    expected_instances: Mapped[int | None] = mapped_column(Integer)
    first_received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # When retention deleted the received instances (files and rows); the series, its
    # jobs and their history stay, so that `dicomnode studies show` still tells the story.
    purged_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Retrieved from a PACS as a prior for a job's comparison (the row is made before
    # the retrieval, so the listener stores its images like any others): it runs no
    # routes of its own and does not re-open its study for study-scope routes.
    prior: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")

    __table_args__ = (Index("ix_series_state_last_received", "state", "last_received_at"),)


class Instance(Base):
    """One received SOP instance and where its file lies in the spool."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    instance_number: Mapped[int | None] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)  # relative to the spool root
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    series: Mapped[Series] = relationship(back_populates="instances")


class Job(Base):
    """One model run on one series: the row is the queue entry."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    route: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(32))
    # The series' generation when the job was queued: a late instance bumps the
    # series' generation, and a job of an older generation is then superseded.
    generation: Mapped[int] = mapped_column(Integer, default=0)
    # Input series + generation + route + model + version: the same work is never
    # queued twice, and two routes running one model each get their job.
    idempotency_key: Mapped[str] = mapped_column(String(240), unique=True)
    state: Mapped[JobState] = mapped_column(_enum(JobState, "job_state"), default=JobState.QUEUED)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=5)
    run_after: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    # The worker of the latest claim; unlike lease_owner it stays after the job ends.
    claimed_by: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    # Seconds per stage (receive, wait, load, inference, ...), filled in as the job runs.
    timings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # Key results (measurements), for the CLI; the DICOM objects are the real output.
    summary: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # A study-scope route's job: which series was chosen among the study's, and why
    # (the study's choice when the job was queued); NULL for a series-scope route.
    selection: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # A route with priors: which prior study and series the job compared with, where it
    # came from (this node or the PACS), or why there was none.
    priors: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    series: Mapped[Series] = relationship()
    outputs: Mapped[list[Output]] = relationship(back_populates="job", order_by="Output.id")
    deliveries: Mapped[list[Delivery]] = relationship(back_populates="job", order_by="Delivery.id")
    events: Mapped[list[JobEvent]] = relationship(back_populates="job", order_by="JobEvent.id")

    __table_args__ = (Index("ix_jobs_claim", "state", "priority", "run_after"),)


class JobEvent(Base):
    """One state transition of a job: the job's history, written in the same transaction.

    Rows are added, never changed; the one exception is a claim that only repeated a
    wait for the same reason (another model's verdict), whose event is dropped so a
    long wait is one entry. They answer "what happened to this job, when, and on
    which worker" after the fact, which the job row alone (latest state, latest
    error) cannot.
    """

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # NULL for the creation; plain strings so that a new state needs no migration here.
    from_state: Mapped[str | None] = mapped_column(String(16))
    to_state: Mapped[str] = mapped_column(String(16))
    attempt: Mapped[int] = mapped_column(Integer)
    worker: Mapped[str | None] = mapped_column(String(128))
    note: Mapped[str | None] = mapped_column(Text)  # one line, no PHI

    job: Mapped[Job] = relationship(back_populates="events")


class Output(Base):
    """A DICOM object a job produced, written to the spool before it is sent."""

    __tablename__ = "outputs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # "seg", "sr", ...
    sop_class_uid: Mapped[str] = mapped_column(UID)
    sop_instance_uid: Mapped[str] = mapped_column(UID)
    series_uid: Mapped[str] = mapped_column(UID)
    path: Mapped[str] = mapped_column(Text)  # relative to the spool root
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    job: Mapped[Job] = relationship(back_populates="outputs")


class Delivery(Base):
    """Sending one job's outputs to one destination."""

    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    state: Mapped[DeliveryState] = mapped_column(
        _enum(DeliveryState, "delivery_state"), default=DeliveryState.PENDING
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Non-failure statuses of the last sending, e.g. "1 object(s) stored with warning
    # 0xB000": the objects count as stored, but the PACS changed something.
    warning: Mapped[str | None] = mapped_column(Text)
    # Storage Commitment (when the destination asks for it): the Transaction UID of
    # the latest N-ACTION, when it was sent, when the PACS confirmed every object,
    # and, when it did not, why ("2 object(s) not committed: ..."; kept after the
    # delivery is re-opened so that the CLI can say what happened).
    commitment_uid: Mapped[str | None] = mapped_column(UID, unique=True)
    commitment_requested_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    confirmed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    commitment_failed: Mapped[str | None] = mapped_column(Text)

    job: Mapped[Job] = relationship(back_populates="deliveries")

    __table_args__ = (UniqueConstraint("job_id", "destination"),)


class AuditEvent(Base):
    """One entry of the audit trail: who sent what, which jobs ran, where results went.

    Append-only: the application only ever inserts, and the migration that creates the
    table adds triggers that refuse UPDATE and DELETE on both databases, so that not
    even a bug (or a retention run) can rewrite the trail. Rows name AE titles,
    addresses, UIDs, job ids and counts; never patient data. There is no foreign key:
    the trail outlives the jobs and instances it mentions (``jobs purge``, retention).
    """

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    # See dicomnode.db.audit for the closed set of event names.
    event: Mapped[str] = mapped_column(String(32), index=True)
    # Who: a calling AE title, a worker id, or user@host for an admin command.
    actor: Mapped[str | None] = mapped_column(String(128))
    # From or to where: the sender's address, or AE@host:port of a destination.
    peer: Mapped[str | None] = mapped_column(String(300))
    study_uid: Mapped[str | None] = mapped_column(UID, index=True)
    series_uid: Mapped[str | None] = mapped_column(UID)
    job_id: Mapped[int | None] = mapped_column(Integer, index=True)
    destination: Mapped[str | None] = mapped_column(String(64))
    count: Mapped[int | None] = mapped_column(Integer)
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    outcome: Mapped[str] = mapped_column(String(16), default="success")
    detail: Mapped[str | None] = mapped_column(Text)  # one line, no PHI
