"""The gate's pieces that need no listener: titles, rejections, and one Gate on a port."""

from __future__ import annotations

import socket
import threading

import pytest

from dicomnode.net import admission
from tests.integration import hostile


@pytest.mark.parametrize(
    ("raw", "title"),
    [
        (b"CT01            ", "CT01"),
        (b"  PACS MAIN     ", "PACS MAIN"),
        (b"                ", None),  # all spaces: no title
        (b"CT\n01           ", None),
        (b"CT\\01           ", None),  # the backslash separates values
        (b"CT\xc301          ", None),
        (b"\x00" * 16, None),
    ],
)
def test_ae_titles_that_no_ae_title_may_look_like(raw: bytes, title: str | None) -> None:
    assert admission.ae_title(raw) == title


def test_a_rejection_is_a_ten_byte_a_associate_rj() -> None:
    pdu = admission.encode_reject(admission.Rejection(2, 3, 2, "too_many"))
    assert pdu == bytes([0x03, 0, 0, 0, 0, 4, 0, 2, 3, 2])


class _Recorder:
    def __init__(self, verdict: admission.Rejection | None) -> None:
        self.verdict = verdict
        self.admitted: list[admission.Request] = []
        self.refused: list[tuple[str, str, str, str]] = []

    def admit(self, request: admission.Request) -> admission.Rejection | None:
        if self.verdict is None:
            self.admitted.append(request)
        return self.verdict

    def refuse(self, *args: str) -> None:
        self.refused.append(args)  # type: ignore[arg-type]


def _gate(recorder: _Recorder, **limits: float) -> tuple[admission.Gate, int, threading.Thread]:
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen(16)
    gate = admission.Gate(
        listening,
        admission.Limits(**limits),  # type: ignore[arg-type]
        admit=recorder.admit,
        refused=recorder.refuse,
    )
    thread = threading.Thread(target=gate.run, daemon=True)
    thread.start()
    return gate, listening.getsockname()[1], thread


def test_a_request_sent_byte_by_byte_is_decoded_and_handed_over() -> None:
    recorder = _Recorder(None)
    gate, port, thread = _gate(recorder)
    try:
        sock = hostile.connect(port)
        for byte in hostile.associate_rq(calling=b"CT01"):
            sock.send(bytes([byte]))
        assert hostile.wait_until(lambda: recorder.admitted, 5)
        request = recorder.admitted[0]
        assert (request.calling_ae, request.called_ae) == ("CT01", "DICOMNODE")
        assert request.pdu.calling_ae_title == "CT01"
        assert gate.waiting == 0
        request.sock.close()
        sock.close()
    finally:
        gate.stop()
        thread.join(5)


def test_a_rejection_is_answered_and_reported() -> None:
    recorder = _Recorder(admission.Rejection(1, 1, 3, "calling_ae"))
    gate, port, thread = _gate(recorder)
    try:
        sock = hostile.connect(port)
        sock.sendall(hostile.associate_rq(calling=b"NOBODY"))
        assert hostile.read_pdu(sock) == bytes([3, 0, 0, 0, 0, 4, 0, 1, 1, 3])
        assert recorder.refused == [("NOBODY", "DICOMNODE", "127.0.0.1", "calling_ae")]
        sock.close()
    finally:
        gate.stop()
        thread.join(5)


def test_anything_but_an_association_request_is_aborted() -> None:
    recorder = _Recorder(None)
    gate, port, thread = _gate(recorder)
    try:
        sock = hostile.connect(port)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert hostile.read_pdu(sock)[:1] == b"\x07"
        assert recorder.admitted == []
        sock.close()
    finally:
        gate.stop()
        thread.join(5)


def test_stopping_closes_the_connections_still_waiting() -> None:
    recorder = _Recorder(None)
    gate, port, thread = _gate(recorder)
    sock = hostile.connect(port)
    assert hostile.wait_until(lambda: gate.waiting == 1, 5)
    gate.stop()
    thread.join(5)
    assert not thread.is_alive()
    assert hostile.closed_by_peer(sock, timeout=5)
