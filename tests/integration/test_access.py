"""Who may send, over what, and how much: access control, DICOM TLS, and the limits.

Real peers throughout: dcmtk's echoscu/storescu (with its TLS options and keys made
here with openssl) and pynetdicom, against an in-process listener on loopback.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage
from sqlalchemy import func, select

from dicomnode.config import ListenerSettings
from dicomnode.db import Instance
from dicomnode.dimse import statuses
from dicomnode.errors import DicomnodeError
from dicomnode.listener import Listener
from dicomnode.store import Ingestor, Spool
from tests.conftest import free_port, wait_for
from tests.dcmtk import STORESCU
from tests.dcmtk import tool as dcmtk_tool
from tests.integration import hostile

pytestmark = pytest.mark.skipif(
    shutil.which(STORESCU) is None or shutil.which("openssl") is None,
    reason="dcmtk and openssl are installed by .ci/run",
)

MakeListener = Callable[..., Listener]


def dcmtk(tool: str, port: int, *args: str, aet: str = "STORESCU") -> subprocess.CompletedProcess:
    return subprocess.run(
        [dcmtk_tool(tool), "-aet", aet, "-aec", "DICOMNODE", "-to", "10", "-ta", "10", "-td", "10",
         *args, "127.0.0.1", str(port)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def storescu(port: int, *files: Path, args: tuple[str, ...] = (), aet: str = "STORESCU"):
    return subprocess.run(
        [STORESCU, "-aet", aet, "-aec", "DICOMNODE", "-to", "10", "-ta", "10", "-td", "10",
         *args, "127.0.0.1", str(port), *map(str, files)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def instance_rows(sessions) -> int:
    with sessions() as s:
        return int(s.scalar(select(func.count()).select_from(Instance)) or 0)


def incoming(listener: Listener) -> list[Path]:
    return sorted((listener.ingestor.spool.root / "incoming").rglob("*.dcm"))


def test_calling_ae_allow_list(make_listener: MakeListener, lidc1: list[Path], sessions) -> None:
    listener = make_listener(allowed_calling_aets=["CT01", "PACS"])
    assert dcmtk("echoscu", listener.port, aet="CT01").returncode == 0
    refused = storescu(listener.port, lidc1[0], aet="INTRUDER")
    assert refused.returncode != 0
    assert "Calling AE Title Not Recognized" in refused.stderr + refused.stdout
    assert incoming(listener) == [] and instance_rows(sessions) == 0
    assert storescu(listener.port, lidc1[0], aet="PACS").returncode == 0
    assert instance_rows(sessions) == 1


def test_peer_network_allow_list(make_listener: MakeListener, lidc1: list[Path], sessions) -> None:
    elsewhere = make_listener(allowed_networks=["10.0.0.0/8", "192.168.1.7"])
    assoc = AE(ae_title="TESTSCU")
    assoc.add_requested_context(CTImageStorage)
    rejected = assoc.associate("127.0.0.1", elsewhere.port, ae_title="DICOMNODE")
    assert rejected.is_rejected  # a clean A-ASSOCIATE-RJ, not a dropped connection
    assert storescu(elsewhere.port, lidc1[0]).returncode != 0
    assert incoming(elsewhere) == [] and instance_rows(sessions) == 0
    assert dcmtk("echoscu", elsewhere.port).returncode != 0

    loopback = make_listener(allowed_networks=["127.0.0.0/8"])
    assert storescu(loopback.port, lidc1[0]).returncode == 0
    assert instance_rows(sessions) == 1


def test_rejections_are_logged_without_phi(
    make_listener: MakeListener, caplog: pytest.LogCaptureFixture
) -> None:
    listener = make_listener(allowed_calling_aets=["CT01"])

    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]

    with caplog.at_level("INFO", logger="dicomnode"):
        assert dcmtk("echoscu", listener.port, aet="NOBODY").returncode != 0
        # Written off the accepting thread, which never waits for the audit's database.
        assert wait_for(lambda: lines(), timeout=10)
        time.sleep(0.2)  # room for a second line, which must not come
    assert len(lines()) == 1  # one line for the one rejection, naming the AE titles and peer
    assert "calling_ae='NOBODY'" in lines()[0] and "127.0.0.1" in lines()[0]


# --- DICOM TLS -----------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _signed(name: str, ca: str, cwd: Path, *, server: bool) -> None:
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=cwd)  # fmt: skip
    ext = cwd / f"{name}.ext"
    ext.write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        f"extendedKeyUsage={'serverAuth' if server else 'clientAuth'}\n"
    )
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-days", "2", "-sha256", "-extfile", ext.name,
             "-out", f"{name}.crt", cwd=cwd)  # fmt: skip


def _ca(name: str, cwd: Path) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
             "-out", f"{name}.crt", "-days", "2", "-subj", f"/CN={name}", cwd=cwd)  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server and a client certificate it signed, and a client from another CA."""
    folder = tmp_path_factory.mktemp("pki")
    _ca("ca", folder)
    _signed("server", "ca", folder, server=True)
    _signed("client", "ca", folder, server=False)
    _ca("rogue-ca", folder)
    _signed("rogue", "rogue-ca", folder, server=False)
    return folder


def tls_args(pki: Path, client: str | None) -> tuple[str, ...]:
    identity = ("+tls", str(pki / f"{client}.key"), str(pki / f"{client}.crt"))
    # dcmtk verifies our server certificate against the CA (its default, -rc).
    return (*(identity if client else ("+tla",)), "+cf", str(pki / "ca.crt"))


