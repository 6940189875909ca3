"""Query/Retrieve SCU: find a patient's earlier studies on a PACS and have them moved here.

C-FIND (Study Root) at study level by Patient ID and a date range, then at series
level; C-MOVE of chosen series to the node's own AE title, so that the PACS sends
them to our listener, which stores them like any other image; or C-GET, which brings
them back on our own association, stored through the same durable path. Answers are checked
before they are believed: a PACS that ignores the Patient ID key (and so answers with
every patient), sends unsafe UIDs or floods us with matches does not get its answers
used. Wildcards in our own Patient ID are refused before asking, since C-FIND would
read them as patterns and match other patients.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from dicomnode.config import Destination
from dicomnode.dimse.contexts import ACCEPTED_SOP_CLASSES, ACCEPTED_TRANSFER_SYNTAXES
from dicomnode.errors import PermanentJobError, TransientJobError
from dicomnode.send.scu import associate
from dicomnode.store.uids import is_safe_uid

log = logging.getLogger(__name__)

MAX_MATCHES = 500  # answers read per query; a PACS that sends more is cut off
_WILDCARDS = set("*?\\")
# C-FIND / C-MOVE statuses (PS3.4 C.4.1.1.4, C.4.2.1.5)
_PENDING = {0xFF00, 0xFF01}
_MOVE_WARNING = 0xB000
# What a C-GET may bring back: every class the listener accepts (under the 128
# presentation contexts an association may have).
GET_SOP_CLASSES = ACCEPTED_SOP_CLASSES[:127]


class RetrieveRefused(PermanentJobError):
    """The PACS answered, but will not (or cannot) give what was asked: asking again won't help."""


class UnsafeQuery(RetrieveRefused):
    """Our own key cannot be sent safely (a Patient ID that C-FIND would read as a pattern)."""


@dataclass(frozen=True)
class FoundStudy:
    """One study a PACS holds for the patient."""

    study_uid: str
    study_date: date | None


@dataclass(frozen=True)
class FoundSeries:
    """One series of a study a PACS holds."""

    series_uid: str
    modality: str | None
    series_number: int | None
    instances: int | None
    header: Dataset  # the identifier as answered (for match rules on what it gives)


@dataclass(frozen=True)
class Moved:
    """What a C-MOVE's final response reported."""

    completed: int
    failed: int
    warning: int
    status: int


def dicom_date(value: object) -> date | None:
    """Return a DA value as a date, or None when absent or malformed."""
    try:
        return datetime.strptime(str(value or "").strip()[:8], "%Y%m%d").date()
    except ValueError:
        return None


def _text(value: object) -> str:
    return str(value or "").strip()


def _int(value: object) -> int | None:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return None


def _status(reply: Dataset, destination: Destination, what: str) -> int:
    if "Status" not in reply:
        # pynetdicom hands back an empty status when the association was aborted, the
        # connection dropped or the DIMSE timeout passed.
        raise TransientJobError(
            f"destination {destination.name}: no reply to {what} (connection lost or timed out)"
        )
    return int(reply.Status)


def _find(destination: Destination, calling_ae: str, query: Dataset, what: str) -> list[Dataset]:
    """Run one C-FIND and return the pending identifiers (at most MAX_MATCHES)."""
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = associate(ae, destination)
    found: list[Dataset] = []
    try:
        if not _accepts(assoc, StudyRootQueryRetrieveInformationModelFind):
            raise RetrieveRefused(f"destination {destination.name}: does not accept C-FIND")
        for reply, identifier in assoc.send_c_find(
            query, StudyRootQueryRetrieveInformationModelFind
        ):
            code = _status(reply, destination, what)
            if code in _PENDING:
                if identifier is not None:
                    found.append(identifier)
                if len(found) >= MAX_MATCHES:
                    log.warning(
                        "destination %s: more than %d answers to %s; the rest ignored",
                        destination.name,
                        MAX_MATCHES,
                        what,
                    )
                    assoc.abort()
                    return found
                continue
            if code != 0:
                raise RetrieveRefused(
                    f"destination {destination.name}: {what} failed with status 0x{code:04X}"
                )
    finally:
        if assoc.is_established:
            assoc.release()
    return found


