from __future__ import annotations

import pynetdicom
import pytest

from dicomnode.dimse import compat
from dicomnode.errors import ConfigError


def test_the_installed_pynetdicom_is_the_tested_one() -> None:
    assert compat.problems() == []


def test_another_pynetdicom_is_named_and_refused(
    monkeypatch: pytest.MonkeyPatch, make_listener
) -> None:
    monkeypatch.setattr(pynetdicom, "__version__", "3.1.0")
    with pytest.raises(ConfigError, match=r"version 3\.1\.0 \(tested: 3\.0\.x\).*<3\.1"):
        make_listener()


def test_a_missing_internal_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    import pynetdicom.fsm

    monkeypatch.delattr(pynetdicom.fsm, "AE_6")
    assert compat.problems() == ["no fsm.AE_6"]
