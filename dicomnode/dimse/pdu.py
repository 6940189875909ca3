"""The few bytes of DICOM's upper layer protocol (PS3.8 9.3) read or written by hand.

The listener's admission reads PDU headers before pynetdicom sees a connection, and
the reactor refuses oversized PDUs with an A-ABORT; both use these.
"""

from __future__ import annotations

import struct

PDU_HEADER = 6  # PDU type, reserved, 4-byte length


def encode_abort(source: int = 0x02, reason: int = 0x00) -> bytes:
    """Return an A-ABORT PDU (PS3.8 9.3.8).

    Parameters
    ----------
    source : int
        0x00 service user, 0x02 service provider.
    reason : int
        For a provider abort: 0x02 unexpected PDU, 0x06 invalid PDU parameter value.

    Returns
    -------
    bytes
        The 10-byte PDU.
    """
    return struct.pack(">BBIBBBB", 0x07, 0, 4, 0, 0, source, reason)
