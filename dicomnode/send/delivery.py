"""Deliver a job's results to the destinations of its route: the workers' deliveries.

Each destination has one Delivery row per job, its state machine: an attempt counts
on it, a success marks it sent (never sent again, also when the job is retried for
another destination), a failure leaves it pending (retried) or failed. The audit
trail's row is written in the delivery's own transaction, so the trail says "sent"
exactly when the delivery does. A destination that asks for storage commitment gets
an N-ACTION after the C-STOREs; its report, which may come back on another
association, confirms the delivery later.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicomnode import metrics
from dicomnode.config import Destination, Settings
from dicomnode.db import Claim, Delivery, DeliveryState, audit, database_now, transaction
from dicomnode.db import commitment as commitment_db
from dicomnode.errors import DeliveryFailed, PermanentJobError, TransientJobError
from dicomnode.send import commitment, scu

log = logging.getLogger(__name__)


def deliver(
    settings: Settings,
    sessions: sessionmaker[Session],
    claim: Claim,
    send_to: Sequence[str],
    files: list[Path],
    *,
    study_uid: str,
    series_uid: str,
    checkpoint: Callable[[], None],
) -> None:
    """Send a job's recorded outputs to each destination not yet sent to.

    Parameters
    ----------
    settings : Settings
        The destinations, our AE title, the UID root (commitment transactions).
    sessions : sessionmaker[Session]
        Database sessions.
    claim : Claim
        The job and our lease on it.
    send_to : Sequence[str]
        The route's destination names.
    files : list[Path]
        The outputs, in the spool.
    study_uid, series_uid : str
        The job's input series, for the audit trail.
    checkpoint : Callable[[], None]
        Raises :class:`~dicomnode.errors.JobInterrupted` when the worker must stop;
        asked before each destination.

    Raises
    ------
    DeliveryFailed
        If a destination failed and may be retried (the others were still tried).
    PermanentJobError
        If every destination that failed failed for good.
    JobInterrupted
        From ``checkpoint``.
    """
    failures: list[tuple[str, bool]] = []
    for name in send_to:
        checkpoint()
        with transaction(sessions) as session:
            delivery = _delivery(session, claim.job_id, name)
            if delivery is None:
                # Created by the database's clock: the delivery window (how long a
                # destination has been failing) is judged by it.
                delivery = Delivery(
                    job_id=claim.job_id,
                    destination=name,
                    attempts=0,
                    created_at=database_now(session),
                )
                session.add(delivery)
            if delivery.state == DeliveryState.SENT:
                continue
            delivery.attempts += 1
        error: str | None = None
        retryable = False
        warning: str | None = None
        committing = False
        destination: Destination | None = None
        try:
            destination = settings.destination(name)
            committing = destination.storage_commitment
            warning = _send(settings, sessions, claim, destination, files)
        except (TransientJobError, PermanentJobError) as exc:
            error, retryable = str(exc), exc.retryable
        except Exception as exc:  # the network stack can raise anything
            error, retryable = f"destination {name}: {type(exc).__name__}: {exc}", True
        with transaction(sessions) as session:
            delivery = _delivery(session, claim.job_id, name)
            assert delivery is not None  # created above, never deleted
            if error is None and committing and delivery.commitment_uid is None:
                # The PACS reported failures on the N-ACTION's own association,
                # which re-opened the delivery while we were still sending.
                error, retryable = f"destination {name}: {delivery.last_error}", True
            _audit_delivery(
                session,
                claim,
                name,
                destination,
                len(files),
                error,
                warning,
                study_uid=study_uid,
                series_uid=series_uid,
            )
            if error is None:
                delivery.state = DeliveryState.SENT
                delivery.sent_at = database_now(session)
                delivery.last_error = None
                delivery.warning = warning
                log.info(
                    "delivered job_id=%d destination=%s objects=%d",
                    claim.job_id,
                    name,
                    len(files),
                )
            else:
                delivery.state = DeliveryState.PENDING if retryable else DeliveryState.FAILED
                delivery.last_error = error
                failures.append((error, retryable))
                metrics.delivery_failed(name)
                log.warning("delivery failed job_id=%d destination=%s", claim.job_id, name)
    if failures:
        message = "; ".join(e for e, _ in failures)
        if any(r for _, r in failures):
            raise DeliveryFailed(message)
        raise PermanentJobError(message)


def _audit_delivery(
    session: Session,
    claim: Claim,
    name: str,
    destination: Destination | None,
    count: int,
    error: str | None,
    warning: str | None,
    *,
    study_uid: str,
    series_uid: str,
) -> None:
    # In the delivery's own transaction: the trail says "sent" exactly when the
    # delivery row does.
    audit.record(
        session,
        "results-sent",
        outcome="failure" if error else "warning" if warning else "success",
        actor=claim.owner,
        peer=None if destination is None else destination.address,
        destination=name,
        job_id=claim.job_id,
        study_uid=study_uid,
        series_uid=series_uid,
        count=count,
        detail=error or warning,
    )


def _send(
    settings: Settings,
    sessions: sessionmaker[Session],
    claim: Claim,
    destination: Destination,
    files: list[Path],
) -> str | None:
    """C-STORE ``files`` and, if the destination wants it, request storage commitment.

    Returns a note of warning statuses (the objects count as stored), or None.
    """
    calling_ae = settings.listener.ae_title
    statuses = scu.send_files(destination, files, calling_ae)
    warned = Counter(code for code in statuses if code != 0)
    warning = "; ".join(
        f"{n} object(s) stored with warning 0x{code:04X}" for code, n in sorted(warned.items())
    )
    if destination.storage_commitment:
        uid = commitment.new_transaction_uid(settings.outputs.uid_root)
        # Recorded before the N-ACTION: the report may come back on another
        # association (to the listener, perhaps in another process) before the
        # N-ACTION's response reaches us.
        with transaction(sessions) as session:
            delivery = _delivery(session, claim.job_id, destination.name)
            assert delivery is not None
            commitment_db.request(session, delivery, uid)
        try:
            commitment.request_commitment(
                destination,
                commitment.references(files),
                uid,
                calling_ae,
                sessions,
            )
        except BaseException:
            with transaction(sessions) as session:
                delivery = _delivery(session, claim.job_id, destination.name)
                assert delivery is not None
                commitment_db.withdraw(session, delivery)
            raise
    return warning or None


def _delivery(session: Session, job_id: int, destination: str) -> Delivery | None:
    return session.scalar(
        select(Delivery).where(Delivery.job_id == job_id, Delivery.destination == destination)
    )
