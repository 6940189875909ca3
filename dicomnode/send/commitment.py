"""Storage Commitment Push Model (PS3.4 Annex J): asking a PACS to keep what we sent.

As SCU we send N-ACTION (Action Type 1, "request storage commitment") with a new
Transaction UID and the SOP Class and Instance UIDs of the objects just stored. The
PACS answers with N-EVENT-REPORT (Event Type 1: all committed; 2: some failed, in
Failed SOP Sequence), on the same association if it is still open, or, usually
(Orthanc does), later on a new association to our listener, in which the PACS
takes the SCP role of the SOP class. :class:`ReportHandler` handles it in both
places and records the outcome on the delivery (:mod:`dicomnode.db.commitment`).

A report is accepted only from the destination the request went to: its AE title as
the calling AE, from one of the addresses its configured host resolves to (the port
does not matter: a PACS reports from a port of its own choosing). A report that marks
a delivery committed makes its source series deletable by retention, so anything
else is refused, and audited as ``commitment-report-refused``.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
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
from dicomnode.dimse import IPAddress, Receipts, ip_address, statuses
from dicomnode.errors import PermanentJobError, TransientJobError
from dicomnode.logs import shown
from dicomnode.send.scu import associate
from dicomnode.store import is_safe_uid

log = logging.getLogger(__name__)

STORAGE_COMMITMENT_PUSH = "1.2.840.10008.1.20.1"
# The well-known SOP Instance every N-ACTION and N-EVENT-REPORT of the class names.
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"
REQUEST_COMMITMENT = 1  # Action Type ID
ALL_COMMITTED = 1  # Event Type IDs
SOME_FAILED = 2
# The answer to a report from a peer that is not the destination asked. PS3.7
# 10.1.1.1.8 lists the statuses an N-EVENT-REPORT may return, and "Refused: Not
# authorized" (0x0124) is not among them; "Class-instance conflict" (0x0119) would say
# the SOP Instance is not of its class, which is false here (it is the well-known
# instance). Processing failure is the listed general failure; its Error Comment
# says why, for the sender's log.
REFUSED_SENDER = statuses.PROCESSING_FAILURE
REFUSED_SENDER_COMMENT = "refused: not from the destination asked to commit"
# How long a destination host's resolved addresses are reused: a PACS answers once per
# delivery, and a peer that floods reports must not cost a DNS lookup each. A name
# that did not resolve is tried again sooner (DNS may have been down a moment).
RESOLVE_TTL_SECONDS = 60.0
UNRESOLVED_TTL_SECONDS = 10.0


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
    sessions: sessionmaker[Session],
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
    sessions : sessionmaker[Session]
        Where a report that arrives on this association before it is released is
        recorded; it counts for a transaction of ``destination`` only.

    Raises
    ------
    PermanentJobError
        If the destination does not support Storage Commitment (a configuration error).
    TransientJobError
        If it cannot be reached or does not accept the request.
    """
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(STORAGE_COMMITMENT_PUSH)
    # The peer on this association is the destination we called: no need to check who
    # it is, but a report on it counts for that destination's transactions only.
    reports = ReportHandler(sessions, [destination], called=True)
    assoc = associate(ae, destination, [(evt.EVT_N_EVENT_REPORT, reports)])
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
        if code != statuses.SUCCESS:
            raise TransientJobError(
                f"destination {name}: commitment N-ACTION failed with status 0x{code:04X}"
            )
    finally:
        if assoc.is_established:
            assoc.release()
        reports.receipts.flush()
    log.info(
        "commitment requested destination=%s transaction_uid=%s objects=%d",
        name,
        transaction_uid,
        len(refs),
    )


def _uids(items: Any, keyword: str) -> list[str]:
    return [str(item.get(keyword, "")) for item in items or []]


def resolve(host: str) -> frozenset[IPAddress]:
    """Return every address ``host`` resolves to (itself, for an address).

    A name may resolve to several addresses (IPv4 and IPv6, a PACS cluster); a report
    from any of them is from that host.

    Parameters
    ----------
    host : str
        A destination's configured host.

    Returns
    -------
    frozenset[IPv4Address | IPv6Address]
        Empty when the name does not resolve (its reports are then refused).
    """
    literal = ip_address(host)
    if literal is not None:
        return frozenset({literal})
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError as exc:
        log.warning("commitment: cannot resolve destination host %s: %s", shown(host), exc)
        return frozenset()
    return frozenset(ip for info in infos if (ip := ip_address(str(info[4][0]))) is not None)


def _reporter(assoc: Any) -> tuple[str, str]:
    """Return the AE title and address of the peer that sent a report on ``assoc``."""
    peer = assoc.acceptor if assoc.is_requestor else assoc.requestor
    return str(peer.ae_title), str(peer.address)


