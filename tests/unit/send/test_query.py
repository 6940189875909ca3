"""C-FIND answers are checked before they are believed; our own Patient ID is never a pattern."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import date

import numpy as np
import pydicom
import pynetdicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from dicomnode.config import Destination
from dicomnode.errors import TransientJobError
from dicomnode.send import query
from dicomnode.send.query import (
    RetrieveRefused,
    find_series,
    find_studies,
    get_series,
    move_series,
)
from tests.conftest import free_port
from tests.factories import ct_series

pytestmark = pytest.mark.system

PATIENT = "PID-1"


def answer(patient: str, study_uid: str, when: str = "20230101") -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.PatientID, ds.StudyInstanceUID, ds.StudyDate = patient, study_uid, when
    return ds


@pytest.fixture
def pacs() -> Iterator[Callable[..., Destination]]:
    """Start a PACS whose C-FIND / C-MOVE answers the test writes; yield its Destination."""
    servers = []

    def start(
        find: Callable[[Dataset], Iterator] | None = None,
        move=None,
        get=None,
        retrieve: bool = True,
    ) -> Destination:
        ae = AE(ae_title="PACS")
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        if retrieve:  # False: a PACS that answers C-FIND only
            ae.add_supported_context(StudyRootQueryRetrieveInformationModelMove)
            ae.add_supported_context(StudyRootQueryRetrieveInformationModelGet)
        # The SCU role of storage on a C-GET's association: the PACS sends to the caller.
        ae.add_supported_context(CTImageStorage, scu_role=True, scp_role=True)
        handlers = []
        if get is not None:
            handlers.append((evt.EVT_C_GET, get))
        if find is not None:
            handlers.append((evt.EVT_C_FIND, lambda event: find(event.identifier)))
        if move is not None:
            handlers.append((evt.EVT_C_MOVE, move))
        port = free_port()
        servers.append(ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers))
        return Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=port,
                           timeout_seconds=3)  # fmt: skip

    yield start
    for server in servers:
        server.shutdown()


def test_answers_of_other_patients_unsafe_uids_and_the_current_study_are_ignored(pacs) -> None:
    good, current = generate_uid(), generate_uid()
    asked: list[Dataset] = []

    def find(identifier: Dataset) -> Iterator:
        asked.append(identifier)
        for ds in (
            answer("SOMEONE-ELSE", generate_uid()),  # a PACS that ignored the key
            answer(PATIENT, "1.2.3/../../etc"),
            answer(PATIENT, current),
            answer(PATIENT, generate_uid(), when="20000101"),  # too old
            answer(PATIENT, good),
        ):
            yield 0xFF00, ds

    found = find_studies(pacs(find), "NODE", patient_id=PATIENT, exclude_study=current,
                         before=date(2024, 1, 1), within_days=1500, modality="CT")  # fmt: skip
    assert [(s.study_uid, s.study_date) for s in found] == [(good, date(2023, 1, 1))]
    assert asked[0].PatientID == PATIENT
    assert asked[0].StudyDate == "20191123-20240101"  # 1500 days before
    assert asked[0].ModalitiesInStudy == "CT"


@pytest.mark.parametrize("patient", ["", "PID*", "P?D", "A\\B"])
def test_a_patient_id_that_would_be_a_pattern_is_never_queried(pacs, patient: str) -> None:
    asked: list[Dataset] = []

    def find(identifier: Dataset) -> Iterator:
        asked.append(identifier)
        yield 0x0000, None

    with pytest.raises(RetrieveRefused, match="empty or has wildcard characters"):
        find_studies(pacs(find), "NODE", patient_id=patient, exclude_study="1.2",
                     before=date(2024, 1, 1), within_days=10, modality=None)  # fmt: skip
    assert asked == []


def test_a_flood_of_answers_is_cut_off(pacs, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(query, "MAX_MATCHES", 20)

    def find(identifier: Dataset) -> Iterator:
        for _ in range(10_000):
            yield 0xFF00, answer(PATIENT, generate_uid())

    found = find_studies(pacs(find), "NODE", patient_id=PATIENT, exclude_study="1.2",
                         before=date(2024, 1, 1), within_days=1500, modality=None)  # fmt: skip
    assert len(found) == 20


def test_a_failed_query_and_a_silent_one_say_which(pacs) -> None:
    def refuse(identifier: Dataset) -> Iterator:
        yield 0xA700, None

    with pytest.raises(RetrieveRefused, match=r"C-FIND \(series\) failed with status 0xA700"):
        find_series(pacs(refuse), "NODE", "1.2.3")

    def hang(identifier: Dataset) -> Iterator:
        import time

        time.sleep(5)  # beyond the destination's 3 s timeout
        yield 0x0000, None

    with pytest.raises(TransientJobError, match=r"no reply to C-FIND \(series\)"):
        find_series(pacs(hang), "NODE", "1.2.3")


def test_a_refused_move_names_the_status_and_the_pacs_comment(pacs) -> None:
    def move(event: evt.Event) -> Iterator:
        yield 0xA801, None  # the first yield: pynetdicom asks for the destination's address

    with pytest.raises(RetrieveRefused) as refused:
        move_series(pacs(move=move), "NODE", move_to="NODE", study_uid="1.2", series_uid="1.2.3")
    assert str(refused.value).startswith("destination pacs: C-MOVE failed with status 0xA801")
    assert "the PACS must know our AE title" in str(refused.value)


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked-receive", "in-memory"])
def test_c_get_hands_each_instance_to_the_store_and_answers_its_status(
    pacs, monkeypatch: pytest.MonkeyPatch, chunked: bool
) -> None:
    # A listener in the process turns pynetdicom's chunked receive on for every
    # association; the instances must reach the store either way.
    monkeypatch.setattr(pynetdicom._config, "STORE_RECV_CHUNKED_DATASET", chunked)
    images = ct_series(np.zeros((3, 4, 4), np.float32))

    def get(event: evt.Event) -> Iterator:
        yield len(images)
        for ds in images:
            yield 0xFF00, ds

    stored: list[Dataset] = []

    def store(data: bytes) -> int:
        stored.append(pydicom.dcmread(pydicom.filebase.DicomBytesIO(data)))
        return 0x0000 if len(stored) < 3 else 0xA700  # the last one: out of resources

    moved = get_series(pacs(get=get), "NODE", study_uid=images[0].StudyInstanceUID,
                       series_uid=images[0].SeriesInstanceUID, store=store)  # fmt: skip
    assert [ds.SOPInstanceUID for ds in stored] == [ds.SOPInstanceUID for ds in images]
    assert all(ds.pixel_array.shape == (4, 4) for ds in stored)  # whole, with their meta
    assert (moved.completed, moved.failed) == (2, 1)


def test_a_pacs_that_takes_storage_but_not_retrieval_is_refused_clearly(pacs) -> None:
    # It accepts the storage contexts a C-GET proposes, but not the C-GET (or C-MOVE)
    # itself: a one-line refusal, not pynetdicom's ValueError from send_c_get.
    destination = pacs(retrieve=False)
    with pytest.raises(RetrieveRefused, match="pacs: does not accept C-GET"):
        get_series(destination, "NODE", study_uid="1.2", series_uid="1.2.3", store=lambda _: 0)
