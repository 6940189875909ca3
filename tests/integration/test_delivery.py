"""Bad destinations and DICOM TLS on the sending side, through the real pipeline.

The destination is a pynetdicom storage SCP on loopback that can speak TLS (with a
CA and certificates made here with openssl), abort after the first C-STORE, or
answer with a warning; each outcome must be recorded on the delivery, and the job
retried or finished as it should be.
"""

from __future__ import annotations

import dataclasses
import shutil
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, evt
from sqlalchemy import select

from dicomnode.config import Settings
from dicomnode.db import Delivery, DeliveryState, JobState
from dicomnode.errors import TransientJobError
from dicomnode.imaging import load_registry
from dicomnode.inference import ModelCache
from dicomnode.pipeline import Pipeline
from dicomnode.queue import Worker
from dicomnode.send import scu
from dicomnode.store import Spool
from tests.conftest import free_port
from tests.integration.test_access import _ca, _signed
from tests.integration.test_pipeline import job_row, make_settings, receive_phantom

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


class StagedSCP:
    """A storage SCP on 127.0.0.1 that can use TLS, abort mid-send or warn."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self.port = free_port()
        self.ssl_context = ssl_context
        self.status = 0x0000
        self.abort_after: int | None = None  # abort the association after N C-STOREs
        self.received: list[Dataset] = []
        self.server = None

    def _on_store(self, event: evt.Event) -> int:
        self.received.append(event.dataset)
        if self.abort_after is not None and len(self.received) >= self.abort_after:
            event.assoc.abort()  # the PACS process dies mid-send, say
        return self.status

    def start(self) -> StagedSCP:
        ae = AE(ae_title="STAGED")
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context("1.2.840.10008.1.1")
        self.server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
            ssl_context=self.ssl_context,
        )
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA with a server and a client certificate, and an unrelated CA."""
    folder = tmp_path_factory.mktemp("pki")
    _ca("ca", folder)
    _signed("server", "ca", folder, server=True)
    _signed("client", "ca", folder, server=False)
    _ca("other-ca", folder)
    return folder


def server_context(pki: Path, *, client_ca: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(pki / "server.crt"), str(pki / "server.key"))
    if client_ca:
        context.load_verify_locations(str(pki / "ca.crt"))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def staged(ssl_context: ssl.SSLContext | None = None) -> Iterator[StagedSCP]:
    receiver = StagedSCP(ssl_context).start()
    yield receiver
    receiver.stop()


def make_node(tmp_path: Path, db_url: str, sessions, port: int, **destination: object) -> dict:
    settings = make_settings(tmp_path, db_url, port)
    dest = dataclasses.replace(settings.destinations[0], **destination)  # type: ignore[arg-type]
    settings = dataclasses.replace(settings, destinations=[dest])
    models = load_registry(settings.models.path)
    spool = Spool(settings.storage.path)
    pipeline = Pipeline(settings, sessions, spool, models, ModelCache(torch.device("cpu")))
    worker = Worker(sessions, pipeline, settings.worker, threading.Event())
    return {"settings": settings, "models": models, "spool": spool, "worker": worker,
            "sessions": sessions}  # fmt: skip


def the_delivery(sessions) -> Delivery:
    with sessions() as s:
        row = s.scalars(select(Delivery)).one()
        s.expunge(row)
        return row


# --- bad destinations -------------------------------------------------------------


def test_association_aborted_mid_send_is_retried(tmp_path: Path, db_url: str, sessions) -> None:
    for scp in staged():
        scp.abort_after = 1
        node = make_node(tmp_path, db_url, sessions, scp.port)
        receive_phantom(node)
        assert node["worker"].run_once()
        job = job_row(sessions)
        assert job.state == JobState.QUEUED  # retried later, the model not re-run
        delivery = the_delivery(sessions)
        assert delivery.state == DeliveryState.PENDING and delivery.attempts == 1
        assert "no reply to C-STORE (connection lost)" in delivery.last_error
        assert delivery.last_error in job.last_error
        assert len(scp.received) == 1


def test_warning_status_counts_as_stored_and_is_recorded(
    tmp_path: Path, db_url: str, sessions
) -> None:
    for scp in staged():
        scp.status = 0xB000  # coercion of data elements: stored, but changed
        node = make_node(tmp_path, db_url, sessions, scp.port)
        receive_phantom(node)
        assert node["worker"].run_once()
        assert job_row(sessions).state == JobState.DONE
        delivery = the_delivery(sessions)
        assert delivery.state == DeliveryState.SENT and delivery.last_error is None
        assert delivery.warning == "2 object(s) stored with warning 0xB000"
        assert len(scp.received) == 2


# --- TLS to the destination -------------------------------------------------------


def test_tls_delivery_with_a_client_certificate(
    tmp_path: Path, db_url: str, sessions, pki: Path
) -> None:
    for scp in staged(server_context(pki, client_ca=True)):
        node = make_node(
            tmp_path, db_url, sessions, scp.port, tls_ca=pki / "ca.crt",
            tls_certificate=pki / "client.crt", tls_private_key=pki / "client.key",
        )  # fmt: skip
        receive_phantom(node)
        assert node["worker"].run_once()
        assert job_row(sessions).state == JobState.DONE
        assert the_delivery(sessions).state == DeliveryState.SENT
        assert len(scp.received) == 2


def test_tls_with_the_wrong_ca_is_a_clear_retried_delivery_error(
    tmp_path: Path, db_url: str, sessions, pki: Path
) -> None:
    for scp in staged(server_context(pki)):
        node = make_node(tmp_path, db_url, sessions, scp.port, tls_ca=pki / "other-ca.crt")
        receive_phantom(node)
        assert node["worker"].run_once()
        job = job_row(sessions)
        assert job.state == JobState.QUEUED
        delivery = the_delivery(sessions)
        assert delivery.state == DeliveryState.PENDING
        assert "destination counter: TLS handshake failed: certificate verify failed" in (
            delivery.last_error
        )
        assert "\n" not in delivery.last_error
        assert scp.received == []


def test_tls_hostname_is_checked(pki: Path, tmp_path: Path) -> None:
    for scp in staged(server_context(pki)):
        settings = make_settings(tmp_path, "sqlite://", scp.port)
        good = dataclasses.replace(settings.destinations[0], tls_ca=pki / "ca.crt")
        assert scu.echo(good, "DICOMNODE") == 0
        wrong = dataclasses.replace(good, tls_server_name="pacs.example.org")
        with pytest.raises(TransientJobError, match="TLS handshake failed: certificate verify"):
            scu.echo(wrong, "DICOMNODE")


def test_plain_sender_to_a_tls_port_and_back(pki: Path, tmp_path: Path) -> None:
    settings: Settings = make_settings(tmp_path, "sqlite://", 1)
    for scp in staged(server_context(pki)):
        plain = dataclasses.replace(settings.destinations[0], port=scp.port)
        with pytest.raises(
            TransientJobError, match=r"aborted by the peer \(a TLS port\? set tls_ca"
        ):
            scu.echo(plain, "DICOMNODE")
    for scp in staged():
        tls = dataclasses.replace(settings.destinations[0], port=scp.port, tls_ca=pki / "ca.crt")
        with pytest.raises(TransientJobError, match="TLS handshake failed"):
            scu.echo(tls, "DICOMNODE")