class ReportHandler:
    """Handles N-EVENT-REPORT of the Storage Commitment Push Model (``evt.EVT_N_EVENT_REPORT``).

    Parameters
    ----------
    sessions : sessionmaker[Session]
        Database sessions; the report is recorded before it is answered.
    destinations : Iterable[Destination]
        The destinations whose reports count: a report must come from one of them (AE
        title and address), and its transaction must be one of that destination's.
        With none, every report is refused.
    receipts : Receipts, optional
        Where refused reports are counted and audited (the listener's, so that its
        stop writes what is still counted); a handler of its own otherwise.
    resolver : Callable[[str], frozenset], optional
        Host name to addresses (:func:`resolve`); replaceable for tests.
    called : bool
        The handler of an association we opened to its one destination: the peer is
        that destination, and is not checked again.
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        destinations: Iterable[Destination] = (),
        *,
        receipts: Receipts | None = None,
        resolver: Callable[[str], frozenset[IPAddress]] = resolve,
        called: bool = False,
    ) -> None:
        self.sessions = sessions
        self.called = called
        self.destinations = tuple(destinations)
        self.receipts = receipts if receipts is not None else Receipts(sessions)
        self._resolver = resolver
        self._lock = threading.Lock()
        self._resolved: dict[str, tuple[float, frozenset[IPAddress]]] = {}

    def _addresses(self, host: str) -> frozenset[IPAddress]:
        now = time.monotonic()
        with self._lock:
            cached = self._resolved.get(host)
        if cached is not None and cached[0] > now:
            return cached[1]
        addresses = self._resolver(host)
        ttl = RESOLVE_TTL_SECONDS if addresses else UNRESOLVED_TTL_SECONDS
        with self._lock:
            self._resolved[host] = (now + ttl, addresses)
        return addresses

    def senders(self, calling_ae: str, address: str) -> list[Destination]:
        """Return the destinations a peer is: same AE title, an address of their host.

        Parameters
        ----------
        calling_ae : str
            The peer's AE title.
        address : str
            The peer's address (its port plays no part).

        Returns
        -------
        list[Destination]
            Usually one; several when destinations share the AE title and host.
        """
        if self.called:
            return list(self.destinations)
        ip = ip_address(address)
        title = calling_ae.strip()
        return [
            d
            for d in self.destinations
            if d.ae_title.strip() == title and ip is not None and ip in self._addresses(d.host)
        ]

    def _refuse(self, address: str, calling_ae: str, why: str) -> tuple[Dataset, None]:
        if self.receipts.report_refused(address, calling_ae, why):
            log.warning(
                "commitment report refused peer=%s calling_ae=%s: %s",
                shown(address),
                shown(calling_ae),
                why,
            )
        reply = Dataset()
        reply.Status = REFUSED_SENDER
        reply.ErrorComment = REFUSED_SENDER_COMMENT[:64]  # LO
        return reply, None

    def __call__(self, event: evt.Event) -> tuple[int | Dataset, Dataset | None]:
        """Record the report and return (status, no Event Reply).

        Parameters
        ----------
        event : evt.Event
            The N-EVENT-REPORT event.

        Returns
        -------
        tuple[int or Dataset, Dataset or None]
            Success, or a failure status for a report we cannot use or do not accept
            from this peer; never raises.
        """
        try:
            calling_ae, address = _reporter(event.assoc)
        except Exception:  # a peer we cannot name is no destination
            calling_ae, address = "", ""
        senders = self.senders(calling_ae, address)
        if not senders:
            # Before anything else is read: a peer that is no destination learns nothing,
            # not even whether a Transaction UID is known.
            return self._refuse(address, calling_ae, "not a destination asked to commit")
        request = cast(N_EVENT_REPORT, event.request)
        if str(request.AffectedSOPClassUID) != STORAGE_COMMITMENT_PUSH:
            log.warning("event report of SOP class %s ignored", shown(request.AffectedSOPClassUID))
            return statuses.PROCESSING_FAILURE, None
        event_type = request.EventTypeID
        if event_type not in (ALL_COMMITTED, SOME_FAILED):
            log.warning("commitment report with event type %s ignored", event_type)
            return statuses.NO_SUCH_EVENT_TYPE, None
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
            return statuses.PROCESSING_FAILURE, None
        if not transaction_uid or not is_safe_uid(transaction_uid):
            log.warning("commitment report without a valid Transaction UID ignored")
            return statuses.MISSING_ATTRIBUTE, None
        names = {d.name for d in senders}
        try:
            outcome = commitment.apply_report(
                self.sessions, transaction_uid, committed, failed, names
            )
        except Exception:
            log.exception("commitment report transaction_uid=%s not recorded", transaction_uid)
            return statuses.PROCESSING_FAILURE, None
        if outcome is None:
            # Not ours, or given up on after the timeout and re-sent under a new UID.
            log.warning("commitment report for unknown transaction_uid=%s ignored", transaction_uid)
            return statuses.INVALID_ARGUMENT_VALUE, None
        if isinstance(outcome, commitment.WrongSender):
            return self._refuse(
                address,
                calling_ae,
                f"transaction_uid={transaction_uid} of job {outcome.job_id} was sent to "
                f"destination {outcome.destination}, not {', '.join(sorted(names))}",
            )
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
        return statuses.SUCCESS, None