def find_studies(
    destination: Destination,
    calling_ae: str,
    *,
    patient_id: str,
    exclude_study: str,
    before: date,
    within_days: float,
    modality: str | None,
) -> list[FoundStudy]:
    """Return the patient's other studies on ``destination``, newest first.

    Parameters
    ----------
    destination : Destination
        The PACS.
    calling_ae : str
        Our AE title.
    patient_id : str
        The exact Patient ID; one with wildcard characters is refused.
    exclude_study : str
        The current study's UID, never a prior of itself.
    before : date
        The current study's date; priors are on or before it.
    within_days : float
        How far back.
    modality : str, optional
        Asked as Modalities in Study (a PACS may ignore it; answers are not filtered on it).

    Returns
    -------
    list[FoundStudy]
        Studies of exactly that Patient ID, with a safe UID, dated within the range.

    Raises
    ------
    RetrieveRefused
        If the Patient ID cannot be queried safely, or the PACS refuses the query.
    TransientJobError
        If the PACS cannot be reached or does not answer.
    """
    if not patient_id or _WILDCARDS & set(patient_id):
        raise UnsafeQuery("the Patient ID is empty or has wildcard characters")
    earliest = before - timedelta(days=within_days)
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.PatientID = patient_id
    query.StudyInstanceUID = ""
    query.StudyDate = f"{earliest:%Y%m%d}-{before:%Y%m%d}"
    query.ModalitiesInStudy = modality or ""
    found = _find(destination, calling_ae, query, "C-FIND (study)")
    studies: dict[str, FoundStudy] = {}
    for ds in found:
        uid = _text(ds.get("StudyInstanceUID"))
        if _text(ds.get("PatientID")) != patient_id or not is_safe_uid(uid):
            continue  # a PACS that ignored the key, or an answer we cannot use
        if uid == exclude_study:
            continue
        when = dicom_date(ds.get("StudyDate"))
        if when is not None and not earliest <= when <= before:
            continue
        studies[uid] = FoundStudy(uid, when)
    return sorted(studies.values(), key=lambda s: s.study_date or date.min, reverse=True)


def find_series(destination: Destination, calling_ae: str, study_uid: str) -> list[FoundSeries]:
    """Return the series of one study on ``destination``.

    Parameters
    ----------
    destination : Destination
        The PACS.
    calling_ae : str
        Our AE title.
    study_uid : str
        The study.

    Returns
    -------
    list[FoundSeries]
        Its series with a safe UID, as answered.
    """
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = study_uid
    query.SeriesInstanceUID = ""
    query.Modality = ""
    query.SeriesNumber = ""
    query.SeriesDescription = ""
    query.BodyPartExamined = ""
    query.NumberOfSeriesRelatedInstances = ""
    out: list[FoundSeries] = []
    for ds in _find(destination, calling_ae, query, "C-FIND (series)"):
        uid = _text(ds.get("SeriesInstanceUID"))
        if not is_safe_uid(uid) or _text(ds.get("StudyInstanceUID")) not in ("", study_uid):
            continue
        out.append(
            FoundSeries(
                series_uid=uid,
                modality=_text(ds.get("Modality")) or None,
                series_number=_int(ds.get("SeriesNumber")),
                instances=_int(ds.get("NumberOfSeriesRelatedInstances")),
                header=ds,
            )
        )
    return out


def move_series(
    destination: Destination,
    calling_ae: str,
    *,
    move_to: str,
    study_uid: str,
    series_uid: str,
    progress: Callable[[], None] = lambda: None,
) -> Moved:
    """Ask ``destination`` to send one series to the AE title ``move_to`` (C-MOVE).

    The final response comes once the PACS has sent every image: each was stored by
    our listener (fsynced and committed) before it answered the PACS, so what is
    reported as completed is in the node's database when this returns.

    Parameters
    ----------
    destination : Destination
        The PACS; its ``timeout_seconds`` bounds each wait for a response.
    calling_ae : str
        Our AE title.
    move_to : str
        The move destination: the node's listener AE title, which the PACS must know.
    study_uid, series_uid : str
        What to move.
    progress : callable, optional
        Called at each pending response.

    Returns
    -------
    Moved
        The counts of the final response.

    Raises
    ------
    RetrieveRefused
        If the PACS refuses (e.g. 0xA801: it does not know ``move_to``).
    TransientJobError
        If it cannot be reached, drops the association or does not answer in time.
    """
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = associate(ae, destination)
    return _retrieve(
        destination,
        assoc,
        "C-MOVE",
        StudyRootQueryRetrieveInformationModelMove,
        lambda query: assoc.send_c_move(query, move_to, StudyRootQueryRetrieveInformationModelMove),
        study_uid,
        series_uid,
        progress,
    )


