"""The one-step C-STORE response: pynetdicom's bytes exactly, or pynetdicom itself."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pynetdicom.dimse
import pytest
from pynetdicom import evt
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE

from dicomnode.dimse import compat
from dicomnode.dimse.responses import encode_store_response

CT = "1.2.840.10008.5.1.4.1.1.2"


def response(
    message_id: int = 7,
    sop_instance: str | None = "1.2.3.4.5",
    status: int = 0x0000,
    comment: str | None = None,
) -> C_STORE:
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = message_id
    primitive.AffectedSOPClassUID = CT
    primitive.AffectedSOPInstanceUID = sop_instance
    primitive.Status = status
    if comment is not None:
        primitive.ErrorComment = comment
    return primitive


def pynetdicom_pdvs(primitive: C_STORE, context_id: int = 1, max_pdu: int = 16382) -> list[Any]:
    message = C_STORE_RSP()
    message.primitive_to_message(primitive)
    return [
        [tuple(pdv) for pdv in pdata.presentation_data_value_list]
        for pdata in message.encode_msg(context_id, max_pdu)
    ]


@pytest.mark.parametrize(
    ("message_id", "sop_instance", "status"),
    [
        (7, "1.2.3.4.5", 0x0000),  # odd length
        (65535, "1.2.3.4.56", 0xA700),  # even length
        (1, "2.25." + "1" * 59, 0xB000),
        (300, "1.2", 0xC000),
    ],
)
def test_the_same_bytes_as_pynetdicom(message_id: int, sop_instance: str, status: int) -> None:
    expected = pynetdicom_pdvs(response(message_id, sop_instance, status))
    assert len(expected) == 1 and len(expected[0]) == 1
    _, data = expected[0][0]
    assert data[0] == 0x03  # command, last fragment
    assert encode_store_response(message_id, CT, sop_instance, status) == data[1:]


@pytest.mark.parametrize(
    ("message_id", "sop_instance", "status"),
    [
        (7, None, 0),
        (7, "", 0),
        (7, "1.2.\u00e93", 0),
        (7, "1.2\\3", 0),
        (7, "1." + "2" * 64, 0),
        (7, "1.2", 70000),
        (70000, "1.2", 0),
    ],
    ids=[
        "missing", "empty", "not-ascii", "two-values", "too-long", "status-out-of-range",
        "message-id-out-of-range",
    ],
)  # fmt: skip
def test_values_it_does_not_write_are_left_to_pynetdicom(
    message_id: int, sop_instance: str | None, status: int
) -> None:
    assert encode_store_response(message_id, CT, sop_instance, status) is None


class Provider:
    """What send_msg reads of pynetdicom's DIMSE provider, recording what it sends."""

    def __init__(self, handlers: list[Any] | None = None, max_pdu: int = 16382) -> None:
        self.maximum_pdu_size = max_pdu
        self.sent: list[Any] = []
        self.dul = self
        self.assoc = self
        self._handlers = handlers or []

    def send_pdu(self, pdata: Any) -> None:
        self.sent.append([tuple(pdv) for pdv in pdata.presentation_data_value_list])

    def _abort_nonblocking(self) -> None:  # pynetdicom's trigger swaps these around
        raise AssertionError("nothing aborts here")  # handlers

    _abort_blocking = _abort_nonblocking

    def get_handlers(self, event: Any) -> list[Any]:
        assert event is evt.EVT_DIMSE_SENT
        return self._handlers


class Sent:
    """The replaced send_msg, and the command sets its encoder wrote."""

    def __init__(self) -> None:
        self.encoded: list[bytes | None] = []

    def encode(self, *args: Any) -> bytes | None:
        self.encoded.append(encode_store_response(*args))
        return self.encoded[-1]

    def __call__(self, provider: Provider, primitive: C_STORE, context_id: int) -> None:
        pynetdicom.dimse.DIMSEServiceProvider.send_msg(provider, primitive, context_id)


@pytest.fixture
def send_msg() -> Iterator[Sent]:
    sent = Sent()
    assert compat.replace_store_response(sent.encode)
    assert pynetdicom.dimse.DIMSEServiceProvider.send_msg is compat._ours[compat.SEND_MESSAGE]
    yield sent
    assert compat.replace_store_response(encode_store_response)  # the listener's own


@pytest.mark.parametrize(
    "primitive", [response(), response(status=0xA700)], ids=["success", "failure"]
)
def test_a_status_alone_goes_out_in_one_step(send_msg: Sent, primitive: C_STORE) -> None:
    fast = Provider()
    send_msg(fast, primitive, 3)
    assert fast.sent == pynetdicom_pdvs(primitive, context_id=3)
    command = send_msg.encoded[-1]
    assert command is not None and fast.sent == [[(3, b"\x03" + command)]]  # ours went out


def test_a_response_with_a_comment_gets_pynetdicom_s_path(send_msg: Sent) -> None:
    primitive = response(status=0xA700, comment="storage is full")
    fast = Provider()
    send_msg(fast, primitive, 3)
    assert send_msg.encoded == []
    assert fast.sent == pynetdicom_pdvs(primitive, context_id=3)


def test_an_association_watching_sent_messages_gets_pynetdicom_s_path(send_msg: Sent) -> None:
    seen: list[Any] = []
    watched = Provider(handlers=[(lambda event: seen.append(event.message), None)])
    send_msg(watched, response(), 1)
    assert send_msg.encoded == []
    assert [type(message) for message in seen] == [C_STORE_RSP]  # pynetdicom's message
    assert watched.sent == pynetdicom_pdvs(response())


def test_a_peer_with_a_tiny_pdu_gets_pynetdicom_s_fragments(send_msg: Sent) -> None:
    small = Provider(max_pdu=40)
    send_msg(small, response(), 1)
    assert small.sent == pynetdicom_pdvs(response(), max_pdu=40)
    assert len(small.sent) > 1
