"""One-line error messages."""

from __future__ import annotations

import pytest

from dicomnode.errors import first_line


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
