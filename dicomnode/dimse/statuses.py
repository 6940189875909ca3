"""DIMSE status codes we return, in one table (PS3.4 Annex B.2.3, PS3.7 Annex C).

Each ingest error class maps to one specific code, so a PACS administrator can
tell from the sender's log alone why an instance was refused.
"""

from __future__ import annotations

from dicomnode.errors import (
    IngestError,
    InstanceTooLarge,
    InvalidUID,
    MissingAttribute,
    OutOfResources,
    RecordRefused,
    SOPClassMismatch,
    UIDMismatch,
    UnreadableInstance,
)

SUCCESS = 0x0000
# PS3.7 C.4.2: generic failure when something unexpected went wrong on our side.
PROCESSING_FAILURE = 0x0110
# PS3.7 C.4.3 N-EVENT-REPORT failures, for Storage Commitment reports we cannot use:
# an event type other than 1 or 2, a report without its Transaction UID, and one
# whose Transaction UID we never sent (or have given up waiting for).
NO_SUCH_EVENT_TYPE = 0x0113
MISSING_ATTRIBUTE = 0x0120
INVALID_ARGUMENT_VALUE = 0x0115
# PS3.4 B.2.3 Refused: Out of Resources (0xA7xx). The sender may retry later.
OUT_OF_RESOURCES = 0xA700
# Also 0xA7xx: refused because the instance exceeds storage.max_instance_mb.
OUT_OF_RESOURCES_TOO_LARGE = 0xA701
# PS3.4 B.2.3 Error: Data Set does not match SOP Class (0xA9xx).
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
# PS3.4 B.2.3 Error: Cannot understand (0xCxxx); the low bits say what.
CANNOT_UNDERSTAND_UNREADABLE = 0xC210
CANNOT_UNDERSTAND_MISSING_UID = 0xC211
CANNOT_UNDERSTAND_INVALID_UID = 0xC212
CANNOT_UNDERSTAND_UID_MISMATCH = 0xC213

_BY_ERROR: dict[type[IngestError], int] = {
    InstanceTooLarge: OUT_OF_RESOURCES_TOO_LARGE,
    OutOfResources: OUT_OF_RESOURCES,
    # The database refuses the row itself: a failure, and not one worth a retry.
    RecordRefused: PROCESSING_FAILURE,
    SOPClassMismatch: DATASET_DOES_NOT_MATCH_SOP_CLASS,
    UnreadableInstance: CANNOT_UNDERSTAND_UNREADABLE,
    MissingAttribute: CANNOT_UNDERSTAND_MISSING_UID,
    InvalidUID: CANNOT_UNDERSTAND_INVALID_UID,
    UIDMismatch: CANNOT_UNDERSTAND_UID_MISMATCH,
}


def status_for(error: IngestError) -> int:
    """Return the C-STORE status for an ingest error.

    Parameters
    ----------
    error : IngestError
        The refusal.

    Returns
    -------
    int
        Its status code; :data:`PROCESSING_FAILURE` for an unmapped class.
    """
    for cls in type(error).__mro__:
        if cls in _BY_ERROR:
            return _BY_ERROR[cls]
    return PROCESSING_FAILURE
