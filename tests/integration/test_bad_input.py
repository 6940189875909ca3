"""Bad input at the network level: the listener refuses it, keeps nothing, and stays up.

Covers what a misbehaving peer can do below the level of a well-formed C-STORE:
bytes that are not DICOM at all, an association that drops in the middle of a
dataset, datasets whose VRs and lengths do not parse, and calling AE titles that are
not on the allow-list. Each runs on SQLite and on PostgreSQL (the ``sessions`` fixture).
"""

from __future__ import annotations

import contextlib
import random
import shutil
import socket
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.transport import AssociationSocket
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.db import Instance
from dicomnode.dimse import statuses
from dicomnode.listener import Listener
from tests.conftest import memory_bytes, wait_for
from tests.dcmtk import STORESCU
from tests.factories import ct_series, write_series
from tests.integration.test_listener import dcmtk, send, spool_files

pytestmark = pytest.mark.skipif(
    shutil.which(STORESCU) is None, reason="dcmtk is installed by .ci/run"
)

Sessions = sessionmaker[Session]


@pytest.fixture
def raw_files(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make pynetdicom send a file's dataset bytes exactly as they are on disk."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


def row_count(sessions: Sessions) -> int:
    with sessions() as s:
        return int(s.scalar(select(func.count()).select_from(Instance)) or 0)


def tmp_files(listener: Listener) -> list[Path]:
    return sorted(p for p in (listener.ingestor.spool.root / "tmp").rglob("*") if p.is_file())


def assert_nothing_kept(listener: Listener, sessions: Sessions) -> None:
    assert spool_files(listener) == []
    assert row_count(sessions) == 0


def ct_slice(size: int = 8) -> Dataset:
    # Noise rather than zeros, so a store that lost bytes could not pass by accident.
    pixels = np.random.default_rng(0).integers(-1000, 1000, (1, size, size)).astype(np.float32)
    return ct_series(pixels)[0]


# --- (1) bytes that are not DICOM -------------------------------------------------------

A_ABORT = 0x07

GARBAGE = {
    "http": b"GET / HTTP/1.1\r\nHost: dicomnode\r\n\r\n",
    "random": random.Random(0).randbytes(64 * 1024),
    "tls-client-hello": bytes.fromhex("16030100a5010000a10303") + bytes(160),
    # A plausible PDU header that announces 4 GiB and then stops.
    "huge-associate-rq": b"\x01\x00\xff\xff\xff\xff" + bytes(64),
    # Data before any association exists.
    "p-data-first": b"\x04\x00\x00\x00\x00\x0a\x00\x00\x00\x06\x01\x03" + bytes(4),
}


def read_until_closed(sock: socket.socket, timeout: float) -> bytes:
    """Return what the peer sends until it closes; fail if it stays silent ``timeout`` s."""
    sock.settimeout(timeout)
    received = bytearray()
    try:
        while chunk := sock.recv(4096):
            received += chunk
    except ConnectionResetError:
        pass  # closed with a reset: as good as a close
    except TimeoutError:
        pytest.fail(f"the listener kept the connection open for {timeout} s")
    return bytes(received)


@pytest.mark.parametrize("payload", GARBAGE.values(), ids=GARBAGE.keys())
def test_non_dicom_bytes_are_dropped(
    listener: Listener, sessions: Sessions, payload: bytes
) -> None:
    before = memory_bytes(field="VmRSS")
    with socket.create_connection(("127.0.0.1", listener.port), timeout=10) as sock:
        # The listener may hang up before it has read everything: that is fine.
        with contextlib.suppress(ConnectionError):
            sock.sendall(payload)
        # While this peer is connected, others are served: one bad peer blocks nobody.
        assert dcmtk("echoscu", listener) == 0
        # A length the peer merely claims (4 GiB) must not be allocated up front.
        assert memory_bytes(field="VmRSS") - before < 256 * 2**20
        # Our end is done; the listener must let go of the connection, answering at
        # most with A-ABORT PDUs (a peer that says nothing more must not hold a thread).
        with contextlib.suppress(OSError):  # not connected any more, if it hung up
            sock.shutdown(socket.SHUT_WR)
        reply = read_until_closed(sock, timeout=10)
    assert reply == b"" or reply[0] == A_ABORT, reply[:32]
    assert dcmtk("echoscu", listener) == 0
    assert_nothing_kept(listener, sessions)


# --- (2) an association that drops in the middle of a dataset ---------------------------


class DropAfter:
    """Let the requestor's bytes through up to ``limit``, then drop the connection.

    Installed over the association socket's ``send``, which pynetdicom's DUL thread
    calls with each encoded PDU. ``how`` is what the peer does at the limit:

    * ``fin``: sends the PDU up to the limit (so the listener holds half a PDU),
      then shuts the socket down and closes it;
    * ``rst``: the same, but closes with SO_LINGER 0, so the kernel sends a reset;
    * ``abort``: stops at the last whole PDU before the limit and sends an A-ABORT.
    """

    def __init__(self, assoc: Association, limit: int, how: str) -> None:
        sock = assoc.dul.socket
        assert sock is not None and sock.socket is not None
        self.sock: AssociationSocket = sock
        self.raw: socket.socket = sock.socket
        self.real_send = sock.send
        self.limit, self.how = limit, how
        self.sent = 0
        self.dropped = False
        sock.send = self._send  # type: ignore[assignment]

    def _send(self, data: bytes) -> None:
        if self.dropped:
            return
        if self.sent + len(data) <= self.limit:
            self.real_send(data)
            self.sent += len(data)
            return
        self.dropped = True
        if self.how == "abort":
            # A-ABORT PDU: type 7, length 4, reserved, reserved, source 0 (service user),
            # reason 0.
            self.raw.sendall(b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00")
        else:
            self.raw.sendall(data[: self.limit - self.sent])
        if self.how == "rst":
            self.raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            self.raw.shutdown(socket.SHUT_RDWR)
        self.raw.close()
        # Tell our own DUL the connection is gone, so send_c_store returns at once.
        self.sock.event_queue.put("Evt17")


# (how the peer drops, the listener's max PDU): with the default (MiBs, or unlimited) the
# whole dataset is one P-DATA PDU; with 16 KiB it is about 32, so the drop comes after
# the listener has received and handled some of them.
DROPS = [("fin", None), ("rst", None), ("fin", 16384), ("rst", 16384), ("abort", 16384)]


@pytest.mark.parametrize(
    ("how", "max_pdu"), DROPS, ids=[f"{h}-pdu{m or 'default'}" for h, m in DROPS]
)
def test_association_dropped_mid_dataset_leaves_nothing(
    make_listener, sessions: Sessions, how: str, max_pdu: int | None
) -> None:
    settings = {} if max_pdu is None else {"max_pdu": max_pdu}
    node = make_listener(**settings)
    ds = ct_slice(512)  # 512 KiB of pixel data
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    assert assoc.is_established
    # Counted from the C-STORE on: its command, then about 40% of the dataset.
    drop = DropAfter(assoc, limit=200 * 1024, how=how)
    reply = assoc.send_c_store(ds)
    assert drop.dropped, "the dataset was sent whole"
    assert "Status" not in reply  # no response can have come
    assoc.abort()  # our side is gone already; this only ends pynetdicom's threads

    # The listener notices the drop and discards what it had received.
    assert wait_for(lambda: tmp_files(node) == [], timeout=2), tmp_files(node)
    assert spool_files(node) == []
    assert row_count(sessions) == 0

    # And it still works: the same instance, sent whole, is stored once.
    assert dcmtk("echoscu", node) == 0
    assert send(node, ds) == statuses.SUCCESS
    stored = spool_files(node)
    assert len(stored) == 1
    assert pydicom.dcmread(stored[0]).PixelData == ds.PixelData
    assert row_count(sessions) == 1
    assert tmp_files(node) == []


# --- (3) datasets with wrong VRs and wrong lengths --------------------------------------

# The explicit VR little endian layouts of an element header (PS3.5 7.1.2).
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT"}


def element_offset(data: bytes, group: int, element: int) -> int:
    """Return where the (group, element) header starts in an explicit VR LE file."""
    # Preamble and "DICM" (132 bytes), then (0002,0000) UL whose value is the length of
    # the rest of the file meta: the dataset starts right after it.
    assert data[132:138] == b"\x02\x00\x00\x00UL"
    start = 144 + int(struct.unpack("<I", data[140:144])[0])
    at = data.index(struct.pack("<HH", group, element), start)
    assert data[at + 4 : at + 6].isalpha(), "not an element header"
    return at


def with_length(data: bytes, group: int, element: int, length: int) -> bytes:
    """Return ``data`` with the element's length field (16-bit VRs only) replaced."""
    at = element_offset(data, group, element)
    assert data[at + 4 : at + 6] not in _LONG_VRS
    return data[: at + 6] + struct.pack("<H", length) + data[at + 8 :]


def with_vr(data: bytes, group: int, element: int, vr: bytes) -> bytes:
    """Return ``data`` with the element's two VR bytes replaced, nothing else."""
    at = element_offset(data, group, element)
    return data[: at + 4] + vr + data[at + 6 :]


def value_length(data: bytes, group: int, element: int) -> int:
    at = element_offset(data, group, element)
    return int(struct.unpack("<H", data[at + 6 : at + 8])[0])


def length_past_end(data: bytes) -> bytes:
    # ImageComments (LT) claims 0xFFF0 bytes; under 1 KiB of the dataset follow it.
    assert len(data) - element_offset(data, 0x0020, 0x4000) < 0xFFF0
    return with_length(data, 0x0020, 0x4000, 0xFFF0)


def undefined_length_text(data: bytes) -> bytes:
    # ImageComments as UT with undefined length: only SQ (and encapsulated pixel data)
    # may have one, so there is no delimiter to find.
    at = element_offset(data, 0x0020, 0x4000)
    old = value_length(data, 0x0020, 0x4000)
    value = data[at + 8 : at + 8 + old]
    header = struct.pack("<HH", 0x0020, 0x4000) + b"UT\x00\x00" + b"\xff\xff\xff\xff"
    return data[:at] + header + value + data[at + 8 + old :]


def odd_length(data: bytes) -> bytes:
    # PatientID (LO) with a length one short of its padded value: odd, as no value
    # length may be, and the next element header starts one byte early.
    length = value_length(data, 0x0010, 0x0020)
    assert length % 2 == 0
    return with_length(data, 0x0010, 0x0020, length - 1)


BAD_DATASETS: dict[str, Callable[[bytes], bytes]] = {
    "length-past-end": length_past_end,
    "undefined-length-non-sq": undefined_length_text,
    # StudyInstanceUID with VR bytes that are no VR at all.
    "ui-bogus-vr": lambda d: with_vr(d, 0x0020, 0x000D, b"ZZ"),
    "ui-nul-vr": lambda d: with_vr(d, 0x0020, 0x000D, b"\x00\x00"),
    # A real VR, but one with a 32-bit length: the header no longer lines up.
    "ui-as-ob": lambda d: with_vr(d, 0x0020, 0x000D, b"OB"),
    "odd-length": odd_length,
}

# PS3.4 B.2.3 and PS3.7 C.4.2: what a C-STORE failure may be. Anything else (success,
# or a warning such as 0xB000) would tell the sender that the instance was kept.
FAILURES = {
    statuses.PROCESSING_FAILURE,
    statuses.OUT_OF_RESOURCES,
    statuses.DATASET_DOES_NOT_MATCH_SOP_CLASS,
    statuses.CANNOT_UNDERSTAND_UNREADABLE,
    statuses.CANNOT_UNDERSTAND_MISSING_UID,
    statuses.CANNOT_UNDERSTAND_INVALID_UID,
    statuses.CANNOT_UNDERSTAND_UID_MISMATCH,
}


# pydicom warns about the garbage it reads while the node parses in this process.
@pytest.mark.filterwarnings("ignore::UserWarning:pydicom")
@pytest.mark.parametrize("corrupt", BAD_DATASETS.values(), ids=BAD_DATASETS.keys())
def test_wrong_vrs_and_lengths_are_refused(
    listener: Listener,
    sessions: Sessions,
    tmp_path: Path,
    raw_files: None,
    corrupt: Callable[[bytes], bytes],
) -> None:
    ds = ct_slice()
    ds.ImageComments = "comment"  # the element the length cases bend
    good = write_series([ds], tmp_path / "good")[0]
    data = good.read_bytes()
    bad = corrupt(data)
    assert bad != data
    path = tmp_path / "bad.dcm"
    path.write_bytes(bad)

    code = send(listener, path)
    assert code in FAILURES, f"status 0x{code:04X} for a dataset that does not parse"
    assert_nothing_kept(listener, sessions)
    # The unchanged file is stored: the refusal was about the bytes, not the instance.
    assert send(listener, good) == statuses.SUCCESS
    assert len(spool_files(listener)) == 1


# --- (4) calling AE titles not on the allow-list ----------------------------------------

# PS3.8 9.3.4: A-ASSOCIATE-RJ result 1 (permanent), source 1 (service user),
# reason 3 (calling AE title not recognized).
REJECTED_PERMANENT, SOURCE_SERVICE_USER, CALLING_AE_NOT_RECOGNIZED = 0x01, 0x01, 0x03


@pytest.fixture
def guarded_listener(make_listener) -> Listener:
    return make_listener(allowed_calling_aets=["SCANNER1"])


def test_unknown_calling_ae_is_rejected(guarded_listener: Listener, sessions: Sessions) -> None:
    node = guarded_listener
    ae = AE(ae_title="INTRUDER")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    assert assoc.is_rejected and not assoc.is_established
    rejection = assoc.acceptor.primitive
    assert rejection is not None
    assert (rejection.result, rejection.result_source, rejection.diagnostic) == (
        REJECTED_PERMANENT,
        SOURCE_SERVICE_USER,
        CALLING_AE_NOT_RECOGNIZED,
    )
    assert dcmtk("echoscu", node, "-aet", "INTRUDER") != 0
    assert dcmtk("echoscu", node) != 0  # dcmtk's default calling AE, ECHOSCU


def test_storescu_from_unknown_calling_ae_stores_nothing(
    guarded_listener: Listener, sessions: Sessions, tmp_path: Path
) -> None:
    node = guarded_listener
    files = write_series(ct_series(np.zeros((3, 8, 8), np.float32)), tmp_path / "ct")
    assert dcmtk("storescu", node, "-aet", "INTRUDER", *map(str, files)) != 0
    assert dcmtk("storescu", node, *map(str, files)) != 0  # STORESCU is not listed either
    assert_nothing_kept(node, sessions)

    # The listed AE title gets in; the allow-list is exact, not a prefix or a pattern.
    assert dcmtk("echoscu", node, "-aet", "SCANNER1") == 0
    assert dcmtk("echoscu", node, "-aet", "SCANNER10") != 0
    assert dcmtk("storescu", node, "-aet", "SCANNER1", *map(str, files)) == 0
    assert len(spool_files(node)) == 3
    with sessions() as s:
        assert set(s.scalars(select(Instance.calling_ae)).all()) == {"SCANNER1"}
