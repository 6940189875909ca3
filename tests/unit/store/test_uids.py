from __future__ import annotations

import pytest

from dicomnode.store import is_safe_uid
from dicomnode.store.uids import uid_problem


@pytest.mark.parametrize(
    "uid", ["1.2.3", "1.2.840.10008.5.1.4.1.1.2", "0", "1.2.3\x00", "1." + "9" * 62]
)
def test_valid_uids(uid: str) -> None:
    assert uid_problem(uid) is None
    assert is_safe_uid(uid)


@pytest.mark.parametrize(
    ("uid", "problem"),
    [
        ("", "is empty"),
        ("../../etc/passwd", "characters other than digits"),
        ("1.2/3", "characters other than digits"),
        ("1.2\\3", "characters other than digits"),
        ("1..2", "empty component"),
        (".1.2", "empty component"),
        ("1.2.", "empty component"),
        ("1.2.3a", "characters other than digits"),
        (" 1.2", "characters other than digits"),
        ("1." + "9" * 63, "longer than 64"),
        (None, "not a string"),
        (12, "not a string"),
    ],
)
def test_unsafe_uids(uid: object, problem: str) -> None:
    found = uid_problem(uid)
    assert found is not None and problem in found
    assert not is_safe_uid(uid)
