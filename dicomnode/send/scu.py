"""The sending side: C-STORE and C-ECHO to configured destinations, over TLS if asked.

A destination with ``tls_ca`` is reached over DICOM TLS (TLS 1.2 or newer): its
certificate must be signed by that CA and carry ``tls_server_name`` (or its host);
``tls_certificate`` and ``tls_private_key`` are our client certificate, for a PACS
that asks for one. A failed handshake is reported as one line with OpenSSL's reason
("TLS handshake failed: certificate verify failed"), which pynetdicom only logs.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pydicom
from pynetdicom import AE, evt
from pynetdicom.association import Association

from dicomnode.config import Destination
from dicomnode.dimse import tune_connection
from dicomnode.errors import PermanentJobError, TransientJobError

log = logging.getLogger(__name__)

# What pynetdicom logs at ERROR when an outgoing connection fails, on its transport
# logger, from the association's own thread. We already say it, with the reason, in
# our own line (the worker's "job retrying ... error=destination NAME: cannot connect",
# `echo`'s result), so a PACS that is down would otherwise add two ERRORs per retry.
_CONNECT_FAILURES = (
    "Association request failed: unable to connect to remote",
    "TCP Initialisation Error",
)


class _QuietConnectFailures(logging.Filter):
    """Drop pynetdicom's ERROR lines about a connection we could not open.

    Only those two messages, which only the requesting side logs (the listener never
    connects out); everything else pynetdicom says stays. At DEBUG they are kept.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Return False for a failed outgoing connection's lines, unless debugging.

        Parameters
        ----------
        record : logging.LogRecord
            A record of the ``pynetdicom.transport`` logger.

        Returns
        -------
        bool
            Whether to log it.
        """
        if record.levelno < logging.ERROR or log.isEnabledFor(logging.DEBUG):
            return True
        return not str(record.msg).startswith(_CONNECT_FAILURES)


_TRANSPORT_LOG = logging.getLogger("pynetdicom.transport")
if not any(isinstance(f, _QuietConnectFailures) for f in _TRANSPORT_LOG.filters):
    _TRANSPORT_LOG.addFilter(_QuietConnectFailures())

VERIFICATION = "1.2.840.10008.1.1"
# Warnings: the object was stored, possibly with changes. PS3.4 B.2.3 names 0xB000,
# 0xB006 and 0xB007 for storage and PS3.7 C.4 the general ones (0x0001, 0x0107,
# 0x0116); PACS in the field also answer other 0xBxxx codes with the same meaning.
_GENERAL_WARNINGS = {0x0001, 0x0107, 0x0116}


def is_warning(code: int) -> bool:
    """Return whether a C-STORE status is a warning: stored, perhaps with changes.

    Parameters
    ----------
    code : int
        The status.

    Returns
    -------
    bool
        True for PS3.7 C.4 general warnings and the 0xBxxx range.
    """
    return code in _GENERAL_WARNINGS or 0xB000 <= code <= 0xBFFF


class _RecordingSSLSocket(ssl.SSLSocket):
    """An SSL socket that keeps its handshake error on its context.

    pynetdicom catches the error of ``connect`` (where the handshake happens), logs
    it and reports only "association failed"; this keeps the reason for our message.
    """

    def connect(self, address: Any) -> None:
        try:
            super().connect(address)
        except ssl.SSLError as exc:
            self.context.handshake_error = exc  # type: ignore[attr-defined]
            raise
        except OSError as exc:  # reset or closed during the handshake
            self.context.handshake_error = exc  # type: ignore[attr-defined]
            raise


def client_ssl_context(destination: Destination) -> ssl.SSLContext | None:
    """Build the TLS context for sending to ``destination``, or None without TLS.

    Parameters
    ----------
    destination : Destination
        ``tls_ca`` and optionally ``tls_certificate`` and ``tls_private_key``.

    Returns
    -------
    ssl.SSLContext or None
        TLS 1.2 or newer, verifying the peer's certificate and host name.

    Raises
    ------
    PermanentJobError
        If a file cannot be loaded (not PEM, key not matching the certificate),
        naming the setting: sending again will not help until the file is fixed.
    """
    if destination.tls_ca is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.sslsocket_class = _RecordingSSLSocket
    loads: list[tuple[str, Path, Any]] = [
        (
            "tls_ca",
            destination.tls_ca,
            lambda: context.load_verify_locations(str(destination.tls_ca)),
        )
    ]
    if destination.tls_certificate is not None and destination.tls_private_key is not None:
        cert, key = str(destination.tls_certificate), str(destination.tls_private_key)
        loads.append(
            (
                "tls_certificate",
                destination.tls_certificate,
                lambda: context.load_cert_chain(cert, key),
            )
        )
    for key_name, path, load in loads:
        try:
            load()
        except (ssl.SSLError, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc.strerror or type(exc).__name__
            raise PermanentJobError(
                f"destination {destination.name}: cannot load {key_name} {path.name}: {reason}"
            ) from None
    return context


def _handshake_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).lower().replace("_", " ")
    return type(exc).__name__


def associate(
    ae: AE,
    destination: Destination,
    handlers: Sequence[tuple[Any, Any]] = (),
    ext_neg: Sequence[Any] | None = None,
) -> Association:
    """Open an association to ``destination`` (with TLS when it has ``tls_ca``).

    Parameters
    ----------
    ae : AE
        Our AE, with the requested contexts.
    destination : Destination
        Where to, its timeout and TLS settings.
    handlers : Sequence
        Extra ``(event, handler)`` pairs bound to the association.
    ext_neg : Sequence, optional
        Extended negotiation items, e.g. the SCP/SCU role selections of a C-GET.

    Returns
    -------
    Association
        Established.

    Raises
    ------
    TransientJobError
        If it cannot be reached, the TLS handshake fails or the association is
        rejected or aborted; the message is one line naming the destination.
    PermanentJobError
        If the TLS files cannot be loaded.
    """
    ae.acse_timeout = destination.timeout_seconds
    ae.dimse_timeout = destination.timeout_seconds
    ae.network_timeout = destination.timeout_seconds
    ae.connection_timeout = destination.timeout_seconds
    context = client_ssl_context(destination)
    tls_args = None
    if context is not None:
        tls_args = (context, destination.tls_server_name or destination.host)
    connected: list[bool] = []  # whether TCP (and TLS) got through: refused vs aborted
    try:
        assoc = ae.associate(
            destination.host,
            destination.port,
            ae_title=destination.ae_title,
            evt_handlers=[
                (evt.EVT_CONN_OPEN, tune_connection),
                (evt.EVT_CONN_OPEN, lambda event: connected.append(True)),
                *handlers,
            ],
            tls_args=tls_args,
            ext_neg=list(ext_neg) if ext_neg else None,
        )
    except OSError as exc:  # a host name DNS does not know (socket.gaierror), ...
        # Retried like a PACS that is down: DNS and routes get fixed without us.
        raise TransientJobError(
            f"destination {destination.name}: cannot connect to {destination.host}:"
            f"{destination.port} ({exc.strerror or type(exc).__name__})"
        ) from None
    if assoc.is_established:
        return assoc
    name = destination.name
    if assoc.is_rejected:
        raise TransientJobError(f"destination {name}: association rejected")
    handshake_error = getattr(context, "handshake_error", None)
    if handshake_error is not None:
        # A certificate problem is retried too: it is usually fixed on the PACS side
        # (a renewed certificate), and the delivery must not need an admin then.
        raise TransientJobError(
            f"destination {name}: TLS handshake failed: {_handshake_reason(handshake_error)}"
        )
    if connected:
        hint = "" if context is not None else " (a TLS port? set tls_ca)"
        raise TransientJobError(f"destination {name}: association aborted by the peer{hint}")
    raise TransientJobError(
        f"destination {name}: cannot connect to {destination.host}:{destination.port}"
    )


def echo(destination: Destination, calling_ae: str) -> int:
    """Send a C-ECHO to ``destination``.

    Parameters
    ----------
    destination : Destination
        Where to.
    calling_ae : str
        Our AE title.

    Returns
    -------
    int
        The C-ECHO status (0 is success).

    Raises
    ------
    TransientJobError
        If no association could be made, or the peer did not answer.
    """
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(VERIFICATION)
    assoc = associate(ae, destination)
    try:
        reply = assoc.send_c_echo()
    finally:
        assoc.release()
    if "Status" not in reply:
        raise TransientJobError(f"destination {destination.name}: no reply to C-ECHO")
    return int(reply.Status)


def send_files(destination: Destination, paths: Sequence[Path], calling_ae: str) -> list[int]:
    """Send DICOM files to ``destination`` over one association.

    Parameters
    ----------
    destination : Destination
        Where to.
    paths : Sequence[Path]
        Files to send; each is offered in its own transfer syntax.
    calling_ae : str
        Our AE title.

    Returns
    -------
    list[int]
        The C-STORE status of each file, success or warning.

    Raises
    ------
    PermanentJobError
        If the destination refuses the SOP class or returns a failure status:
        sending again will not help.
    TransientJobError
        If it cannot be reached or the association drops.
    """
    datasets = [pydicom.dcmread(p) for p in paths]
    wanted = {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets}
    ae = AE(ae_title=calling_ae)
    for sop_class, syntax in sorted(wanted):
        ae.add_requested_context(sop_class, [syntax])
    assoc = associate(ae, destination)
    statuses: list[int] = []
    try:
        accepted = {(c.abstract_syntax, c.transfer_syntax[0]) for c in assoc.accepted_contexts}
        refused = sorted(sop_class for sop_class, syntax in wanted - accepted)
        if refused:
            # Checked before sending anything: a partial result set helps nobody.
            raise PermanentJobError(
                f"destination {destination.name}: does not accept SOP class {', '.join(refused)}"
            )
        for ds in datasets:
            reply = assoc.send_c_store(ds)
            if "Status" not in reply:
                raise TransientJobError(
                    f"destination {destination.name}: no reply to C-STORE (connection lost)"
                )
            code = int(reply.Status)
            if code & 0xFF00 == 0xA700:  # Refused: Out of Resources; it may pass
                raise TransientJobError(
                    f"destination {destination.name}: out of resources (0x{code:04X})"
                )
            if code != 0 and not is_warning(code):
                raise PermanentJobError(
                    f"destination {destination.name}: C-STORE failed with status 0x{code:04X}"
                )
            if is_warning(code):
                log.warning(
                    "destination %s stored sop_uid=%s with warning 0x%04X",
                    destination.name,
                    ds.SOPInstanceUID,
                    code,
                )
            statuses.append(code)
    finally:
        if assoc.is_established:
            assoc.release()
    return statuses
