"""The gate's pieces that need no listener: titles, rejections, and one Gate on a port."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from dicomnode.listener import admission
from tests.conftest import wait_for
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


@dataclass
class _Running:
    gate: admission.Gate
    port: int
    thread: threading.Thread


@pytest.fixture
def start_gate() -> Iterator[Callable[[_Recorder], _Running]]:
    """Run Gates on loopback ports with default limits; stopped after the test."""
    running: list[_Running] = []

    def start(recorder: _Recorder) -> _Running:
        listening = socket.socket()
        listening.bind(("127.0.0.1", 0))
        listening.listen(16)
        gate = admission.Gate(
            listening, admission.Limits(), admit=recorder.admit, refused=recorder.refuse
        )
        thread = threading.Thread(target=gate.run, daemon=True)
        thread.start()
        running.append(_Running(gate, listening.getsockname()[1], thread))
        return running[-1]

    yield start
    for r in running:
        r.gate.stop()
        r.thread.join(5)
        r.gate.listening.close()


@pytest.mark.system
def test_a_request_sent_byte_by_byte_is_decoded_and_handed_over(start_gate) -> None:
    recorder = _Recorder(None)
    sock = hostile.connect(start_gate(recorder).port)
    for byte in hostile.associate_rq(calling=b"CT01"):
        sock.send(bytes([byte]))
    assert wait_for(lambda: recorder.admitted, 5)
    request = recorder.admitted[0]
    assert (request.calling_ae, request.called_ae) == ("CT01", "DICOMNODE")
    assert request.pdu.calling_ae_title == "CT01"
    request.sock.close()
    sock.close()


@pytest.mark.system
def test_a_rejection_is_answered_and_reported(start_gate) -> None:
    recorder = _Recorder(admission.Rejection(1, 1, 3, "calling_ae"))
    sock = hostile.connect(start_gate(recorder).port)
    sock.sendall(hostile.associate_rq(calling=b"NOBODY"))
    assert hostile.read_pdu(sock) == bytes([3, 0, 0, 0, 0, 4, 0, 1, 1, 3])
    assert recorder.refused == [("NOBODY", "DICOMNODE", "127.0.0.1", "calling_ae")]
    sock.close()


@pytest.mark.system
def test_anything_but_an_association_request_is_aborted(start_gate) -> None:
    recorder = _Recorder(None)
    sock = hostile.connect(start_gate(recorder).port)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert hostile.read_pdu(sock)[:1] == b"\x07"
    assert recorder.admitted == []
    sock.close()


@pytest.mark.system
def test_stopping_closes_the_connections_still_waiting(start_gate) -> None:
    running = start_gate(_Recorder(None))
    sock = hostile.connect(running.port)
    assert wait_for(lambda: running.gate.waiting == 1, 5)
    running.gate.stop()
    running.thread.join(5)
    assert not running.thread.is_alive()
    assert hostile.closed_by_peer(sock, timeout=5)
