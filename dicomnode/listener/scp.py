"""The listener: C-ECHO and C-STORE SCP on top of pynetdicom.

Each association runs on its own pynetdicom threads. Datasets arrive in a file
under the spool's ``tmp/`` (:mod:`dicomnode.listener.chunked`), never whole in memory
and never decoded; the store handler makes that file durable and records it (see
:mod:`dicomnode.store.ingest`) and does nothing else. Completion, routing and
inference happen later on other threads, so a busy scanner never waits for a model.

Who may associate: the called AE title must be ours, the calling AE title must be
on ``allowed_calling_aets`` and the peer's address in ``allowed_networks`` (when
those are set), and there must be a free slot. That is decided before any thread
exists for the connection (:mod:`dicomnode.listener.admission`); anything else gets a
clean A-ASSOCIATE-RJ, an audit entry and a log line with the AE titles and address
only, at most one per address per minute. With ``tls_certificate`` set the port
speaks DICOM TLS, and with ``tls_client_ca`` set it also demands a client
certificate.
"""

from __future__ import annotations

import collections
import contextlib
import ipaddress
import logging
import os
import queue
import socket
import ssl
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.transport import AssociationServer, RequestHandler

from dicomnode import metrics
from dicomnode.config import Destination, ListenerSettings
from dicomnode.dimse import (
    ACCEPTED_SOP_CLASSES,
    ACCEPTED_TRANSFER_SYNTAXES,
    Receipts,
    compat,
    ip_address,
    reactor,
    statuses,
)
from dicomnode.dimse.responses import encode_store_response
from dicomnode.errors import ConfigError, DicomnodeError, IngestError
from dicomnode.listener import admission, chunked
from dicomnode.logs import shown
from dicomnode.send import STORAGE_COMMITMENT_PUSH, ReportHandler
from dicomnode.store import Ingestor, is_safe_uid

log = logging.getLogger(__name__)


def _peer(event: evt.Event) -> str:
    info = event.assoc.requestor
    return f"{info.address}:{info.port}"


STOP_GRACE_SECONDS = 10.0


class _Handler(RequestHandler):
    """Start an association whose A-ASSOCIATE-RQ the gate has already read.

    pynetdicom's handler would wait for the request on the association's own
    threads; here it has arrived and been decoded (see :mod:`dicomnode.listener.admission`),
    and :func:`dicomnode.dimse.compat.start_admitted` hands it to the state machine.
    """

    server: _Server

    def handle(self) -> None:
        """Start the association with the request the gate read for this connection."""
        request = self.server.requests.pop(self.request)
        compat.start_admitted(self, request.pdu)


