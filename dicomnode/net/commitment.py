"""Storage Commitment Push Model (PS3.4 Annex J): asking a PACS to keep what we sent.

As SCU we send N-ACTION (Action Type 1, "request storage commitment") with a new
Transaction UID and the SOP Class and Instance UIDs of the objects just stored. The
PACS answers with N-EVENT-REPORT (Event Type 1: all committed; 2: some failed, in
Failed SOP Sequence), on the same association if it is still open, or, usually
(Orthanc does), later on a new association to our listener, in which the PACS
takes the SCP role of the SOP class. :class:`ReportHandler` handles it in both
places and records the outcome on the delivery (:mod:`dicomnode.db.commitment`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, cast

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import N_EVENT_REPORT
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.config import Destination
from dicomnode.db import commitment
from dicomnode.errors import PermanentJobError, TransientJobError
from dicomnode.net import status
from dicomnode.net.scu import associate
from dicomnode.store.uids import is_safe_uid

log = logging.getLogger(__name__)

STORAGE_COMMITMENT_PUSH = "1.2.840.10008.1.20.1"
# The well-known SOP Instance every N-ACTION and N-EVENT-REPORT of the class names.
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"
REQUEST_COMMITMENT = 1  # Action Type ID
ALL_COMMITTED = 1  # Event Type IDs
SOME_FAILED = 2


def references(paths: Iterable[Path]) -> list[tuple[str, str]]:
    """Return the (SOP Class UID, SOP Instance UID) of each file, reading only those.

    Parameters
    ----------
    paths : Iterable[Path]
        DICOM files.

    Returns
    -------
    list[tuple[str, str]]
        In the order given.
    """
    out = []
    for path in paths:
        ds = pydicom.dcmread(path, specific_tags=["SOPClassUID", "SOPInstanceUID"])
        out.append((str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
    return out


def new_transaction_uid(root: str | None = None) -> str:
    """Return a fresh Transaction UID (under ``root`` when given, else pydicom's).

    Parameters
    ----------
    root : str, optional
        A UID prefix ending in '.'.

    Returns
    -------
    str
        The UID.
    """
    return str(generate_uid(prefix=root or None))


def request_dataset(transaction_uid: str, refs: Sequence[tuple[str, str]]) -> Dataset:
    """Build the N-ACTION Action Information for ``refs``.

    Parameters
    ----------
    transaction_uid : str
        The new Transaction UID.
    refs : Sequence[tuple[str, str]]
        (SOP Class UID, SOP Instance UID) of each object.

    Returns
    -------
    Dataset
        Transaction UID and Referenced SOP Sequence.
    """
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    items = []
    for sop_class, sop_instance in refs:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        items.append(item)
    ds.ReferencedSOPSequence = items
    return ds


def request_commitment(
    destination: Destination,
    refs: Sequence[tuple[str, str]],
    transaction_uid: str,
    calling_ae: str,
    handler: ReportHandler | None = None,
) -> None:
    """Send the N-ACTION that asks ``destination`` to commit to keeping ``refs``.

    Parameters
    ----------
    destination : Destination
        The PACS (over TLS if it has ``tls_ca``).
    refs : Sequence[tuple[str, str]]
        (SOP Class UID, SOP Instance UID) of the objects sent.
    transaction_uid : str
        Recorded on the delivery before this is called.
    calling_ae : str
        Our AE title; the PACS must know it (and our listener's address) to report.
    handler : ReportHandler, optional
        Handles a report that arrives on this association before it is released.

    Raises
    ------
    PermanentJobError
        If the destination does not support Storage Commitment (a configuration error).
    TransientJobError
        If it cannot be reached or does not accept the request.
    """
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(STORAGE_COMMITMENT_PUSH)
    handlers = [] if handler is None else [(evt.EVT_N_EVENT_REPORT, handler)]
    assoc = associate(ae, destination, handlers)
    name = destination.name
    try:
        if not any(c.abstract_syntax == STORAGE_COMMITMENT_PUSH for c in assoc.accepted_contexts):
            raise PermanentJobError(
                f"destination {name}: does not accept Storage Commitment "
                "(set storage_commitment = false for it)"
            )
        reply, _ = assoc.send_n_action(
            request_dataset(transaction_uid, refs),
            REQUEST_COMMITMENT,
            STORAGE_COMMITMENT_PUSH,
            STORAGE_COMMITMENT_INSTANCE,
        )
        if "Status" not in reply:
            raise TransientJobError(f"destination {name}: no reply to the commitment N-ACTION")
        code = int(reply.Status)
        if code != status.SUCCESS:
            raise TransientJobError(
                f"destination {name}: commitment N-ACTION failed with status 0x{code:04X}"
            )
    finally:
        if assoc.is_established:
            assoc.release()
    log.info(
        "commitment requested destination=%s transaction_uid=%s objects=%d",
        name,
        transaction_uid,
        len(refs),
    )


def _uids(items: Any, keyword: str) -> list[str]:
    return [str(item.get(keyword, "")) for item in items or []]


class ReportHandler:
    """Handles N-EVENT-REPORT of the Storage Commitment Push Model (``evt.EVT_N_EVENT_REPORT``).

    Parameters
    ----------
    sessions : sessionmaker[Session]
        Database sessions; the report is recorded before it is answered.
    """

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def __call__(self, event: evt.Event) -> tuple[int, Dataset | None]:
        """Record the report and return (status, no Event Reply).

        Parameters
        ----------
        event : evt.Event
            The N-EVENT-REPORT event.

        Returns
        -------
        tuple[int, Dataset or None]
            Success, or a failure status for a report we cannot use; never raises.
        """
        request = cast(N_EVENT_REPORT, event.request)
        if str(request.AffectedSOPClassUID) != STORAGE_COMMITMENT_PUSH:
            log.warning("event report of SOP class %s ignored", request.AffectedSOPClassUID)
            return status.PROCESSING_FAILURE, None
        event_type = request.EventTypeID
        if event_type not in (ALL_COMMITTED, SOME_FAILED):
            log.warning("commitment report with event type %s ignored", event_type)
            return status.NO_SUCH_EVENT_TYPE, None
        try:
            info = event.event_information
            transaction_uid = str(info.get("TransactionUID", ""))
            committed = _uids(info.get("ReferencedSOPSequence"), "ReferencedSOPInstanceUID")
            failed_items = info.get("FailedSOPSequence") or []
            failed = {
                str(item.get("ReferencedSOPInstanceUID", "")): (
                    int(item.FailureReason) if "FailureReason" in item else None
                )
                for item in failed_items
            }
        except Exception:  # an undecodable dataset from the peer
            log.warning("commitment report unreadable", exc_info=True)
            return status.PROCESSING_FAILURE, None
        if not transaction_uid or not is_safe_uid(transaction_uid):
            log.warning("commitment report without a valid Transaction UID ignored")
            return status.MISSING_ATTRIBUTE, None
        try:
            outcome = commitment.apply_report(self.sessions, transaction_uid, committed, failed)
        except Exception:
            log.exception("commitment report transaction_uid=%s not recorded", transaction_uid)
            return status.PROCESSING_FAILURE, None
        if outcome is None:
            # Not ours, or given up on after the timeout and re-sent under a new UID.
            log.warning("commitment report for unknown transaction_uid=%s ignored", transaction_uid)
            return status.INVALID_ARGUMENT_VALUE, None
        if outcome.failed:
            log.warning(
                "commitment failed job_id=%d destination=%s failed=%d transaction_uid=%s%s",
                outcome.job_id,
                outcome.destination,
                outcome.failed,
                transaction_uid,
                "; re-sending" if outcome.reopened else "",
            )
        else:
            log.info(
                "commitment confirmed job_id=%d destination=%s objects=%d transaction_uid=%s",
                outcome.job_id,
                outcome.destination,
                outcome.committed,
                transaction_uid,
            )
        return status.SUCCESS, None
