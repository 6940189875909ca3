"""One-line error messages."""

from __future__ import annotations

import errno

import pytest

from dicomnode.errors import first_line, os_reason


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (ValueError("disk full\nat /spool"), "disk full"),
        (RuntimeError(), ""),  # an exception without text: no IndexError
        ("\n  \n  second line  \n", "second line"),
        ("", ""),
    ],
)
def test_first_line(message: object, expected: str) -> None:
    assert first_line(message) == expected


def test_os_reason_names_the_errno_and_never_the_path() -> None:
    error = FileNotFoundError(errno.ENOENT, "No such file", "/spool/patient-name.dcm")
    assert os_reason(error) == "ENOENT"
    assert os_reason(OSError("no errno")) == "OSError"
