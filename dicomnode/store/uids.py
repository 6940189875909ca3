"""UID checks: a UID becomes a path component only after it passes here."""

from __future__ import annotations

import re

# PS3.5 section 9.1: digits and dots, at most 64 characters, no empty component.
# Components with a leading zero are invalid DICOM, but real scanners send them and
# they are still path-safe, so they are accepted: refusing a study over it helps nobody.
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
MAX_UID_LENGTH = 64


def uid_problem(value: object) -> str | None:
    """Say what is wrong with a UID, or return None when it is safe to use.

    Parameters
    ----------
    value : object
        The candidate UID (usually a ``str``; anything else is a problem).

    Returns
    -------
    str or None
        A short description of the problem (without echoing the value, which may be
        anything a peer sent), or None if the UID is valid.
    """
    if not isinstance(value, str):
        return "is not a string"
    # DICOM pads odd-length UI values with a NUL byte; pydicom usually strips it.
    value = value.rstrip("\x00")
    if not value:
        return "is empty"
    if len(value) > MAX_UID_LENGTH:
        return f"is longer than {MAX_UID_LENGTH} characters"
    if not _UID_RE.match(value):
        return "has characters other than digits and dots, or an empty component"
    return None


def is_safe_uid(value: object) -> bool:
    """Return whether ``value`` is a valid UID that is safe to use as a file name.

    Parameters
    ----------
    value : object
        The candidate.

    Returns
    -------
    bool
        True if valid.
    """
    return uid_problem(value) is None
