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

from dicomnode.config import Destination
from dicomnode.db import Delivery, DeliveryState, Job, JobState, Output, audit, transaction, utcnow
from dicomnode.db import commitment as commitment_db
from dicomnode.db.models import JobEvent
from dicomnode.dimse import peers, statuses
from dicomnode.send import STORAGE_COMMITMENT_PUSH, ReportHandler, commitment
from dicomnode.send.commitment import request_dataset
from tests.factories import add_series

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
OBJECTS = ["1.2.3.9.1", "1.2.3.9.2"]
TRANSACTION = "1.2.3.777"
PACS = Destination(name="pacs", ae_title="PACS", host="10.0.0.2", port=104)


def handler(sessions, *destinations: Destination) -> ReportHandler:
    """The listener's handler, knowing the destination 'pacs' (or those given)."""
    return ReportHandler(sessions, destinations or (PACS,))


def peer(ae_title: str = "PACS", address: str = "10.0.0.2") -> SimpleNamespace:
    """An association accepted from ``ae_title`` at ``address``, as the listener sees it."""
    requestor = SimpleNamespace(ae_title=ae_title, address=address, port=40123)
    return SimpleNamespace(is_requestor=False, requestor=requestor)


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
    event_type: int,
    committed: list[str],
    failed: dict[str, int],
    uid: str = TRANSACTION,
    assoc: SimpleNamespace | None = None,
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
    return SimpleNamespace(request=request, event_information=info, assoc=assoc or peer())


def delivery(sessions, delivery_id: int) -> Delivery:
    with sessions() as s:
        row = s.get(Delivery, delivery_id)
        s.expunge(row)
        return row


def job_state(sessions) -> JobState:
    with sessions() as s:
        return s.scalars(select(Job.state)).one()


def test_all_committed_confirms_the_delivery(sessions, delivery_id: int) -> None:
    assert handler(sessions)(report(1, OBJECTS, {})) == (statuses.SUCCESS, None)
    row = delivery(sessions, delivery_id)
    assert row.state == DeliveryState.SENT and row.confirmed_at is not None
    assert row.commitment_failed is None
    assert job_state(sessions) == JobState.DONE


def test_failures_reopen_the_delivery_and_requeue_the_job(sessions, delivery_id: int) -> None:
    assert handler(sessions)(report(2, OBJECTS[:1], {OBJECTS[1]: 0x0112}))[0] == 0
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
    handler(sessions)(report(1, OBJECTS[:1], {}))
    row = delivery(sessions, delivery_id)
    assert row.confirmed_at is None and row.state == DeliveryState.PENDING
    assert row.commitment_failed == "1 object(s) not committed"


def test_unknown_transaction_is_ignored_with_a_warning(
    sessions, delivery_id: int, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        code, reply = handler(sessions)(report(1, OBJECTS, {}, uid="1.2.3.999"))
    assert (code, reply) == (statuses.INVALID_ARGUMENT_VALUE, None)
    assert "unknown transaction_uid=1.2.3.999" in caplog.text
    assert delivery(sessions, delivery_id).confirmed_at is None  # untouched


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (lambda: report(3, OBJECTS, {}), statuses.NO_SUCH_EVENT_TYPE),
        (lambda: report(1, OBJECTS, {}, uid=""), statuses.MISSING_ATTRIBUTE),
        (
            lambda: SimpleNamespace(
                request=SimpleNamespace(AffectedSOPClassUID=STORAGE_COMMITMENT_PUSH, EventTypeID=1),
                event_information=b"not a dataset",  # what decoding could not make sense of
                assoc=peer(),
            ),
            statuses.PROCESSING_FAILURE,
        ),
    ],
)
def test_unusable_reports_get_a_failure_status_not_a_crash(
    sessions, delivery_id: int, event, expected
) -> None:
    code, _ = handler(sessions)(event())
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


# --- who may report ---------------------------------------------------------------


def refused_entries(sessions) -> list[dict]:
    with sessions() as s:
        return list(audit.entries(s, events=("commitment-report-refused",)))


def assert_refused(answer: tuple) -> None:
    reply, event_reply = answer
    assert event_reply is None
    assert int(reply.Status) == commitment.REFUSED_SENDER == statuses.PROCESSING_FAILURE
    assert "not from the destination" in reply.ErrorComment


@pytest.mark.parametrize(
    "assoc",
    [
        peer(ae_title="INTRUDER"),  # the right address, another AE title
        peer(address="10.0.0.66"),  # the right AE title, another address
        peer(address="not an address"),
    ],
    ids=["other-ae-title", "other-address", "no-address"],
)
def test_a_report_not_from_the_destination_is_refused_and_audited(
    sessions, delivery_id: int, assoc: SimpleNamespace
) -> None:
    assert_refused(handler(sessions)(report(1, OBJECTS, {}, assoc=assoc)))
    row = delivery(sessions, delivery_id)
    assert row.confirmed_at is None and row.state == DeliveryState.SENT
    assert row.commitment_uid == TRANSACTION  # still awaited: a real report still counts
    [entry] = refused_entries(sessions)
    assert (entry["peer"], entry["count"], entry["outcome"]) == (
        assoc.requestor.address, 1, "failure"
    )  # fmt: skip
    assert entry["actor"] == assoc.requestor.ae_title
    assert "not a destination asked to commit" in entry["detail"]
    # The real destination's report is still welcome.
    assert handler(sessions)(report(1, OBJECTS, {})) == (statuses.SUCCESS, None)
    assert delivery(sessions, delivery_id).confirmed_at is not None


