"""Storage Commitment as recorded on the deliveries: requested, confirmed, failed, expired.

A delivery to a destination with ``storage_commitment`` is ``sent`` (and its job
``done``) once every C-STORE succeeded; the commitment is bookkeeping beside that
state (see :class:`~dicomnode.db.models.DeliveryState`). The PACS's report, which
usually arrives later on an association of its own, fills in ``confirmed_at``, or
``commitment_failed`` and re-opens the delivery: it goes back to ``pending`` and its
job, if done, is queued again, which re-sends the stored objects (same UIDs, so the
PACS gets no duplicate) and asks for a new commitment. A commitment that no report
answers within the destination's timeout is re-opened the same way.

A delivery whose commitment is still awaited (:func:`awaiting`) is kept whole: its
job, its results and its source series may all be needed to send again, so neither
``dicomnode jobs purge`` nor retention deletes them until the report has come (or
the timeout re-opened the delivery). Only the destination the request went to may
answer it: :func:`apply_report` takes the names of the destinations the reporting
peer was found to be, and leaves any other delivery alone.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, and_, select
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.db.engine import database_now, transaction
from dicomnode.db.jobs import record_event
from dicomnode.db.models import Delivery, DeliveryState, Job, JobState, Output

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReportOutcome:
    """What a commitment report did to its delivery."""

    job_id: int
    destination: str
    committed: int
    failed: int
    reopened: bool


@dataclass(frozen=True)
class WrongSender:
    """A report for a delivery to another destination than the peer that sent it."""

    job_id: int
    destination: str  # the delivery's: the only one that may answer


def awaiting() -> ColumnElement[bool]:
    """Return the SQL condition of a delivery whose commitment report is still awaited.

    Returns
    -------
    ColumnElement[bool]
        Sent, a commitment requested, no confirmation yet.
    """
    return and_(
        Delivery.state == DeliveryState.SENT,
        Delivery.commitment_uid.is_not(None),
        Delivery.confirmed_at.is_(None),
    )


def request(session: Session, delivery: Delivery, transaction_uid: str) -> None:
    """Record a commitment request on ``delivery``, before the N-ACTION is sent.

    Recorded first because the PACS may answer on another association before the
    N-ACTION's own response reaches us.

    Parameters
    ----------
    session : Session
        An open transaction.
    delivery : Delivery
        The delivery whose objects were just stored.
    transaction_uid : str
        The Transaction UID of the N-ACTION.
    """
    delivery.commitment_uid = transaction_uid
    # The database's clock, like the timeout sweep that compares with it.
    delivery.commitment_requested_at = database_now(session)
    delivery.confirmed_at = None
    delivery.commitment_failed = None


def withdraw(session: Session, delivery: Delivery) -> None:
    """Forget a request whose N-ACTION failed; a report for it is then unknown.

    Parameters
    ----------
    session : Session
        An open transaction.
    delivery : Delivery
        The delivery.
    """
    delivery.commitment_uid = None
    delivery.commitment_requested_at = None


def _reopen(session: Session, delivery: Delivery, note: str, now: datetime) -> bool:
    """Put a delivery back to pending and queue its job again if it was done.

    Returns whether the job was re-queued. A job that is still queued or running
    sends the delivery anyway (it is no longer ``sent``); a failed or cancelled job
    is left to the admin (``dicomnode jobs retry`` re-sends it).
    """
    delivery.state = DeliveryState.PENDING
    delivery.commitment_uid = None
    delivery.last_error = note
    # A fresh give-up window: the re-sending is retried like a first delivery.
    delivery.created_at = now
    job = session.get(Job, delivery.job_id, with_for_update=True)
    if job is None or job.state != JobState.DONE:
        return False
    job.state = JobState.QUEUED
    job.run_after = now
    job.finished_at = None
    job.last_error = note
    job.updated_at = now
    record_event(session, job, JobState.QUEUED, from_state=JobState.DONE, note=note, at=now)
    return True


def apply_report(
    sessions: sessionmaker[Session],
    transaction_uid: str,
    committed: Iterable[str],
    failed: Mapping[str, int | None],
    senders: Collection[str],
) -> ReportOutcome | WrongSender | None:
    """Record a Storage Commitment report (N-EVENT-REPORT) on its delivery.

    Parameters
    ----------
    sessions : sessionmaker[Session]
        Database sessions.
    transaction_uid : str
        The report's Transaction UID.
    committed : Iterable[str]
        SOP Instance UIDs the PACS commits to keep (Referenced SOP Sequence).
    failed : Mapping[str, int or None]
        SOP Instance UID -> Failure Reason of those it does not (Failed SOP Sequence).
    senders : Collection[str]
        Names of the destinations the reporting peer is (its AE title and address
        matched them). A delivery to any other destination is left as it is.

    Returns
    -------
    ReportOutcome or WrongSender or None
        None when no delivery waits for this Transaction UID (never ours, or given up
        on after the timeout); WrongSender when the delivery went to a destination
        not in ``senders`` (nothing changed). The caller logs and answers both.
    """
    with transaction(sessions) as session:
        delivery = session.scalar(
            select(Delivery).where(Delivery.commitment_uid == transaction_uid).with_for_update()
        )
        if delivery is None:
            return None
        # Checked under the row lock, against the delivery's own destination: a peer
        # that is one destination cannot answer for a transaction of another.
        if delivery.destination not in senders:
            return WrongSender(job_id=delivery.job_id, destination=delivery.destination)
        # Only now: a flood of unknown or misdirected reports costs one query each.
        now = database_now(session)
        sent = set(
            session.scalars(select(Output.sop_instance_uid).where(Output.job_id == delivery.job_id))
        )
        # An object we sent that the report names neither way is not committed either:
        # "confirmed" must mean every object, whatever the PACS forgot to list.
        missing = sent - set(committed) - set(failed)
        reasons = sorted({f"0x{r:04X}" for r in failed.values() if r is not None})
        n_failed = len(set(failed) | missing)
        reopened = False
        if n_failed:
            why = f" (reason {', '.join(reasons)})" if reasons else ""
            note = f"commitment failed: {n_failed} object(s) not committed{why}; re-sending"
            delivery.commitment_failed = f"{n_failed} object(s) not committed{why}"
            delivery.confirmed_at = None
            reopened = _reopen(session, delivery, note, now)
        else:
            delivery.confirmed_at = now
            delivery.commitment_failed = None
        return ReportOutcome(
            job_id=delivery.job_id,
            destination=delivery.destination,
            committed=len(set(committed)),
            failed=n_failed,
            reopened=reopened,
        )


def expire(sessions: sessionmaker[Session], timeouts: Mapping[str, float]) -> int:
    """Re-open deliveries whose commitment report is overdue.

    Parameters
    ----------
    sessions : sessionmaker[Session]
        Database sessions.
    timeouts : Mapping[str, float]
        Destination name -> ``commitment_timeout_seconds``; others are left alone.

    Returns
    -------
    int
        How many deliveries were re-opened.
    """
    if not timeouts:
        return 0
    count = 0
    with transaction(sessions) as session:
        now = database_now(session)
        oldest = now - timedelta(seconds=min(timeouts.values()))
        waiting = session.scalars(
            select(Delivery)
            .where(
                awaiting(),
                Delivery.destination.in_(list(timeouts)),
                Delivery.commitment_requested_at < oldest,
            )
            .with_for_update(skip_locked=True)
        ).all()
        for delivery in waiting:
            timeout = timeouts[delivery.destination]
            requested = delivery.commitment_requested_at
            if requested is None or (now - requested).total_seconds() < timeout:
                continue
            delivery.commitment_failed = f"no commitment report within {timeout:.0f} s"
            note = f"commitment timed out after {timeout:.0f} s; re-sending"
            _reopen(session, delivery, note, now)
            log.warning(
                "commitment timed out job_id=%d destination=%s; re-sending",
                delivery.job_id,
                delivery.destination,
            )
            count += 1
    return count
