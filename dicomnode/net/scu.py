"""The sending side: C-STORE and C-ECHO to configured destinations."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import pydicom
from pynetdicom import AE, evt
from pynetdicom.association import Association

from dicomnode.config import Destination
from dicomnode.errors import PermanentJobError, TransientJobError
from dicomnode.net.reactor import tune_connection

log = logging.getLogger(__name__)

VERIFICATION = "1.2.840.10008.1.1"
# PS3.4 B.2.3 warnings: the object was stored, possibly with changes.
_WARNINGS = {0xB000, 0xB006, 0xB007}


def _associate(ae: AE, destination: Destination) -> Association:
    ae.acse_timeout = destination.timeout_seconds
    ae.dimse_timeout = destination.timeout_seconds
    ae.network_timeout = destination.timeout_seconds
    ae.connection_timeout = destination.timeout_seconds
    assoc = ae.associate(
        destination.host,
        destination.port,
        ae_title=destination.ae_title,
        evt_handlers=[(evt.EVT_CONN_OPEN, tune_connection)],
    )
    if assoc.is_established:
        return assoc
    if assoc.is_rejected:
        raise TransientJobError(f"destination {destination.name}: association rejected")
    raise TransientJobError(
        f"destination {destination.name}: cannot connect to {destination.host}:{destination.port}"
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
    assoc = _associate(ae, destination)
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
    assoc = _associate(ae, destination)
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
            if code != 0 and code not in _WARNINGS:
                raise PermanentJobError(
                    f"destination {destination.name}: C-STORE failed with status 0x{code:04X}"
                )
            if code in _WARNINGS:
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
