"""Hostile and stuck peers against a real listener: everyone else still gets in.

Each test holds connections that misbehave the way a stuck modality or an attacker
would (half an association request, nothing at all, a PDU header claiming
gigabytes, a forged AE title) and checks what a real client sees meanwhile, over
real sockets on 127.0.0.1. The process-level checks (descriptors under a 1024 limit,
the 300-instance soak with dcmtk, the forged log line) start ``dicomnode serve``.
"""

from __future__ import annotations

import os
import resource
import socket
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from sqlalchemy import create_engine, func, select

from dicomnode.db import Instance
from dicomnode.listener import Listener
from tests.conftest import free_port, wait_for
from tests.factories import ct_series, write_series
from tests.integration import hostile
from tests.integration.node_process import NodeProcess, listener_port, write_config

MakeListener = Callable[..., Listener]
STORESCU = "/usr/bin/storescu"  # dcmtk's, not the script pynetdicom installs
needs_dcmtk = pytest.mark.skipif(
    not Path(STORESCU).exists(), reason="dcmtk is installed by .ci/run"
)


def test_half_requests_and_silent_connections_do_not_keep_a_client_out(
    make_listener: MakeListener,
) -> None:
    # Before: 40 half requests (or 33 silent connections) each took a thread pair
    # and one of the 32 association slots; every real client was rejected
    # ("Local Limit Exceeded") until they closed, and for a minute after.
    listener = make_listener()
    with hostile.Crowd(listener.port) as crowd:
        crowd.half_requests(40).silent(40)
        time.sleep(0.5)  # let the listener take them all in
        assert hostile.admission_seconds(listener.port, timeout=10) < 2
        # None of them is an association (the real client's ends after its release).
        assert wait_for(lambda: listener.ae.active_associations == [], timeout=5)
    # ... and right after they go, too.
    assert hostile.admission_seconds(listener.port, timeout=10) < 2


def test_a_waiting_connection_holds_no_thread(make_listener: MakeListener) -> None:
    listener = make_listener()
    before = hostile.threads(os.getpid())
    with hostile.Crowd(listener.port) as crowd:
        crowd.half_requests(50).silent(50)
        time.sleep(0.5)
        # Before: two threads per connection (pynetdicom's DUL and association).
        assert hostile.threads(os.getpid()) <= before + 2


def test_an_unfinished_request_is_dropped_at_its_deadline(make_listener: MakeListener) -> None:
    listener = make_listener(request_timeout_seconds=1)
    with hostile.Crowd(listener.port) as crowd:
        crowd.half_requests(1).silent(1)
        # Before: no socket timeout; both stayed open for as long as the peer liked.
        for sock in crowd.sockets:
            assert hostile.closed_by_peer(sock, timeout=10)


def test_the_oldest_waiting_connection_makes_room(make_listener: MakeListener) -> None:
    listener = make_listener(max_pending_per_address=8)
    with hostile.Crowd(listener.port) as crowd:
        crowd.silent(8)
        time.sleep(0.3)
        crowd.silent(3)
        # The three oldest are closed to make room for the three newest.
        closed = [hostile.closed_by_peer(s, timeout=0.5) for s in crowd.sockets]
        assert closed == [True] * 3 + [False] * 8


def test_a_request_claiming_gigabytes_is_refused_before_it_is_read(
    make_listener: MakeListener,
) -> None:
    # Before: the listener buffered whatever followed a 2 GB A-ASSOCIATE-RQ header.
    listener = make_listener()
    with hostile.Crowd(listener.port) as crowd:
        crowd.huge_header(1)
        sock = crowd.sockets[0]
        reply = hostile.read_pdu(sock, timeout=5)
        assert reply[:1] == b"\x07"  # A-ABORT, without reading a byte of the body
        assert hostile.closed_by_peer(sock, timeout=5)
    assert hostile.admission_seconds(listener.port) < 2


