from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dicomnode.errors import PermanentJobError
from dicomnode.outputs.validate import validate_file
from tests.factories import ct_series, write_series


@pytest.fixture
def good(tmp_path: Path) -> Path:
    return write_series(ct_series(np.zeros((1, 4, 4), np.float32)), tmp_path)[0]


def test_valid_object_passes(good: Path) -> None:
    assert validate_file(good, "auto") is True
    assert validate_file(good, "dciodvfy") is True


def test_off_runs_nothing(tmp_path: Path) -> None:
    assert validate_file(tmp_path / "does-not-matter.dcm", "off") is False


def test_errors_fail_the_job_with_the_validators_message(good: Path) -> None:
    import pydicom

    ds = pydicom.dcmread(good)
    del ds.Rows
    ds.save_as(good)
    with pytest.raises(PermanentJobError, match=r"failed validation: Error"):
        validate_file(good, "auto")


def test_missing_validator(good: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    assert validate_file(good, "auto") is False
    with pytest.raises(PermanentJobError, match="not installed"):
        validate_file(good, "dciodvfy")


def test_validator_messages_do_not_quote_values(good: Path) -> None:
    import pydicom

    ds = pydicom.dcmread(good)
    ds.AccessionNumber = "SECRET-ACCESSION-0123456789"  # too long for SH
    ds.save_as(good)
    with pytest.raises(PermanentJobError) as info:
        validate_file(good, "dciodvfy")
    message = str(info.value)
    assert "AccessionNumber" in message and "= <...>" in message
    assert "SECRET" not in message
