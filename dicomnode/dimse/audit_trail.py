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

from dicomnode.db import audit, transaction
from dicomnode.logs import shown
from dicomnode.store import StoreOutcome

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


# Refusals from one address within this many seconds of its last entry add to the
# count of its next entry instead of an entry (and a WARNING line) each: a modality
# retrying in a loop, or a scan trying every AE title, must not grow the trail and the
# log without end. Keyed by address alone: AE titles cost the peer nothing to vary.
REJECTION_WINDOW_SECONDS = 60.0
# Addresses counted at once; past this, new addresses share one count (a scan from a
# whole subnet costs bounded memory, and still one entry a minute).
MAX_ADDRESSES = 1024
OTHER_ADDRESSES = "(other addresses)"
# Distinct attempts (AE titles, reason) an entry names; the rest are only counted.
MAX_NAMED = 8


def _actor(text: str) -> str:
    # The actor column holds the escaped text without the quotes, as other entries
    # hold a plain AE title.
    return shown(text)[1:-1]


@dataclass
class _Window:
    """What an address was refused since its last entry, and when that entry was."""

    start: float
    count: int = 0
    actors: set[str] = field(default_factory=set)  # at most 2 kept: one, or several
    named: dict[str, int] = field(default_factory=dict)  # attempt -> count, MAX_NAMED
    unnamed: int = 0

    def add(self, actor: str | None, attempt: str) -> None:
        self.count += 1
        if len(self.actors) < 2:
            self.actors.add(actor or "")
        if attempt in self.named or len(self.named) < MAX_NAMED:
            self.named[attempt] = self.named.get(attempt, 0) + 1
        else:
            self.unnamed += 1

    def take(self, peer: str, now: float) -> _Entry:
        """Return the entry for what was counted, and start the next minute empty."""
        named = [a if n == 1 else f"{a} (x{n})" for a, n in self.named.items()]
        if self.unnamed:
            named.append(f"and {self.unnamed} more")
        actor = next(iter(self.actors)) if len(self.actors) == 1 else None
        entry = _Entry(peer, self.count, actor or None, "; ".join(named))
        self.start, self.count, self.actors, self.named, self.unnamed = now, 0, set(), {}, 0
        return entry


@dataclass(frozen=True)
class _Entry:
    peer: str
    count: int
    actor: str | None
    summary: str


class Refusals:
    """Refusals of one kind, as one audit entry per peer address per minute at most.

    The first refusal from an address is written at once (count 1); what follows
    within :data:`REJECTION_WINDOW_SECONDS` of that entry is counted and written as the
    next entry, with its count and the AE titles tried, when that window has passed
    (at the next refusal from anywhere, at :meth:`write_due`, or at :meth:`flush`).
    So an address never gets two entries less than a minute apart while the
    listener runs; stopping writes what is still counted.

    Parameters
    ----------
    sessions : sessionmaker[Session]
        Where the entries go.
    event : str
        The audit event: ``association-rejected`` or ``commitment-report-refused``.
    what : str
        How the WARNING line of a written count begins (``association rejected``).
    """

    def __init__(self, sessions: sessionmaker[Session], event: str, what: str) -> None:
        self.sessions = sessions
        self.event = event
        self.what = what
        self._lock = threading.Lock()
        self._windows: dict[str, _Window] = {}

    def add(self, peer: str, actor: str | None, attempt: str) -> bool:
        """Count one refusal; write an entry now if it is the first of its address's minute.

        Parameters
        ----------
        peer : str
            The peer's address (no port: a new connection has a new one).
        actor : str, optional
            The peer's AE title, as it sent it (escaped here).
        attempt : str
            What it tried, already escaped (:func:`shown`), without patient data.

        Returns
        -------
        bool
            True when this refusal was written at once: the caller may log it (one
            line per address per minute); the ones counted after it are logged here,
            in one line with their entry.
        """
        now = time.monotonic()
        actor = None if actor is None else _actor(actor)
        with self._lock:
            due = self._take_expired(now)
            if peer not in self._windows and len(self._windows) >= MAX_ADDRESSES:
                peer = OTHER_ADDRESSES
            window = self._windows.get(peer)
            first = window is None
            if window is None:
                window = self._windows[peer] = _Window(now)
            window.add(actor, attempt)
            if first:
                due.insert(0, window.take(peer, now))
        self._write(due, log_first=not first)
        return first

    def write_due(self) -> None:
        """Write the counts whose minute has passed, without waiting for a refusal."""
        with self._lock:
            due = self._take_expired(time.monotonic())
        self._write(due, log_first=True)

    def flush(self) -> None:
        """Write every count not written yet (the listener stops)."""
        with self._lock:
            due = [w.take(peer, 0.0) for peer, w in self._windows.items() if w.count]
            self._windows.clear()
        self._write(due, log_first=True)

    def _take_expired(self, now: float) -> list[_Entry]:
        due = []
        for peer, window in list(self._windows.items()):
            if now - window.start < REJECTION_WINDOW_SECONDS:
                continue
            if window.count:
                due.append(window.take(peer, now))  # and its next minute starts now
            else:
                del self._windows[peer]  # a quiet address is forgotten: memory stays bounded
        return due

    def _write(self, entries: list[_Entry], *, log_first: bool) -> None:
        if not entries:
            return
        try:
            with transaction(self.sessions) as session:
                for entry in entries:
                    audit.record(
                        session,
                        self.event,
                        outcome="failure",
                        actor=entry.actor,
                        peer=entry.peer,
                        count=entry.count,
                        detail=entry.summary,
                    )
        except Exception as exc:
            log.error("audit: cannot record a refused peer: %s", type(exc).__name__)
        for i, entry in enumerate(entries):
            if i or log_first:  # the first of a minute is the caller's line to log
                log.warning(
                    "%s peer=%s count=%d within a minute: %s",
                    self.what,
                    shown(entry.peer),
                    entry.count,
                    entry.summary,
                )


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
        self._rejections = Refusals(sessions, "association-rejected", "association rejected")
        self._reports = Refusals(sessions, "commitment-report-refused", "commitment report refused")

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

    def rejected(self, calling_ae: str, called_ae: str, peer: str, reason: str) -> bool:
        """Record an association we rejected: one entry per address per minute.

        Parameters
        ----------
        calling_ae, called_ae, peer : str
            What the peer asked for, and from where (its address, without the port).
        reason : str
            called_ae, calling_ae, too_many or address.

        Returns
        -------
        bool
            Whether the caller should log this one: True for the first rejection of
            the address's minute (written at once); those after it are logged, with
            their count, in the line of the entry that counts them.
        """
        attempt = f"calling_ae={shown(calling_ae)} called_ae={shown(called_ae)} reason={reason}"
        return self._rejections.add(peer, calling_ae, attempt)

    def report_refused(self, peer: str, calling_ae: str, why: str) -> bool:
        """Record a Storage Commitment report we refused: one entry per address per minute.

        Parameters
        ----------
        peer : str
            The reporting peer's address.
        calling_ae : str
            Its AE title, as it sent it.
        why : str
            Why, without patient data (a destination name, a Transaction UID).

        Returns
        -------
        bool
            Whether the caller should log this one (see :meth:`rejected`).
        """
        return self._reports.add(peer, calling_ae, f"calling_ae={shown(calling_ae)} {why}")

    def write_due(self) -> None:
        """Write the refusals counted in minutes that have passed (called periodically)."""
        self._rejections.write_due()
        self._reports.write_due()

    def flush(self) -> None:
        """Write the refusals still counted in their minute (the listener stops)."""
        self._rejections.flush()
        self._reports.flush()
