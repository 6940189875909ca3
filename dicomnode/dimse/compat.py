"""Which pynetdicom the listener's changes to it were made and tested against.

The listener reaches below pynetdicom's public API in a few places, each for a
reason given where it happens: admission hands pynetdicom an association request
it has already read (:mod:`dicomnode.listener.scp`), the reactor threads wake on events
and refuse oversized PDUs (:mod:`dicomnode.dimse.reactor`), and datasets stream into
the spool (:mod:`dicomnode.listener.chunked`). A pynetdicom laid out differently could
quietly undo what those places guarantee, a hostile peer's limits among them, so
the node refuses to listen with any other version than the tested one and names
the mismatch instead.
"""

from __future__ import annotations

import pynetdicom
import pynetdicom.association
import pynetdicom.dimse_messages
import pynetdicom.dul
import pynetdicom.fsm
from pynetdicom.transport import AssociationServer, AssociationSocket, RequestHandler

from dicomnode.errors import ConfigError

TESTED = "3.0"  # pynetdicom 3.0.x; pyproject.toml pins the same range
REQUIREMENT = "pynetdicom>=3.0,<3.1"


def problems() -> list[str]:
    """Return what differs from the pynetdicom the listener was tested with.

    Returns
    -------
    list of str
        Empty when this pynetdicom is the tested one.
    """
    found = []
    version = str(getattr(pynetdicom, "__version__", "unknown"))
    if version.split(".")[:2] != TESTED.split("."):
        found.append(f"version {version} (tested: {TESTED}.x)")
    expected = {
        "RequestHandler._create_association": hasattr(RequestHandler, "_create_association"),
        "AssociationServer.finish_request": hasattr(AssociationServer, "finish_request"),
        "AssociationSocket.recv": hasattr(AssociationSocket, "recv"),
        "DULServiceProvider._read_pdu_data": hasattr(
            pynetdicom.dul.DULServiceProvider, "_read_pdu_data"
        ),
        "fsm.AE_6": hasattr(pynetdicom.fsm, "AE_6"),
        "dimse_messages.NamedTemporaryFile": hasattr(
            pynetdicom.dimse_messages, "NamedTemporaryFile"
        ),
        "association.time": hasattr(pynetdicom.association, "time"),
    }
    found += [f"no {name}" for name, present in expected.items() if not present]
    return found


def check() -> None:
    """Refuse to go on with a pynetdicom other than the tested one.

    Raises
    ------
    ConfigError
        Naming the installed version (or what is missing from it) and the
        requirement to install.
    """
    found = problems()
    if found:
        raise ConfigError(
            f"pynetdicom is not the version dicomnode was tested with: {'; '.join(found)}; "
            f"install '{REQUIREMENT}'"
        )