def test_a_pdu_longer_than_announced_is_aborted(
    make_listener: MakeListener, caplog: pytest.LogCaptureFixture
) -> None:
    listener = make_listener(max_pdu=65536)
    sock = hostile.connect(listener.port)
    try:
        sock.sendall(hostile.associate_rq())
        accept = hostile.read_pdu(sock)
        assert accept[:1] == b"\x02", "association not accepted"
        # A P-DATA-TF header claiming 2 GB, then data: before, the listener kept
        # reading (and buffering) it; now the body is never read.
        sock.sendall(struct.pack(">BBI", 0x04, 0, 2**31) + bytes(1 << 20))
    except ConnectionError:
        pass  # the listener may close before all of it is sent
    reply = hostile.read_pdu(sock, timeout=10)
    sock.close()
    assert reply[:1] == b"\x07", f"expected an A-ABORT, got {reply[:10]!r}"
    assert reply[8:10] == b"\x02\x06"  # service provider, invalid PDU parameter value
    assert wait_for(lambda: listener.ae.active_associations == [], timeout=10)
    assert "PDU of 2147483648 bytes refused" in caplog.text  # our one line says it ...
    assert not [r for r in caplog.records if r.name == "pynetdicom.dul" and r.exc_info]


def test_one_address_cannot_take_every_association_slot(make_listener: MakeListener) -> None:
    listener = make_listener(max_associations=4, max_associations_per_address=2)
    ae = AE(ae_title="FIRST")
    ae.add_requested_context(Verification)
    held = [ae.associate("127.0.0.1", listener.port, ae_title="DICOMNODE") for _ in range(3)]
    try:
        assert [a.is_established for a in held] == [True, True, False]
        rejected = held[2].acceptor.primitive
        assert (rejected.result, rejected.result_source, rejected.diagnostic) == (2, 3, 2)
        # Another device, at another address, still gets in.
        other = ae.associate(
            "127.0.0.1", listener.port, ae_title="DICOMNODE", bind_address=("127.0.0.2", 0)
        )
        assert other.is_established
        other.release()
    finally:
        for assoc in held:
            if assoc.is_established:
                assoc.release()


def test_a_refused_address_is_answered_without_a_thread(
    make_listener: MakeListener, monkeypatch: pytest.MonkeyPatch
) -> None:
    listener = make_listener(allowed_networks=["127.0.0.2/32"])
    server = listener._server
    assert server is not None
    started: list[object] = []
    start = server.start_association
    monkeypatch.setattr(server, "start_association", lambda r: (started.append(r), start(r)))
    before = hostile.threads(os.getpid())
    socks = []
    for _ in range(20):
        sock = hostile.connect(listener.port)
        sock.sendall(hostile.associate_rq())
        socks.append(sock)
    replies = [hostile.read_pdu(s) for s in socks]
    assert all(r[:1] == b"\x03" and r[7:10] == b"\x01\x01\x01" for r in replies)
    assert started == []  # before: each one was an association, with its two threads
    assert hostile.threads(os.getpid()) <= before + 2  # the refusal thread at most
    for sock in socks:
        sock.close()


def test_an_ae_title_with_control_characters_is_rejected(make_listener: MakeListener) -> None:
    listener = make_listener()
    sock = hostile.connect(listener.port)
    sock.sendall(hostile.associate_rq(calling=b"CT\n2026 FORGED"))
    reply = hostile.read_pdu(sock)
    sock.close()
    # Rejected permanent, service user, calling AE title not recognised.
    assert reply[:1] == b"\x03" and reply[7:10] == b"\x01\x01\x03"


# --- a real `dicomnode serve` process -----------------------------------------------


def _node(tmp_path: Path, db_url: str, extra: str = "") -> Path:
    return write_config(tmp_path, db_url=db_url, pacs_port=free_port(), listener_extra=extra)


def _limit_descriptors(limit: int) -> Callable[[], None]:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    return apply


