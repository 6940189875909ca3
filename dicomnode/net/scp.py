"""The listener: C-ECHO and C-STORE SCP on top of pynetdicom.

Each association runs on its own pynetdicom threads. Datasets arrive in a file
under the spool's ``tmp/`` (:mod:`dicomnode.net.chunked`), never whole in memory
and never decoded; the store handler makes that file durable and records it (see
:mod:`dicomnode.store.ingest`) and does nothing else. Completion, routing and
inference happen later on other threads, so a busy scanner never waits for a model.

Who may associate: the called AE title must be ours, the calling AE title must be
on ``allowed_calling_aets`` and the peer's address in ``allowed_networks`` (when
those are set). Anything else gets a clean A-ASSOCIATE-RJ and one log line with
the AE titles and address only. With ``tls_certificate`` set the port speaks DICOM
TLS, and with ``tls_client_ca`` set it also demands a client certificate.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any, cast

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.transport import ThreadedAssociationServer

from dicomnode import metrics
from dicomnode.config import ListenerSettings
from dicomnode.errors import ConfigError, DicomnodeError, IngestError
from dicomnode.net import chunked, reactor, status
from dicomnode.net.commitment import STORAGE_COMMITMENT_PUSH, ReportHandler
from dicomnode.net.contexts import ACCEPTED_SOP_CLASSES, ACCEPTED_TRANSFER_SYNTAXES
from dicomnode.net.receipts import Receipts
from dicomnode.store.ingest import Ingestor
from dicomnode.store.uids import is_safe_uid

log = logging.getLogger(__name__)


def _peer(event: evt.Event) -> str:
    info = event.assoc.requestor
    return f"{info.address}:{info.port}"


STOP_GRACE_SECONDS = 10.0


class _Server(ThreadedAssociationServer):
    """pynetdicom's threaded server with a listen backlog for a busy department.

    pynetdicom does the TLS handshake in ``get_request``, on the one thread that
    accepts connections, with no timeout: one peer that connects and stays silent
    would stop the port for everyone. Here the socket is only wrapped there, and the
    handshake happens on the connection's own thread (see ``Listener._on_open``).
    """

    request_queue_size = 64  # socketserver's 5 drops connections when scanners start at once

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        sock = cast(socket.socket, self.socket)
        client, address = sock.accept()
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(
                client, server_side=True, do_handshake_on_connect=False
            )
        return client, address


class _ReusePortServer(_Server):
    """An association server whose port other receiver processes may bind too.

    The kernel then hands each new connection to one of them, so concurrent
    associations are spread over processes (and cores) instead of sharing one GIL.
    """

    def server_bind(self) -> None:
        sock = cast(socket.socket, self.socket)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


# A-ASSOCIATE-RJ (result, source, reason), PS3.8 9.3.4: rejected-permanent by the
# service user, "no reason given" (there is no code for a refused address).
_REJECT_PEER = (0x01, 0x01, 0x01)


def make_ssl_context(settings: ListenerSettings) -> ssl.SSLContext | None:
    """Build the server's TLS context from the settings, or None without TLS.

    Parameters
    ----------
    settings : ListenerSettings
        ``tls_certificate``, ``tls_private_key`` and optionally ``tls_client_ca``.

    Returns
    -------
    ssl.SSLContext or None
        TLS 1.2 or newer; client certificates are required when a client CA is set.

    Raises
    ------
    ConfigError
        If a file is missing or not a valid certificate or key, naming the setting.
    """
    if settings.tls_certificate is None or settings.tls_private_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load(
        "listener.tls_certificate",
        settings.tls_certificate,
        lambda: context.load_cert_chain(
            str(settings.tls_certificate), str(settings.tls_private_key)
        ),
    )
    if settings.tls_client_ca is not None:
        ca = settings.tls_client_ca
        _load("listener.tls_client_ca", ca, lambda: context.load_verify_locations(str(ca)))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _load(key: str, path: Path, load: Any) -> None:
    if not path.is_file():
        raise ConfigError(f"{key}: file not found: {path}")
    try:
        load()
    except (ssl.SSLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or type(exc).__name__
        raise ConfigError(f"{key}: cannot load {path.name}: {reason}") from None


class Listener:
    """The C-STORE/C-ECHO service class provider.

    Parameters
    ----------
    settings : ListenerSettings
        AE title, address, port, access control, TLS.
    ingestor : Ingestor
        Stores each accepted instance.
    reuse_port : bool
        Bind with SO_REUSEPORT, so that several receiver processes share the port.
    """

    def __init__(
        self, settings: ListenerSettings, ingestor: Ingestor, *, reuse_port: bool = False
    ) -> None:
        self.settings = settings
        self.ingestor = ingestor
        self.reuse_port = reuse_port
        self._server: ThreadedAssociationServer | None = None
        self._thread: threading.Thread | None = None
        self._networks = [ipaddress.ip_network(n, strict=False) for n in settings.allowed_networks]
        self._commitment_reports = ReportHandler(ingestor.sessions)
        self._receipts = Receipts(ingestor.sessions)
        self.ae = self._make_ae()

    def _make_ae(self) -> AE:
        ae = AE(ae_title=self.settings.ae_title)
        ae.maximum_pdu_size = self.settings.max_pdu
        ae.maximum_associations = self.settings.max_associations
        # A sender that calls us by the wrong AE title is misconfigured; telling it so
        # at association time beats accepting images meant for another node.
        ae.require_called_aet = True
        ae.require_calling_aet = list(self.settings.allowed_calling_aets)
        # A peer that stops talking must not hold a thread and a file for ever.
        ae.network_timeout = 60
        ae.acse_timeout = ae.dimse_timeout = 60
        for sop_class in ACCEPTED_SOP_CLASSES:
            ae.add_supported_context(sop_class, ACCEPTED_TRANSFER_SYNTAXES)
        ae.add_supported_context("1.2.840.10008.1.1")  # Verification
        # Storage Commitment reports: a PACS we asked to commit (N-ACTION) answers on an
        # association of its own, proposing the SCP role of the SOP class (PS3.4 J.3.3);
        # we accept that role for it, and refuse to be asked for commitments ourselves.
        ae.add_supported_context(STORAGE_COMMITMENT_PUSH, scu_role=False, scp_role=True)
        return ae

    def _handlers(self) -> list[Any]:
        return [
            (evt.EVT_CONN_OPEN, self._on_open),
            (evt.EVT_CONN_CLOSE, self._on_close),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_N_EVENT_REPORT, self._commitment_reports),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
        ]

    def start(self) -> None:
        """Bind the port and start accepting associations in the background.

        Raises
        ------
        DicomnodeError
            If the address cannot be bound (port in use, no permission) or the TLS
            files cannot be loaded.
        """
        ssl_context = make_ssl_context(self.settings)
        reactor.install()
        chunked.install()
        address = (self.settings.host, self.settings.port)
        try:
            server = self.ae.make_server(
                address,
                evt_handlers=self._handlers(),
                ssl_context=ssl_context,
                server_class=_ReusePortServer if self.reuse_port else _Server,
            )
        except OSError as exc:
            raise DicomnodeError(
                f"listener: cannot listen on {self.settings.host}:{self.settings.port}: "
                f"{exc.strerror or exc}"
            ) from None
        self.ae._servers.append(server)  # as start_server does; shutdown() expects it
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="listener", daemon=True)
        self._thread.start()
        log.info(
            "listener started ae_title=%s address=%s:%d tls=%s",
            self.settings.ae_title,
            self.settings.host,
            self.port,
            "off" if ssl_context is None else "on",
        )

    @property
    def port(self) -> int:
        """Return the port the listener is bound to (the configured one until started)."""
        if self._server is None:
            return self.settings.port
        return int(self._server.server_address[1])

    def stop(self) -> None:
        """Stop accepting associations and wait for the running ones to end."""
        if self._server is not None:
            self._server.shutdown()  # no new associations; closes the socket
            self._server = None
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        # Let running associations finish what they are sending, within reason; what
        # is still open then is aborted, and its sender will resend (nothing it was
        # told "stored" is lost either way).
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        while self.ae.active_associations and time.monotonic() < deadline:
            time.sleep(0.1)
        self.ae.shutdown()
        self._receipts.flush()
        log.info("listener stopped")

    def _peer_allowed(self, address: str) -> bool:
        if not self._networks:
            return True
        try:
            ip = ipaddress.ip_address(address.split("%")[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self._networks)

    def _on_open(self, event: evt.Event) -> None:
        # pynetdicom logs and ignores an exception raised here and starts the
        # association anyway, so the access check comes first and cannot be skipped.
        assoc = event.assoc
        try:
            allowed = self._peer_allowed(str(assoc.requestor.address))
        except Exception:
            allowed = False
        if not allowed:
            _reject_at_negotiation(assoc)
        chunked.receive_into(
            assoc.dul,
            self.ingestor.spool.tmp,
            max_bytes=self.ingestor.max_instance_bytes,
            space_ok=self.ingestor.has_space,
        )
        try:
            reactor.tune_connection(event)
        except Exception:  # e.g. out of file descriptors: run at pynetdicom's own pace
            log.warning("connection tuning failed peer=%s", _peer(event), exc_info=True)
        sock = getattr(assoc.dul.socket, "socket", None)
        if isinstance(sock, ssl.SSLSocket):
            _handshake(sock, _peer(event))

    def _on_close(self, event: evt.Event) -> None:
        chunked.discard_partial(event.assoc)
        self._receipts.closed(event.assoc)

    def _on_echo(self, event: evt.Event) -> int:
        return status.SUCCESS

    def _on_accepted(self, event: evt.Event) -> None:
        metrics.association_accepted()
        log.info(
            "association accepted calling_ae=%s peer=%s pid=%d",
            event.assoc.requestor.ae_title,
            _peer(event),
            os.getpid(),  # which receiver process took it (listener.processes)
        )

    def _on_rejected(self, event: evt.Event) -> None:
        assoc = event.assoc
        # What the peer asked for; assoc.acceptor.ae_title is our own title.
        request = assoc.requestor.primitive
        called = (
            str(request.called_ae_title).strip() if request is not None else assoc.acceptor.ae_title
        )
        log.warning(
            "association rejected calling_ae=%s called_ae=%s peer=%s",
            assoc.requestor.ae_title,
            called,
            _peer(event),
        )
        reason = metrics.rejection_reason(assoc)
        metrics.association_rejected(reason)
        self._receipts.rejected(
            assoc.requestor.ae_title, called, str(assoc.requestor.address), reason
        )

    def _on_store(self, event: evt.Event) -> Dataset | int:
        request = cast(C_STORE, event.request)
        sop_uid = str(request.AffectedSOPInstanceUID or "")
        logged_uid = sop_uid if is_safe_uid(sop_uid) else "<invalid>"
        try:
            outcome = self.ingestor.store_file(
                Path(event.dataset_path),
                calling_ae=event.assoc.requestor.ae_title,
                sop_class_uid=str(request.AffectedSOPClassUID or "") or None,
                sop_instance_uid=sop_uid or None,
            )
        except IngestError as exc:
            code = status.status_for(exc)
            log.warning("store refused sop_uid=%s status=0x%04X reason=%s", logged_uid, code, exc)
            self._receipts.refused(
                event.assoc,
                event.assoc.requestor.ae_title,
                str(event.assoc.requestor.address),
                f"0x{code:04X} {exc}",
            )
            return _failure(code, str(exc))
        except Exception:
            log.exception("store failed sop_uid=%s: unexpected error", logged_uid)
            self._receipts.refused(
                event.assoc,
                event.assoc.requestor.ae_title,
                str(event.assoc.requestor.address),
                f"0x{status.PROCESSING_FAILURE:04X} internal error",
            )
            return _failure(status.PROCESSING_FAILURE, "internal error in dicomnode")
        self._receipts.stored(
            event.assoc, event.assoc.requestor.ae_title, str(event.assoc.requestor.address), outcome
        )
        log.debug(
            "stored sop_uid=%s series_uid=%s duplicate=%s replaced=%s",
            outcome.sop_instance_uid,
            outcome.series_uid,
            outcome.duplicate,
            outcome.replaced,
        )
        return status.SUCCESS


TLS_HANDSHAKE_SECONDS = 30.0


def _handshake(sock: ssl.SSLSocket, peer: str) -> None:
    """Do the TLS handshake on the connection's own thread, within a deadline.

    A failed handshake (no client certificate, an untrusted one, plain TCP) closes
    the connection; the association then ends before it begins.
    """
    previous = sock.gettimeout()
    sock.settimeout(TLS_HANDSHAKE_SECONDS)
    try:
        sock.do_handshake()
    except (OSError, ValueError) as exc:  # ssl.SSLError and timeouts are OSErrors
        log.warning("TLS handshake failed peer=%s reason=%s", peer, type(exc).__name__)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        return
    finally:
        with contextlib.suppress(OSError):
            sock.settimeout(previous)


def _reject_at_negotiation(assoc: Any) -> None:
    """Make this association answer its A-ASSOCIATE-RQ with a rejection.

    pynetdicom checks AE titles itself but has no hook for the peer's address, so
    the acceptor's negotiation step is replaced for this one association.
    """
    acse = assoc.acse

    def reject() -> None:
        acse.requestor.ae_title = acse.requestor.primitive.calling_ae_title
        acse.send_reject(*_REJECT_PEER)
        evt.trigger(assoc, evt.EVT_REJECTED, {})
        assoc.kill()

    acse._negotiate_as_acceptor = reject


def _failure(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]  # LO: at most 64 characters
    return ds
