from __future__ import annotations

import os
import socket
import threading
import time
from types import SimpleNamespace

from pynetdicom import AE

from dicomnode.dimse import reactor
from dicomnode.listener import Listener


def feed(sock: socket.socket, data: bytes, *, close: bool) -> threading.Thread:
    def run() -> None:
        for i in range(0, len(data), 7000):  # odd pieces: reads must be stitched together
            sock.sendall(data[i : i + 7000])
            time.sleep(0.0005)
        if close:
            sock.close()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_recv_reads_exactly_what_was_asked() -> None:
    ours, theirs = socket.socketpair()
    data = os.urandom(1_000_003)
    sender = feed(theirs, data + b"next PDU", close=False)
    got = reactor._recv(SimpleNamespace(socket=ours), len(data))  # type: ignore[arg-type]
    sender.join()
    assert isinstance(got, bytearray) and bytes(got) == data
    assert ours.recv(100) == b"next PDU"  # nothing beyond the request was consumed
    ours.close()
    theirs.close()


def test_recv_returns_what_arrived_when_the_peer_closes() -> None:
    ours, theirs = socket.socketpair()
    data = os.urandom(50_000)
    sender = feed(theirs, data, close=True)
    got = reactor._recv(SimpleNamespace(socket=ours), 80_000)  # type: ignore[arg-type]
    sender.join()
    assert bytes(got) == data
    ours.close()


def test_associations_get_event_driven_waiters(listener: Listener) -> None:
    # If a pynetdicom upgrade changed its internals, install() would fall back to
    # polling without failing anything else; this is where that shows.
    assert reactor.install()
    from pynetdicom import evt

    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context("1.2.840.10008.1.1")
    # The client side tuned too: an untuned pynetdicom client now and then takes its
    # own C-ECHO response off the queue under load (see compat.keep_responses_for_the_caller).
    assoc = ae.associate(
        "127.0.0.1",
        listener.port,
        ae_title="DICOMNODE",
        evt_handlers=[(evt.EVT_CONN_OPEN, reactor.tune_connection)],
    )
    assert assoc.is_established
    try:
        (acceptor,) = listener.ae.active_associations
        assert callable(getattr(acceptor, "_dicomnode_wait", None))
        assert callable(getattr(acceptor.dul, "_dicomnode_wait", None))
        for _ in range(20):
            assert assoc.send_c_echo().Status == 0
    finally:
        assoc.release()


def test_our_associations_leave_responses_to_the_caller(listener: Listener) -> None:
    """The association thread of an association we open never takes a DIMSE message.

    pynetdicom's pause handshake lets that thread take a C-STORE response meant for
    the sender now and then under load; the sender then times out and the results
    are sent twice. Here a message is queued while the thread runs its loop (every
    millisecond, and woken by the queueing itself): it must still be there for the
    caller's blocking read.
    """
    from pynetdicom import evt

    ae = AE(ae_title="TESTSCU")
    ae.dimse_timeout = 2  # bounds the blocking read if the message was taken
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate(
        "127.0.0.1",
        listener.port,
        ae_title="DICOMNODE",
        evt_handlers=[(evt.EVT_CONN_OPEN, reactor.tune_connection)],
    )
    assert assoc.is_established
    try:
        assert assoc.is_alive()
        marker = SimpleNamespace(name="a response for the caller")
        assoc.dimse.msg_queue.put((1, marker))
        time.sleep(0.2)  # two hundred turns of the association thread's loop
        assert assoc.dimse.msg_queue.qsize() == 1
        assert assoc.dimse.get_msg(block=True) == (1, marker)
        assert assoc.send_c_echo().Status == 0  # and the caller's own reads still work
    finally:
        assoc.abort()  # needs no reply, so it works even if the thread died on the marker