class _Server(AssociationServer):
    """pynetdicom's association server, with admission in front of it.

    The listening socket is served by a :class:`~dicomnode.listener.admission.Gate` on the
    server's one thread instead of socketserver's accept loop: a connection becomes
    a pynetdicom association, with its threads and its slot, only once its whole
    A-ASSOCIATE-RQ has arrived and the listener has admitted it.
    """

    request_queue_size = 128  # socketserver's 5 drops connections when scanners start at once

    def __init__(
        self,
        ae: AE,
        address: tuple[str, int],
        ae_title: str,
        contexts: list[Any],
        ssl_context: ssl.SSLContext | None = None,
        *,
        evt_handlers: list[Any],
        listener: Listener,
    ) -> None:
        super().__init__(
            ae,
            address,
            ae_title,
            contexts,
            ssl_context,
            evt_handlers=evt_handlers,
            request_handler=_Handler,
        )
        # Admitted connections whose association is being set up, by socket, and how
        # many per peer address: they hold a slot before their thread shows up in
        # ae.active_associations.
        self.requests: dict[socket.socket, admission.Request] = {}
        self.starting: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self.gate = admission.Gate(
            cast(socket.socket, self.socket),
            listener.limits,
            admit=listener.admit,
            refused=listener.refused,
            ssl_context=self.ssl_context,
            address_allowed=listener.peer_allowed,
        )

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Serve connections through the gate until :meth:`shutdown`."""
        self.gate.run()

    def start_association(self, request: admission.Request) -> None:
        """Hand an admitted connection to pynetdicom, on a short thread of its own.

        Setting an association up (pynetdicom copies every presentation context,
        binds the handlers, starts two threads) takes several milliseconds; the gate
        reads every other waiting connection meanwhile.

        Parameters
        ----------
        request : admission.Request
            The connection and its decoded A-ASSOCIATE-RQ.
        """
        with self._lock:
            self.requests[request.sock] = request
            self.starting[request.host] += 1
        threading.Thread(
            target=self._start, args=(request,), name="association-start", daemon=True
        ).start()

    def _start(self, request: admission.Request) -> None:
        try:
            self.finish_request(request.sock, request.address)
        except Exception:
            log.exception("starting an association failed peer=%s", request.host)
            with contextlib.suppress(OSError):
                request.sock.close()
        finally:
            with self._lock:
                self.requests.pop(request.sock, None)
                self.starting[request.host] -= 1
                if not self.starting[request.host]:
                    del self.starting[request.host]

    def slots_taken(self, host: str) -> tuple[int, int]:
        """Return the associations in all and from ``host``, those starting included.

        Parameters
        ----------
        host : str
            A peer address.

        Returns
        -------
        tuple[int, int]
            In all, and from that address.
        """
        acceptors = [a for a in self.ae.active_associations if a.is_acceptor]
        with self._lock:
            starting, from_host = sum(self.starting.values()), self.starting[host]
        mine = sum(1 for a in acceptors if a.requestor.address == host)
        return len(acceptors) + starting, mine + from_host

    def shutdown(self) -> None:
        """Stop the gate and close the listening socket."""
        self.gate.stop()
        self.server_close()


class _ReusePortServer(_Server):
    """An association server whose port other receiver processes may bind too.

    The kernel then hands each new connection to one of them, so concurrent
    associations are spread over processes (and cores) instead of sharing one GIL.
    """

    def server_bind(self) -> None:
        sock = cast(socket.socket, self.socket)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4.
# A refused address: rejected-permanent by the service user, "no reason given"
# (there is no code for an address).
REJECT_ADDRESS = admission.Rejection(0x01, 0x01, 0x01, "address")
# Slots: rejected-transient by the service provider (presentation), local limit
# exceeded; the sender tries again later.
REJECT_BUSY = admission.Rejection(0x02, 0x03, 0x02, "too_many")
REJECT_BUSY_PEER = admission.Rejection(0x02, 0x03, 0x02, "too_many_from_address")


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
    destinations : Iterable[Destination]
        Where results go: a Storage Commitment report is accepted only from the
        destination it answers (AE title and address); none, and every one is refused.
    """

    def __init__(
        self,
        settings: ListenerSettings,
        ingestor: Ingestor,
        *,
        reuse_port: bool = False,
        destinations: Iterable[Destination] = (),
    ) -> None:
        self.settings = settings
        self.ingestor = ingestor
        self.reuse_port = reuse_port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._networks = [ipaddress.ip_network(n, strict=False) for n in settings.allowed_networks]
        self._receipts = Receipts(ingestor.sessions)
        self._commitment_reports = ReportHandler(
            ingestor.sessions, destinations, receipts=self._receipts
        )
        self.limits = admission.Limits(
            request_timeout=settings.request_timeout_seconds,
            max_pending=settings.max_pending_connections,
            max_pending_per_address=settings.max_pending_per_address,
        )
        # Rejections are answered on the gate's thread, which must never wait for the
        # database: their audit entries are written on a thread of their own.
        self._refusals: _Refusals | None = None
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
        ae.network_timeout = self.settings.network_timeout_seconds
        ae.acse_timeout = ae.dimse_timeout = self.settings.network_timeout_seconds
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
            If the address cannot be bound (port in use, no permission), the TLS
            files cannot be loaded, or pynetdicom is not the tested version.
        """
        compat.check()
        compat.log_events(logging.getLogger("pynetdicom").isEnabledFor(logging.INFO))
        ssl_context = make_ssl_context(self.settings)
        reactor.install()
        chunked.install()
        compat.replace_store_response(encode_store_response)  # speed only; pynetdicom's otherwise
        address = (self.settings.host, self.settings.port)
        try:
            server = self.ae.make_server(
                address,
                evt_handlers=self._handlers(),
                ssl_context=ssl_context,
                server_class=_ReusePortServer if self.reuse_port else _Server,
                listener=self,
            )
        except OSError as exc:
            raise DicomnodeError(
                f"listener: cannot listen on {self.settings.host}:{self.settings.port}: "
                f"{exc.strerror or exc}"
            ) from None
        self._server = cast(_Server, server)
        self._refusals = _Refusals(self._receipts)
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
        if self._refusals is not None:
            self._refusals.close()
            self._refusals = None
        self._receipts.flush()
        log.info("listener stopped")

    def peer_allowed(self, address: str) -> bool:
        """Return whether a peer address is in ``allowed_networks`` (or they are unset).

        Parameters
        ----------
        address : str
            The peer's IP address.

        Returns
        -------
        bool
            True if it may associate.
        """
        if not self._networks:
            return True
        ip = ip_address(address)
        return ip is not None and any(ip in network for network in self._networks)

    def admit(self, request: admission.Request) -> admission.Rejection | None:
        """Decide on a complete association request, and start it if it may.

        Runs on the gate's thread, before any thread or slot exists for the
        connection: who may associate, then whether there is room.

        Parameters
        ----------
        request : admission.Request
            The connection and its request.

        Returns
        -------
        admission.Rejection or None
            Why it may not associate; None once it has been handed to pynetdicom.
        """
        settings = self.settings
        if not self.peer_allowed(request.host):
            return REJECT_ADDRESS
        if request.called_ae != settings.ae_title.strip():
            return admission.CALLED_AE_INVALID
        if settings.allowed_calling_aets and request.calling_ae not in [
            t.strip() for t in settings.allowed_calling_aets
        ]:
            return admission.CALLING_AE_INVALID
        # Only associations count: a connection still sending its request is not one.
        assert self._server is not None
        taken, from_peer = self._server.slots_taken(request.host)
        if taken >= settings.max_associations:
            return REJECT_BUSY
        if from_peer >= (settings.max_associations_per_address or settings.max_associations):
            return REJECT_BUSY_PEER
        # From here on pynetdicom reads the socket, blocking, on the association's
        # DUL thread: with a timeout, a peer that stops mid-PDU is dropped.
        request.sock.setblocking(True)
        request.sock.settimeout(settings.network_timeout_seconds)
        self._server.start_association(request)
        return None

    def refused(self, calling_ae: str, called_ae: str, host: str, reason: str) -> None:
        """Log, count and audit an association the gate rejected.

        Parameters
        ----------
        calling_ae, called_ae : str
            What the peer asked for ("-" where the gate never read a request).
        host : str
            The peer's address.
        reason : str
            The rejection's reason (see :class:`~dicomnode.listener.admission.Rejection`).
        """
        metrics.association_rejected(reason)
        if self._refusals is not None:  # None only while stopping
            self._refusals.submit(calling_ae, called_ae, host, reason)

    def _on_open(self, event: evt.Event) -> None:
        # Admission (address, titles, slots, TLS) is done; this association receives.
        chunked.receive_into(
            event.assoc.dul,
            self.ingestor.spool.tmp,
            max_bytes=self.ingestor.max_instance_bytes,
            space_ok=self.ingestor.has_space,
        )
        try:
            reactor.tune_connection(event)
        except Exception:  # e.g. out of file descriptors: run at pynetdicom's own pace
            log.warning("connection tuning failed peer=%s", _peer(event), exc_info=True)

    def _on_close(self, event: evt.Event) -> None:
        chunked.discard_partial(event.assoc)
        self._receipts.closed(event.assoc)

    def _on_echo(self, event: evt.Event) -> int:
        return statuses.SUCCESS

    def _on_accepted(self, event: evt.Event) -> None:
        metrics.association_accepted()
        log.info(
            "association accepted calling_ae=%s peer=%s pid=%d",
            event.assoc.requestor.ae_title,
            _peer(event),
            os.getpid(),  # which receiver process took it (listener.processes)
        )

    def _on_rejected(self, event: evt.Event) -> None:
        # pynetdicom's own rejections, behind the gate's: a User Identity it refused,
        # an unsupported protocol version. On the association's thread, which may wait.
        assoc = event.assoc
        # What the peer asked for; assoc.acceptor.ae_title is our own title.
        request = assoc.requestor.primitive
        called = (
            str(request.called_ae_title).strip() if request is not None else assoc.acceptor.ae_title
        )
        reason = metrics.rejection_reason(assoc)
        metrics.association_rejected(reason)
        _record_rejection(
            self._receipts, assoc.requestor.ae_title, called, str(assoc.requestor.address), reason
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
            code = statuses.status_for(exc)
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
                f"0x{statuses.PROCESSING_FAILURE:04X} internal error",
            )
            return _failure(statuses.PROCESSING_FAILURE, "internal error in dicomnode")
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
        return statuses.SUCCESS


class _Refusals:
    """Log and audit rejected associations on a thread of their own.

    The gate answers rejections on the one thread that accepts connections; the
    audit entry is a database write, which may wait for SQLite's write lock or a
    PostgreSQL that is slow. A bounded queue in between keeps a flood of rejections
    from ever slowing down admission: past its size they are only counted, and the
    count is logged when the listener stops. While no rejection comes, the thread
    writes the counts of the minutes that have passed (a scan that stopped is in
    the trail a minute later, not when the node stops).
    """

    def __init__(self, receipts: Receipts, size: int = 1024) -> None:
        self._receipts = receipts
        self._queue: queue.Queue[tuple[str, str, str, str] | None] = queue.Queue(size)
        self._dropped = 0
        self._thread = threading.Thread(target=self._run, name="refusals", daemon=True)
        self._thread.start()

    def submit(self, calling_ae: str, called_ae: str, host: str, reason: str) -> None:
        try:
            self._queue.put_nowait((calling_ae, called_ae, host, reason))
        except queue.Full:
            self._dropped += 1

    def close(self, timeout: float = 10.0) -> None:
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout)
        self._thread.join(timeout)
        if self._dropped:
            log.warning(
                "%d rejected associations were not audited: they came faster than the "
                "audit trail took them",
                self._dropped,
            )

    def _run(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=REFUSALS_WRITE_SECONDS)
            except queue.Empty:
                self._receipts.write_due()
                continue
            if item is None:
                return
            _record_rejection(self._receipts, *item)


REFUSALS_WRITE_SECONDS = 10.0  # how often counted refusals are looked at when none come


def _record_rejection(
    receipts: Receipts, calling_ae: str, called_ae: str, host: str, reason: str
) -> None:
    """Audit a rejected association, and log it if it is its address's first this minute."""
    try:
        first = receipts.rejected(calling_ae, called_ae, host, reason)
    except Exception:  # receipts logs its own audit failures; the listener goes on
        log.debug("recording a rejection failed", exc_info=True)
        return
    if first:  # the rest of the minute's are counted in one line by receipts
        log.warning(
            "association rejected calling_ae=%s called_ae=%s peer=%s reason=%s",
            shown(calling_ae),
            shown(called_ae),
            host,
            reason,
        )


def _failure(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]  # LO: at most 64 characters
    return ds
