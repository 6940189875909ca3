"""DICOM network pieces that both the listener and the sender use.

Status codes (:mod:`~dicomnode.dimse.statuses`), presentation contexts, peer
descriptions, the audit trail of associations, PDU bytes, the reactor that wakes
pynetdicom's threads on events, and :mod:`~dicomnode.dimse.compat`, the one module
that touches pynetdicom's internals.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dicomnode.exports import lazy_exports

if TYPE_CHECKING:
    from dicomnode.dimse.audit_trail import Receipts
    from dicomnode.dimse.contexts import ACCEPTED_SOP_CLASSES, ACCEPTED_TRANSFER_SYNTAXES
    from dicomnode.dimse.pdu import PDU_HEADER, encode_abort
    from dicomnode.dimse.peers import IPAddress, ip_address
    from dicomnode.dimse.reactor import tune_connection

# Each public name and the module it lives in. The modules load when a name is first
# used, so importing one of them does not import its siblings (the CLI's start-up).
_HOMES = {
    "ACCEPTED_SOP_CLASSES": "dicomnode.dimse.contexts",
    "ACCEPTED_TRANSFER_SYNTAXES": "dicomnode.dimse.contexts",
    "IPAddress": "dicomnode.dimse.peers",
    "PDU_HEADER": "dicomnode.dimse.pdu",
    "Receipts": "dicomnode.dimse.audit_trail",
    "encode_abort": "dicomnode.dimse.pdu",
    "ip_address": "dicomnode.dimse.peers",
    "tune_connection": "dicomnode.dimse.reactor",
}

__all__ = [
    "ACCEPTED_SOP_CLASSES",
    "ACCEPTED_TRANSFER_SYNTAXES",
    "PDU_HEADER",
    "IPAddress",
    "Receipts",
    "encode_abort",
    "ip_address",
    "tune_connection",
]
__getattr__, __dir__ = lazy_exports(__name__, _HOMES)
