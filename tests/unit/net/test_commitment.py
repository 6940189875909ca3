"""Storage Commitment reports: the N-EVENT-REPORT handler and what it records.

The handler is called with events built here (what pynetdicom hands it), against a
real database; the round trip over the network is tested with Orthanc in
tests/integration/test_commitment_orthanc.py.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from types import SimpleNamespace

import pytest
from pydicom.dataset import Dataset
from sqlalchemy import select, update

from dicomnode.db import commitment as commitment_db
from dicomnode.db.engine import transaction
from dicomnode.db.models import (
    Delivery,
    DeliveryState,
    Job,
    JobEvent,
    JobState,
    Output,
    utcnow,
)
from dicomnode.net import status
from dicomnode.net.commitment import STORAGE_COMMITMENT_PUSH, ReportHandler, request_dataset
from tests.factories import add_series

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
OBJECTS = ["1.2.3.9.1", "1.2.3.9.2"]
TRANSACTION = "1.2.3.777"


@pytest.fixture
def delivery_id(sessions) -> int:
    """A done job whose two outputs were sent to 'pacs' with a commitment requested."""
    with transaction(sessions) as s:
        series = add_series(s)
        job = Job(
            series_id=series.id, route="r", model="m", model_version="1",
            idempotency_key="k", state=JobState.DONE, attempts=1, finished_at=utcnow(),
        )  # fmt: skip
        s.add(job)
        s.flush()
        for uid in OBJECTS:
            s.add(
                Output(job_id=job.id, kind="seg", sop_class_uid=SEG, sop_instance_uid=uid,
                       series_uid="1.2.3.9", path=f"results/{uid}.dcm", size_bytes=1)
            )  # fmt: skip
        delivery = Delivery(
            job_id=job.id, destination="pacs", state=DeliveryState.SENT, attempts=1,
            sent_at=utcnow(),
        )  # fmt: skip
        s.add(delivery)
        s.flush()
        commitment_db.request(s, delivery, TRANSACTION)
        return delivery.id


def report(
    event_type: int, committed: list[str], failed: dict[str, int], uid: str = TRANSACTION
) -> SimpleNamespace:
    """An N-EVENT-REPORT event as pynetdicom hands it to the handler."""
    info = request_dataset(uid, [(SEG, u) for u in committed])
    if failed:
        items = []
        for sop_uid, reason in failed.items():
            item = Dataset()
            item.ReferencedSOPClassUID = SEG
            item.ReferencedSOPInstanceUID = sop_uid
            item.FailureReason = reason
            items.append(item)
        info.FailedSOPSequence = items
    request = SimpleNamespace(AffectedSOPClassUID=STORAGE_COMMITMENT_PUSH, EventTypeID=event_type)
    return SimpleNamespace(request=request, event_information=info)


def delivery(sessions, delivery_id: int) -> Delivery:
    with sessions() as s:
        row = s.get(Delivery, delivery_id)
        s.expunge(row)
        return row


def job_state(sessions) -> JobState:
    with sessions() as s:
        return s.scalars(select(Job.state)).one()


def test_all_committed_confirms_the_delivery(sessions, delivery_id: int) -> None:
    assert ReportHandler(sessions)(report(1, OBJECTS, {})) == (status.SUCCESS, None)
    row = delivery(sessions, delivery_id)
    assert row.state == DeliveryState.SENT and row.confirmed_at is not None
    assert row.commitment_failed is None
    assert job_state(sessions) == JobState.DONE


def test_failures_reopen_the_delivery_and_requeue_the_job(sessions, delivery_id: int) -> None:
    assert ReportHandler(sessions)(report(2, OBJECTS[:1], {OBJECTS[1]: 0x0112}))[0] == 0
    row = delivery(sessions, delivery_id)
    assert row.state == DeliveryState.PENDING and row.confirmed_at is None
    assert row.commitment_failed == "1 object(s) not committed (reason 0x0112)"
    assert row.commitment_uid is None  # a late report for it is now unknown
    assert "commitment failed" in row.last_error
    assert job_state(sessions) == JobState.QUEUED
    with sessions() as s:
        notes = s.scalars(select(JobEvent.note)).all()
    assert any("commitment failed: 1 object(s)" in (n or "") for n in notes)


def test_an_object_the_report_forgets_is_not_committed(sessions, delivery_id: int) -> None:
    ReportHandler(sessions)(report(1, OBJECTS[:1], {}))
    row = delivery(sessions, delivery_id)
    assert row.confirmed_at is None and row.state == DeliveryState.PENDING
    assert row.commitment_failed == "1 object(s) not committed"


def test_unknown_transaction_is_ignored_with_a_warning(
    sessions, delivery_id: int, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        code, reply = ReportHandler(sessions)(report(1, OBJECTS, {}, uid="1.2.3.999"))
    assert (code, reply) == (status.INVALID_ARGUMENT_VALUE, None)
    assert "unknown transaction_uid=1.2.3.999" in caplog.text
    assert delivery(sessions, delivery_id).confirmed_at is None  # untouched


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (lambda: report(3, OBJECTS, {}), status.NO_SUCH_EVENT_TYPE),
        (lambda: report(1, OBJECTS, {}, uid=""), status.MISSING_ATTRIBUTE),
        (
            lambda: SimpleNamespace(
                request=SimpleNamespace(AffectedSOPClassUID=STORAGE_COMMITMENT_PUSH, EventTypeID=1),
                event_information=b"not a dataset",  # what decoding could not make sense of
            ),
            status.PROCESSING_FAILURE,
        ),
    ],
)
def test_unusable_reports_get_a_failure_status_not_a_crash(
    sessions, delivery_id: int, event, expected
) -> None:
    code, _ = ReportHandler(sessions)(event())
    assert code == expected
    assert delivery(sessions, delivery_id).confirmed_at is None


def test_overdue_commitments_are_reopened(sessions, delivery_id: int) -> None:
    assert commitment_db.expire(sessions, {"pacs": 60}) == 0  # not overdue yet
    assert commitment_db.expire(sessions, {"other": 1}) == 0
    with transaction(sessions) as s:
        s.execute(
            update(Delivery).values(commitment_requested_at=utcnow() - timedelta(seconds=120))
        )
    assert commitment_db.expire(sessions, {"pacs": 60}) == 1
    row = delivery(sessions, delivery_id)
    assert row.state == DeliveryState.PENDING
    assert row.commitment_failed == "no commitment report within 60 s"
    assert job_state(sessions) == JobState.QUEUED
    assert commitment_db.expire(sessions, {"pacs": 60}) == 0  # once
