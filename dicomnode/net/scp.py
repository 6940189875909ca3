"""The listener: C-ECHO and C-STORE SCP on top of pynetdicom.

Each association runs on its own pynetdicom thread. The store handler does the
durable write and the row (see :mod:`dicomnode.store.ingest`) and nothing else;
completion, routing and inference happen later on other threads, so a busy
scanner never waits for a model.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from typing import Any, cast

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.transport import ThreadedAssociationServer

from dicomnode.config import ListenerSettings
from dicomnode.errors import DicomnodeError, IngestError
from dicomnode.net import status
from dicomnode.net.contexts import ACCEPTED_SOP_CLASSES, ACCEPTED_TRANSFER_SYNTAXES
from dicomnode.store.ingest import Ingestor
from dicomnode.store.uids import is_safe_uid

log = logging.getLogger(__name__)


def set_nodelay(event: evt.Event) -> None:
    """Turn off Nagle's algorithm on an association's socket.

    Without it, dcmtk-based peers (Orthanc, storescu) and pynetdicom stall for the
    delayed-ACK timeout (about 40 ms) on every small PDU exchange.

    Parameters
    ----------
    event : pynetdicom.events.Event
        The ``EVT_CONN_OPEN`` event.
    """
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):  # the peer may already be gone
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _peer(event: evt.Event) -> str:
    info = event.assoc.requestor
    return f"{info.address}:{info.port}"


class Listener:
    """The C-STORE/C-ECHO service class provider.

    Parameters
    ----------
    settings : ListenerSettings
        AE title, address, port.
    ingestor : Ingestor
        Stores each accepted instance.
    """

    def __init__(self, settings: ListenerSettings, ingestor: Ingestor) -> None:
        self.settings = settings
        self.ingestor = ingestor
        self._server: ThreadedAssociationServer | None = None
        self._thread: threading.Thread | None = None
        self.ae = self._make_ae()

    def _make_ae(self) -> AE:
        ae = AE(ae_title=self.settings.ae_title)
        ae.maximum_pdu_size = self.settings.max_pdu
        # A sender that calls us by the wrong AE title is misconfigured; telling it so
        # at association time beats accepting images meant for another node.
        ae.require_called_aet = True
        for sop_class in ACCEPTED_SOP_CLASSES:
            ae.add_supported_context(sop_class, ACCEPTED_TRANSFER_SYNTAXES)
        ae.add_supported_context("1.2.840.10008.1.1")  # Verification
        return ae

    def _handlers(self) -> list[Any]:
        return [
            (evt.EVT_CONN_OPEN, set_nodelay),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
        ]

    def start(self) -> None:
        """Bind the port and start accepting associations in the background.

        Raises
        ------
        DicomnodeError
            If the address cannot be bound (port in use, no permission).
        """
        address = (self.settings.host, self.settings.port)
        try:
            self._server = self.ae.start_server(address, block=False, evt_handlers=self._handlers())
        except OSError as exc:
            raise DicomnodeError(
                f"listener: cannot listen on {self.settings.host}:{self.settings.port}: "
                f"{exc.strerror or exc}"
            ) from None
        log.info(
            "listener started ae_title=%s address=%s:%d",
            self.settings.ae_title,
            self.settings.host,
            self.port,
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
            self._server.shutdown()
            self._server = None
        self.ae.shutdown()
        log.info("listener stopped")

    def _on_echo(self, event: evt.Event) -> int:
        return status.SUCCESS

    def _on_accepted(self, event: evt.Event) -> None:
        log.info(
            "association accepted calling_ae=%s peer=%s",
            event.assoc.requestor.ae_title,
            _peer(event),
        )

    def _on_rejected(self, event: evt.Event) -> None:
        log.warning(
            "association rejected calling_ae=%s called_ae=%s peer=%s",
            event.assoc.requestor.ae_title,
            event.assoc.acceptor.ae_title,
            _peer(event),
        )

    def _on_store(self, event: evt.Event) -> Dataset | int:
        request = cast(C_STORE, event.request)
        sop_uid = str(request.AffectedSOPInstanceUID or "")
        logged_uid = sop_uid if is_safe_uid(sop_uid) else "<invalid>"
        try:
            data = event.encoded_dataset(include_meta=True)
            outcome = self.ingestor.store(
                data,
                calling_ae=event.assoc.requestor.ae_title,
                sop_class_uid=str(request.AffectedSOPClassUID or "") or None,
                sop_instance_uid=sop_uid or None,
            )
        except IngestError as exc:
            code = status.status_for(exc)
            log.warning("store refused sop_uid=%s status=0x%04X reason=%s", logged_uid, code, exc)
            return _failure(code, str(exc))
        except Exception:
            log.exception("store failed sop_uid=%s: unexpected error", logged_uid)
            return _failure(status.PROCESSING_FAILURE, "internal error in dicomnode")
        log.debug(
            "stored sop_uid=%s series_uid=%s duplicate=%s replaced=%s",
            outcome.sop_instance_uid,
            outcome.series_uid,
            outcome.duplicate,
            outcome.replaced,
        )
        return status.SUCCESS


def _failure(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]  # LO: at most 64 characters
    return ds