def test_400_idle_connections_under_a_1024_descriptor_limit(tmp_path: Path) -> None:
    # Before: each idle connection took 2 threads and ~2.75 descriptors; about 400
    # exhausted a 1024 limit and the listener could accept no one.
    # Room for all 400 to wait at once: they must fit, not be evicted to make room.
    config = _node(
        tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}", "max_pending_connections = 1000\n"
    )
    node = NodeProcess(config)
    node.preexec = _limit_descriptors(1024)
    with node:
        pid = node.proc.pid
        port = listener_port(config)
        hostile.admission_seconds(port)
        baseline = hostile.descriptors(pid)
        crowd = hostile.Crowd(port)
        try:
            for i in range(400):
                # From 40 addresses, as a building full of stuck devices would be.
                crowd.sockets.append(_connect_from(f"127.0.1.{i % 40 + 1}", port))
            assert wait_for(lambda: hostile.descriptors(pid) >= baseline + 400, timeout=10)
            assert hostile.admission_seconds(port, timeout=10) < 2
            assert hostile.threads(pid) < 40
        finally:
            crowd.close()
        # The descriptors come back once they go, and stay back after real
        # associations end (no pipe waits for the garbage collector).
        for _ in range(30):
            hostile.admission_seconds(port)
        assert wait_for(lambda: hostile.descriptors(pid) <= baseline + 2, timeout=15), (
            f"{hostile.descriptors(pid)} descriptors open, {baseline} before"
        )


def _connect_from(source: str, port: int) -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    return sock


def test_a_forged_log_line_stays_on_its_own_line(tmp_path: Path) -> None:
    config = _node(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}")
    with NodeProcess(config) as node:
        port = listener_port(config)
        # From three addresses: rejections are logged once per address per minute.
        for i, calling in enumerate((b"CT\n2026 FORGED", b"CT\rFORGED2", b"\x1b[2JFORGED3")):
            sock = _connect_from(f"127.0.2.{i + 1}", port)
            sock.sendall(hostile.associate_rq(calling=calling))
            assert hostile.read_pdu(sock)[:1] == b"\x03"
            sock.close()
        assert wait_for(lambda: node.log().count("association rejected") >= 3, timeout=15)
        log = node.log()
    assert not [line for line in log.splitlines() if "FORGED" in line.split(":", 1)[0]]
    assert not any(line.startswith(("2026 FORGED", "FORGED")) for line in log.splitlines())
    assert "\x1b" not in log and "\r" not in log
    assert "CT\\n2026 FORGED" in log


@needs_dcmtk
@pytest.mark.slow
def test_soak_a_series_arrives_whole_while_80_connections_hang(tmp_path: Path, db_url: str) -> None:
    series = write_series(ct_series(np.zeros((300, 32, 32), np.float32)), tmp_path / "series")
    config = _node(tmp_path, db_url)
    if not db_url.startswith("sqlite"):
        assert NodeProcess(config).cli("db", "upgrade").returncode == 0
    with NodeProcess(config) as node:
        port = listener_port(config)
        with hostile.Crowd(port) as crowd:
            crowd.half_requests(40).silent(40)
            time.sleep(0.5)
            assert hostile.admission_seconds(port, timeout=10) < 2
            sent = subprocess.run(
                [STORESCU, "-aec", "DICOMNODE", "-to", "30", "-td", "60",
                 "127.0.0.1", str(port), *map(str, series)],
                capture_output=True, text=True, timeout=600, check=False,
            )  # fmt: skip
            assert sent.returncode == 0, sent.stderr[-2000:]
        node.stop()
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            assert conn.scalar(select(func.count()).select_from(Instance)) == 300
    finally:
        engine.dispose()


@needs_dcmtk
def test_an_association_on_a_descriptor_numbered_above_1024(tmp_path: Path) -> None:
    # select() cannot watch descriptor 1024 or above: pynetdicom's and the reactor's
    # use of it aborted such an association ("Peer aborted Association").
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4096:
        pytest.skip(f"the hard descriptor limit ({hard}) is too low to hold 1100 connections")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096), hard))
    extra = "max_pending_connections = 2000\nmax_pending_per_address = 2000\n"
    config = _node(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}", extra)
    try:
        with NodeProcess(config) as node, hostile.Crowd(listener_port(config)) as crowd:
            port = listener_port(config)
            crowd.silent(1100)
            assert node.proc is not None
            assert wait_for(lambda: hostile.descriptors(node.proc.pid) > 1100, timeout=20)
            one = write_series(ct_series(np.zeros((1, 8, 8), np.float32)), tmp_path / "one")
            # dcmtk in a process of its own: the client's descriptors stay low.
            sent = subprocess.run(
                [STORESCU, "-aec", "DICOMNODE", "-to", "20", "127.0.0.1", str(port), str(one[0])],
                capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
            assert sent.returncode == 0, sent.stderr
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