def test_only_the_destination_of_the_transaction_may_answer_it(sessions, delivery_id: int) -> None:
    archive = Destination(name="archive", ae_title="ARCHIVE", host="10.0.0.9", port=104)
    code = handler(sessions, PACS, archive)(
        report(1, OBJECTS, {}, assoc=peer("ARCHIVE", "10.0.0.9"))
    )
    assert_refused(code)
    assert delivery(sessions, delivery_id).confirmed_at is None
    [entry] = refused_entries(sessions)
    assert f"transaction_uid={TRANSACTION}" in entry["detail"]
    assert "destination pacs, not archive" in entry["detail"]


def test_any_address_of_the_host_and_any_port_will_do(sessions, delivery_id: int) -> None:
    # A PACS cluster behind one name, answering from whichever node and port it likes.
    named = Destination(name="pacs", ae_title="PACS", host="pacs.example", port=104)
    addresses = {
        "pacs.example": frozenset(map(peers.ip_address, ["10.0.0.2", "10.0.0.3", "fd00::2"]))
    }
    asked: list[str] = []

    def resolver(host: str) -> frozenset:
        asked.append(host)
        return addresses.get(host, frozenset())

    reports = ReportHandler(sessions, [named], resolver=resolver)
    assert_refused(reports(report(1, OBJECTS, {}, assoc=peer(address="10.0.0.4"))))
    # As an IPv4 peer of a listener bound to '::' arrives: IPv4-mapped.
    assert reports(report(1, OBJECTS, {}, assoc=peer(address="::ffff:10.0.0.3"))) == (0, None)
    assert delivery(sessions, delivery_id).confirmed_at is not None
    assert asked == ["pacs.example"]  # resolved once, then reused


def test_a_host_that_does_not_resolve_reports_nothing(sessions, delivery_id: int) -> None:
    gone = Destination(name="pacs", ae_title="PACS", host="pacs.invalid", port=104)
    asked: list[str] = []

    def resolver(host: str) -> frozenset:
        asked.append(host)
        return frozenset()

    reports = ReportHandler(sessions, [gone], resolver=resolver)
    for _ in range(20):  # a flood of reports under the destination's AE title
        assert_refused(reports(report(1, OBJECTS, {}, assoc=peer())))
    assert delivery(sessions, delivery_id).confirmed_at is None
    assert asked == ["pacs.invalid"]  # the failed lookup is not repeated for each


def test_a_handler_without_destinations_refuses_every_report(sessions, delivery_id: int) -> None:
    assert_refused(ReportHandler(sessions)(report(1, OBJECTS, {})))
    assert delivery(sessions, delivery_id).confirmed_at is None


def test_on_our_own_association_the_peer_is_the_destination_we_called(
    sessions, delivery_id: int
) -> None:
    # The N-ACTION association: we are the requestor and the PACS accepted it, so the
    # peer is the destination by construction; it is not looked up or checked again.
    ours = SimpleNamespace(
        is_requestor=True, acceptor=SimpleNamespace(ae_title="PACS", address="pacs.example")
    )
    called = Destination(name="pacs", ae_title="PACS", host="pacs.example", port=104)

    def no_lookup(host: str) -> frozenset:
        raise AssertionError(f"{host} looked up")

    reports = ReportHandler(sessions, [called], resolver=no_lookup, called=True)
    assert reports(report(1, OBJECTS, {}, assoc=ours)) == (statuses.SUCCESS, None)
    assert delivery(sessions, delivery_id).confirmed_at is not None


def test_refusals_from_one_address_are_one_entry_and_one_line_a_minute(
    sessions, delivery_id: int, caplog: pytest.LogCaptureFixture
) -> None:
    reports = handler(sessions)
    with caplog.at_level(logging.WARNING):
        for i in range(30):
            assert_refused(reports(report(1, OBJECTS, {}, assoc=peer(f"X{i}\n\x1b[31m"))))
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "\n" not in lines[0] and "\x1b" not in lines[0]
    assert "calling_ae='X0\\n\\x1b[31m'" in lines[0]  # escaped, repr-style
    assert [e["count"] for e in refused_entries(sessions)] == [1]
    reports.receipts.flush()  # what the listener does when it stops
    entries = refused_entries(sessions)
    assert [e["count"] for e in entries] == [1, 29]
    assert entries[1]["actor"] is None  # several AE titles: named in the detail
    assert "\n" not in entries[1]["detail"] and "X1\\n" in entries[1]["detail"]
    assert "and 21 more" in entries[1]["detail"]  # eight named, the rest counted
