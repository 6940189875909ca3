"""The listener's entries in the audit trail: who sent what, and who was turned away.

Instances are tallied per association in memory and written as one
``instances-received`` entry per series when the association ends, rather than one
row per instance inside the C-STORE's own transaction: the receive path stays as
fast as it is, and the trail stays readable (DICOM's own audit message, "DICOM
Instances Transferred", is one per study per association). What a crash in the
middle of an association costs is that association's summary entry, never an
instance: each instance row still names its calling AE and time of arrival.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from dicomnode.db import audit
from dicomnode.db.engine import transaction
from dicomnode.store.ingest import StoreOutcome

log = logging.getLogger(__name__)


@dataclass
class _SeriesTally:
    study_uid: str
    count: int = 0
    size_bytes: int = 0
    duplicates: int = 0
    replaced: int = 0


@dataclass
class _AssociationTally:
    calling_ae: str
    peer: str
    series: dict[str, _SeriesTally] = field(default_factory=dict)
    refused: int = 0
    first_refusal: str | None = None


# A peer refused again within this many seconds adds to one entry instead of its own:
# a modality retrying in a loop, or a port scanner, must not grow the trail without end.
REJECTION_WINDOW_SECONDS = 60.0


@dataclass
class _Rejections:
    first: float
    more: int = 0


class Receipts:
    """Tally what each association stored or refused, and write it to the trail.

    Tallies are keyed by the association object, weakly: one that ends without a
    close event cannot leak, and a new association never inherits an old one's
    counts. An instance whose store finishes after its association closed (the
    sender gave up mid-store) gets an entry of its own.

    Parameters
    ----------
    sessions : sessionmaker[Session]
        Where the audit entries go.
    """

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions
        self._lock = threading.Lock()
        self._open: weakref.WeakKeyDictionary[Any, _AssociationTally] = weakref.WeakKeyDictionary()
        self._closed: weakref.WeakSet[Any] = weakref.WeakSet()
        self._rejections: dict[tuple[str, str, str, str], _Rejections] = {}

    def _tally(self, assoc: Any, calling_ae: str, peer: str) -> tuple[_AssociationTally, bool]:
        """Return the association's tally (with the lock held), and whether it closed.

        A closed association's late arrival gets a tally of its own, written at once.
        """
        if assoc in self._closed:
            return _AssociationTally(calling_ae, peer), True
        tally = self._open.get(assoc)
        if tally is None:
            tally = self._open[assoc] = _AssociationTally(calling_ae, peer)
        return tally, False

    def stored(self, assoc: Any, calling_ae: str, peer: str, outcome: StoreOutcome) -> None:
        """Count an instance we acknowledged.

        Parameters
        ----------
        assoc : pynetdicom.association.Association
            Its association.
        calling_ae, peer : str
            The sender's AE title and address.
        outcome : StoreOutcome
            What the ingestor did with it.
        """
        with self._lock:
            tally, late = self._tally(assoc, calling_ae, peer)
            series = tally.series.get(outcome.series_uid)
            if series is None:
                series = tally.series[outcome.series_uid] = _SeriesTally(outcome.study_uid)
            series.count += 1
            series.size_bytes += outcome.size_bytes
            series.duplicates += outcome.duplicate
            series.replaced += outcome.replaced
        if late:
            self._write(tally)

    def refused(self, assoc: Any, calling_ae: str, peer: str, reason: str) -> None:
        """Count an instance we refused (the reason has no patient data).

        Parameters
        ----------
        assoc : pynetdicom.association.Association
            Its association.
        calling_ae, peer : str
            The sender's AE title and address.
        reason : str
            Why, as the status comment said.
        """
        with self._lock:
            tally, late = self._tally(assoc, calling_ae, peer)
            tally.refused += 1
            if tally.first_refusal is None:
                tally.first_refusal = reason
        if late:
            self._write(tally)

    def closed(self, assoc: Any) -> None:
        """Write the entries of an association that ended (released, aborted or dropped).

        Parameters
        ----------
        assoc : pynetdicom.association.Association
            The association.
        """
        with self._lock:
            tally = self._open.pop(assoc, None)
            self._closed.add(assoc)
        if tally is not None:  # None: nothing was sent (an echo, a rejected association)
            self._write(tally)

    def _write(self, tally: _AssociationTally) -> None:
        try:
            with transaction(self.sessions) as session:
                for series_uid, series in tally.series.items():
                    notes = [f"{n} {what}" for n, what in (
                        (series.duplicates, "identical resend(s)"),
                        (series.replaced, "replaced"),
                    ) if n]  # fmt: skip
                    audit.record(
                        session,
                        "instances-received",
                        actor=tally.calling_ae,
                        peer=tally.peer,
                        study_uid=series.study_uid,
                        series_uid=series_uid,
                        count=series.count,
                        size_bytes=series.size_bytes,
                        detail=", ".join(notes) or None,
                    )
                if tally.refused:
                    audit.record(
                        session,
                        "instances-refused",
                        outcome="failure",
                        actor=tally.calling_ae,
                        peer=tally.peer,
                        count=tally.refused,
                        detail=f"first: {tally.first_refusal}",
                    )
        except Exception as exc:  # the instances are safe; only their summary is lost
            log.error(
                "audit: cannot record association from calling_ae=%s peer=%s: %s",
                tally.calling_ae,
                tally.peer,
                type(exc).__name__,
            )

    def rejected(self, calling_ae: str, called_ae: str, peer: str, reason: str) -> None:
        """Record an association we rejected.

        Parameters
        ----------
        calling_ae, called_ae, peer : str
            What the peer asked for, and from where.
        reason : str
            called_ae, calling_ae, too_many or address.
        """
        key = (calling_ae, called_ae, peer, reason)
        now = time.monotonic()
        with self._lock:
            seen = self._rejections.get(key)
            if seen is not None and now - seen.first < REJECTION_WINDOW_SECONDS:
                seen.more += 1  # written once its window has passed
                return
            self._rejections[key] = _Rejections(now)
            due = self._take_expired(now, keep=key)
        self._write_rejections([(key, 0), *due])

    def flush(self) -> None:
        """Write the rejections still counted in their window (the listener stops)."""
        with self._lock:
            due = self._take_expired(float("inf"))
        self._write_rejections(due)

    def _take_expired(
        self, now: float, keep: tuple[str, str, str, str] | None = None
    ) -> list[tuple[tuple[str, str, str, str], int]]:
        due = []
        for key, seen in list(self._rejections.items()):
            if key == keep or now - seen.first < REJECTION_WINDOW_SECONDS:
                continue
            if seen.more:
                due.append((key, seen.more))
            del self._rejections[key]  # bounded: a scan from many addresses is forgotten
        return due

    def _write_rejections(self, items: list[tuple[tuple[str, str, str, str], int]]) -> None:
        if not items:
            return
        try:
            with transaction(self.sessions) as session:
                # 0: this one rejection; N > 0: N more since the first of their minute.
                for (calling_ae, called_ae, peer, reason), more in items:
                    audit.record(
                        session,
                        "association-rejected",
                        outcome="failure",
                        actor=calling_ae,
                        peer=peer,
                        count=more or 1,
                        detail=f"reason {reason}; called AE {called_ae}"
                        + (f"; {more} more within a minute of the entry before" if more else ""),
                    )
        except Exception as exc:
            log.error("audit: cannot record a rejected association: %s", type(exc).__name__)
