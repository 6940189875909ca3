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


class Receipts:
    """Tally what each association stored or refused, and write it to the trail.

    Parameters
    ----------
    sessions : sessionmaker[Session]
        Where the audit entries go.
    """

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions
        self._lock = threading.Lock()
        self._open: dict[int, _AssociationTally] = {}

    def _tally(self, assoc: Any, calling_ae: str, peer: str) -> _AssociationTally:
        key = id(assoc)
        tally = self._open.get(key)
        if tally is None:
            tally = self._open[key] = _AssociationTally(calling_ae, peer)
        return tally

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
            tally = self._tally(assoc, calling_ae, peer)
            series = tally.series.get(outcome.series_uid)
            if series is None:
                series = tally.series[outcome.series_uid] = _SeriesTally(outcome.study_uid)
            series.count += 1
            series.size_bytes += outcome.size_bytes
            series.duplicates += outcome.duplicate
            series.replaced += outcome.replaced

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
            tally = self._tally(assoc, calling_ae, peer)
            tally.refused += 1
            if tally.first_refusal is None:
                tally.first_refusal = reason

    def closed(self, assoc: Any) -> None:
        """Write the entries of an association that ended (released, aborted or dropped).

        Parameters
        ----------
        assoc : pynetdicom.association.Association
            The association.
        """
        with self._lock:
            tally = self._open.pop(id(assoc), None)
        if tally is None:
            return  # nothing was sent: an echo, or a rejected association
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
        try:
            with transaction(self.sessions) as session:
                audit.record(
                    session,
                    "association-rejected",
                    outcome="failure",
                    actor=calling_ae,
                    peer=peer,
                    detail=f"reason {reason}; called AE {called_ae}",
                )
        except Exception as exc:
            log.error("audit: cannot record a rejected association: %s", type(exc).__name__)
