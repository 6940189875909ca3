"""Misbehaving peers, written byte by byte: what a stuck or hostile device sends.

Used by the hostile-peer tests and by ``bench/hostile.py``. Everything here speaks
raw TCP to 127.0.0.1 so that it can stop where a real client never would: half an
A-ASSOCIATE-RQ, nothing at all, a PDU header that claims gigabytes.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom.sop_class import Verification

from tests.conftest import proc_status

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"  # the DICOM application context (PS3.7 A.2.1)


def _item(kind: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(payload)) + payload


def _ae(title: bytes) -> bytes:
    return title.ljust(16, b" ")[:16]


def associate_rq(
    called: bytes | str = b"DICOMNODE",
    calling: bytes | str = b"HOSTILE",
    contexts: tuple[str, ...] = (Verification, CTImageStorage),
    max_pdu: int = 16384,
) -> bytes:
    """Return a well-formed A-ASSOCIATE-RQ PDU (PS3.8 9.3.2), byte for byte.

    Parameters
    ----------
    called, calling : bytes or str
        The AE titles, as sent (control characters and all).
    contexts : tuple of str
        Abstract syntaxes, each proposed with implicit and explicit VR little endian.
    max_pdu : int
        The Maximum Length Received we announce.

    Returns
    -------
    bytes
        The PDU.
    """
    called = called.encode("latin-1") if isinstance(called, str) else called
    calling = calling.encode("latin-1") if isinstance(calling, str) else calling
    body = struct.pack(">HH", 1, 0) + _ae(called) + _ae(calling) + bytes(32)
    body += _item(0x10, APPLICATION_CONTEXT.encode())
    for index, abstract in enumerate(contexts):
        syntaxes = _item(0x30, abstract.encode())
        syntaxes += _item(0x40, ImplicitVRLittleEndian.encode()) + _item(
            0x40, ExplicitVRLittleEndian.encode()
        )
        body += _item(0x20, bytes([2 * index + 1, 0, 0, 0]) + syntaxes)
    user = _item(0x51, struct.pack(">I", max_pdu)) + _item(0x52, b"1.2.826.0.1.3680043.9.7433.99")
    body += _item(0x50, user)
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def connect(port: int, host: str = "127.0.0.1", timeout: float = 10) -> socket.socket:
    """Open a TCP connection to the listener (no Nagle), as a peer would."""
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_pdu(sock: socket.socket, timeout: float = 10) -> bytes:
    """Read one whole PDU, or what arrived before the connection closed or timed out."""
    sock.settimeout(timeout)
    data = b""
    try:
        while len(data) < 6 or len(data) < 6 + struct.unpack(">I", data[2:6])[0]:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except (TimeoutError, ConnectionError):
        pass
    return data


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """Return whether the listener closed (or reset) this connection within ``timeout``."""
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not sock.recv(65536):
                return True
    except ConnectionError:
        return True
    except TimeoutError:
        return False
    return False


class Crowd:
    """Connections that misbehave, held open until :meth:`close`.

    Parameters
    ----------
    port : int
        The listener's port on 127.0.0.1.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.sockets: list[socket.socket] = []

    def _open(self) -> socket.socket:
        # A connection the listener would not let us open is an error here: a test
        # claiming "80 hanging" must really hold 80.
        sock = connect(self.port)
        self.sockets.append(sock)
        return sock

    def silent(self, count: int) -> Crowd:
        """Open ``count`` connections that never send a byte."""
        for _ in range(count):
            self._open()
        return self

    def half_requests(self, count: int, calling: bytes = b"HALFRQ") -> Crowd:
        """Open ``count`` connections that send half an A-ASSOCIATE-RQ and stop."""
        request = associate_rq(calling=calling)
        for _ in range(count):
            self._open().sendall(request[: len(request) // 2])
        return self

    def huge_header(self, count: int, claimed: int = 2**31) -> Crowd:
        """Open connections whose first PDU header claims ``claimed`` bytes."""
        for _ in range(count):
            self._open().sendall(struct.pack(">BBI", 0x01, 0, claimed))
        return self

    def close(self) -> None:
        """Close every connection of the crowd."""
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.close()
        self.sockets.clear()

    def __enter__(self) -> Crowd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def admission_seconds(port: int, called: str = "DICOMNODE", timeout: float = 30) -> float:
    """Time a real client's association (request to accept) and C-ECHO over it.

    Returns
    -------
    float
        Seconds from opening the connection to the A-ASSOCIATE-AC.

    Raises
    ------
    AssertionError
        If the association is not accepted or the echo fails.
    """
    from pynetdicom import AE

    ae = AE(ae_title="REALCLIENT")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = timeout
    started = time.perf_counter()
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    elapsed = time.perf_counter() - started
    try:
        assert assoc.is_established, "the real client was not admitted"
        result = assoc.send_c_echo()
        assert result and result.Status == 0, "C-ECHO failed"
    finally:
        if assoc.is_established:
            assoc.release()
    return elapsed


def descriptors(pid: int) -> int:
    """Return how many file descriptors a process has open."""
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def threads(pid: int) -> int:
    """Return how many threads a process runs."""
    return proc_status(pid, "Threads")


def store_raw(
    port: int,
    path: Path,
    called: str = "DICOMNODE",
    timeout: float = 120,
    syntaxes: tuple[str, ...] = (DeflatedExplicitVRLittleEndian,),
) -> int:
    """Send a file's bytes exactly as they are (no re-encoding) with C-STORE.

    ``syntaxes`` must hold the file's own transfer syntax (deflated by default).

    Returns
    -------
    int
        The C-STORE status, or -1 if no response came.
    """
    from pynetdicom import AE

    ae = AE(ae_title="RAWSCU")
    ae.add_requested_context(CTImageStorage, list(syntaxes))
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = timeout
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return -1
    try:
        with _sending_files_as_they_are():
            reply = assoc.send_c_store(path)
        return int(reply.Status) if "Status" in reply else -1
    finally:
        if assoc.is_established:
            assoc.release()


_raw_lock = threading.Lock()
_raw_senders = 0  # callers sending now
_raw_before = False  # the flag as it was before the first of them


@contextlib.contextmanager
def _sending_files_as_they_are() -> Iterator[None]:
    """Turn on pynetdicom's chunked send (a process-wide flag) while any caller sends.

    Counted, so that concurrent senders (the bench sends four at once) all send raw,
    and the flag is back as it was once the last one is done.
    """
    from pynetdicom import _config

    global _raw_senders, _raw_before
    with _raw_lock:
        if _raw_senders == 0:
            _raw_before = _config.STORE_SEND_CHUNKED_DATASET
            _config.STORE_SEND_CHUNKED_DATASET = True
        _raw_senders += 1
    try:
        yield
    finally:
        with _raw_lock:
            _raw_senders -= 1
            if _raw_senders == 0:
                _config.STORE_SEND_CHUNKED_DATASET = _raw_before