def test_tls_store_with_verified_client(
    make_listener: MakeListener, pki: Path, lidc1: list[Path], sessions
) -> None:
    listener = make_listener(
        tls_certificate=pki / "server.crt",
        tls_private_key=pki / "server.key",
        tls_client_ca=pki / "ca.crt",
    )
    ok = storescu(listener.port, *lidc1[:3], args=tls_args(pki, "client"))
    assert ok.returncode == 0, ok.stderr
    assert instance_rows(sessions) == 3
    # No client certificate, or one from a CA we do not trust: the handshake fails.
    for client in (None, "rogue"):
        refused = storescu(listener.port, lidc1[3], args=tls_args(pki, client))
        assert refused.returncode != 0
    # Plain TCP on a TLS port gets nowhere either.
    assert storescu(listener.port, lidc1[4]).returncode != 0
    assert instance_rows(sessions) == 3
    assert dcmtk("echoscu", listener.port, *tls_args(pki, "client")).returncode == 0


def test_tls_without_client_verification(
    make_listener: MakeListener, pki: Path, lidc1: list[Path], sessions
) -> None:
    listener = make_listener(tls_certificate=pki / "server.crt", tls_private_key=pki / "server.key")
    assert storescu(listener.port, lidc1[0], args=tls_args(pki, None)).returncode == 0
    assert instance_rows(sessions) == 1


def test_bad_tls_files_are_named(tmp_path: Path, sessions, pki: Path) -> None:
    (tmp_path / "junk.crt").write_text("not a certificate")
    for cert, message in (
        (tmp_path / "missing.crt", "listener.tls_certificate: file not found"),
        (tmp_path / "junk.crt", "listener.tls_certificate: cannot load junk.crt"),
    ):
        settings = ListenerSettings(
            host="127.0.0.1", port=free_port(), tls_certificate=cert,
            tls_private_key=pki / "server.key",
        )  # fmt: skip
        listener = Listener(settings, Ingestor(Spool(tmp_path / "spool"), sessions))
        with pytest.raises(DicomnodeError, match=message):
            listener.start()


# --- Limits ----------------------------------------------------------------------


def send_one(listener: Listener, path: Path) -> int:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(path).Status)
    finally:
        assoc.release()


def test_free_space_watermark_refuses_with_out_of_resources(
    make_listener: MakeListener, lidc1: list[Path], sessions
) -> None:
    # A watermark above what any disk here has free: every instance is refused.
    listener = make_listener(ingest={"min_free_bytes": 2**62})
    assert send_one(listener, lidc1[0]) == statuses.OUT_OF_RESOURCES
    assert storescu(listener.port, lidc1[1]).returncode != 0
    assert incoming(listener) == [] and instance_rows(sessions) == 0
    assert list(listener.ingestor.spool.tmp.iterdir()) == []  # the received bytes went too
    assert dcmtk("echoscu", listener.port).returncode == 0


def test_instances_over_the_size_limit_are_refused(
    make_listener: MakeListener, lidc1: list[Path], sessions
) -> None:
    size = lidc1[0].stat().st_size
    listener = make_listener(ingest={"max_instance_bytes": size - 1000})
    assert send_one(listener, lidc1[0]) == statuses.OUT_OF_RESOURCES_TOO_LARGE
    assert incoming(listener) == [] and instance_rows(sessions) == 0
    roomy = make_listener(ingest={"max_instance_bytes": size + 1000})
    assert send_one(roomy, lidc1[0]) == statuses.SUCCESS


def test_a_silent_connection_does_not_block_tls(
    make_listener: MakeListener, pki: Path, lidc1: list[Path], sessions
) -> None:
    listener = make_listener(tls_certificate=pki / "server.crt", tls_private_key=pki / "server.key")
    # Connects and says nothing: its handshake must not hold up anyone else's.
    with socket.create_connection(("127.0.0.1", listener.port)):
        ok = storescu(listener.port, lidc1[0], args=tls_args(pki, None))
        assert ok.returncode == 0, ok.stderr
    assert instance_rows(sessions) == 1


def test_a_stalled_tls_handshake_is_dropped_at_the_request_deadline(
    make_listener: MakeListener, pki: Path
) -> None:
    listener = make_listener(
        tls_certificate=pki / "server.crt",
        tls_private_key=pki / "server.key",
        request_timeout_seconds=1,
    )
    # Half a ClientHello, then nothing: closed when the request deadline passes.
    with socket.create_connection(("127.0.0.1", listener.port)) as sock:
        sock.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        assert hostile.closed_by_peer(sock, timeout=10)


def test_a_tls_peer_from_a_refused_network_gets_no_handshake(
    make_listener: MakeListener, pki: Path
) -> None:
    import ssl

    listener = make_listener(
        tls_certificate=pki / "server.crt",
        tls_private_key=pki / "server.key",
        allowed_networks=["10.0.0.0/8"],
    )
    client = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    client.check_hostname = False
    with (
        socket.create_connection(("127.0.0.1", listener.port), timeout=10) as raw,
        pytest.raises((ssl.SSLError, ConnectionError)),
    ):
        client.wrap_socket(raw)  # the listener closes before it answers the hello
    # From an allowed network the same handshake goes through.
    allowed = make_listener(
        tls_certificate=pki / "server.crt",
        tls_private_key=pki / "server.key",
        allowed_networks=["127.0.0.0/8"],
    )
    with (
        socket.create_connection(("127.0.0.1", allowed.port), timeout=10) as raw,
        client.wrap_socket(raw) as tls,
    ):
        assert tls.version() is not None