def get_series(
    destination: Destination,
    calling_ae: str,
    *,
    study_uid: str,
    series_uid: str,
    store: Callable[[bytes], int],
    progress: Callable[[], None] = lambda: None,
) -> Moved:
    """Fetch one series from ``destination`` on our own association (C-GET).

    The PACS sends each image back as a C-STORE on the same association; ``store``
    keeps it (durably, before it answers) and returns the status to send back. Nothing
    needs to be configured on the PACS, unlike a C-MOVE's destination.

    Parameters
    ----------
    destination : Destination
        The PACS.
    calling_ae : str
        Our AE title.
    study_uid, series_uid : str
        What to fetch.
    store : callable
        Takes an instance (preamble, file meta and dataset, as received) and returns
        its C-STORE status.
    progress : callable, optional
        Called at each pending response.

    Returns
    -------
    Moved
        The counts of the final response.

    Raises
    ------
    RetrieveRefused
        If the PACS refuses.
    TransientJobError
        If it cannot be reached, drops the association or does not answer in time.
    """
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    # One context per storage class we may be sent, offered in the SCP role (PS3.4 C.4.3):
    # at most 127 besides the C-GET's own.
    for sop_class in GET_SOP_CLASSES:
        ae.add_requested_context(sop_class, ACCEPTED_TRANSFER_SYNTAXES)
    roles = [build_role(sop_class, scp_role=True) for sop_class in GET_SOP_CLASSES]

    def handle(event: evt.Event) -> int:
        # With pynetdicom's chunked receive on (a listener in this process turns it on
        # for all), the instance is in a file, preamble and file meta included.
        try:
            path = event.dataset_path  # None (or AttributeError) when it is in memory
        except AttributeError:
            path = None
        if path is not None:
            return store(Path(path).read_bytes())
        return store(event.encoded_dataset(include_meta=True))

    assoc = associate(ae, destination, handlers=[(evt.EVT_C_STORE, handle)], ext_neg=roles)
    return _retrieve(
        destination,
        assoc,
        "C-GET",
        StudyRootQueryRetrieveInformationModelGet,
        lambda query: assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet),
        study_uid,
        series_uid,
        progress,
    )


def _accepts(assoc: Association, abstract_syntax: str) -> bool:
    """Return whether the peer accepted a presentation context for ``abstract_syntax``."""
    return any(c.abstract_syntax == abstract_syntax for c in assoc.accepted_contexts)


def _retrieve(
    destination: Destination,
    assoc: Association,
    what: str,
    model: str,
    send: Callable[[Dataset], Iterator[tuple[Dataset, Dataset | None]]],
    study_uid: str,
    series_uid: str,
    progress: Callable[[], None],
) -> Moved:
    """Send a C-MOVE or C-GET for one series and read its responses to the final one.

    ``progress`` is called at each pending response (the job's checkpoint: it keeps the
    lease while a large series comes in, and stops when the worker must).
    """
    final: Dataset | None = None
    try:
        if not _accepts(assoc, model):
            raise RetrieveRefused(f"destination {destination.name}: does not accept {what}")
        query = Dataset()
        query.QueryRetrieveLevel = "SERIES"
        query.StudyInstanceUID = study_uid
        query.SeriesInstanceUID = series_uid
        for reply, _ in send(query):
            code = _status(reply, destination, what)
            if code in _PENDING:
                progress()
                continue
            final = reply
    finally:
        if assoc.is_established:
            assoc.release()
    if final is None:
        raise TransientJobError(f"destination {destination.name}: {what} ended without a status")
    code = int(final.Status)
    moved = Moved(
        completed=_count(final, "NumberOfCompletedSuboperations"),
        failed=_count(final, "NumberOfFailedSuboperations"),
        warning=_count(final, "NumberOfWarningSuboperations"),
        status=code,
    )
    if code not in (0, _MOVE_WARNING):
        hint = {0xA801: "move destination unknown: the PACS must know our AE title"}.get(code)
        comment = _comment(final)
        why = "; ".join(x for x in (hint, comment) if x)
        raise RetrieveRefused(
            f"destination {destination.name}: {what} failed with status 0x{code:04X}"
            + (f" ({why})" if why else "")
        )
    return moved


def _comment(reply: Dataset) -> str | None:
    """Return the response's Error Comment, printable and short, or None."""
    text = "".join(c for c in str(reply.get("ErrorComment", "") or "") if c.isprintable())
    return text.strip()[:64] or None


def _count(reply: Dataset, keyword: str) -> int:
    value: Any = reply.get(keyword)
    return _int(value) or 0
