from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dicomnode.errors import PermanentJobError
from dicomnode.outputs import validate_file
from tests.factories import ct_series, write_series


@pytest.fixture
def good(tmp_path: Path) -> Path:
    return write_series(ct_series(np.zeros((1, 4, 4), np.float32)), tmp_path)[0]


@pytest.mark.system
def test_valid_object_passes(good: Path) -> None:
    assert validate_file(good, "auto") is True
    assert validate_file(good, "dciodvfy") is True


def test_off_runs_nothing(tmp_path: Path) -> None:
    assert validate_file(tmp_path / "does-not-matter.dcm", "off") is False


@pytest.mark.system
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


@pytest.mark.system
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


def _with(good: Path, **values: str) -> Path:
    import warnings

    import pydicom

    ds = pydicom.dcmread(good)
    with warnings.catch_warnings():  # pydicom warns about the invalid values we want
        warnings.simplefilter("ignore")
        for keyword, value in values.items():
            setattr(ds, keyword, value)
    ds.save_as(good)
    return good


@pytest.mark.system
@pytest.mark.parametrize(
    ("keyword", "value"),
    [
        ("PatientBirthDate", "1987011"),  # 7 digits: dciodvfy quotes it whole
        ("PatientID", "4" * 65),  # numeric, one digit too long for LO
    ],
)
def test_digit_only_values_are_redacted(good: Path, keyword: str, value: str) -> None:
    _with(good, **{keyword: value})
    with pytest.raises(PermanentJobError) as info:
        validate_file(good, "dciodvfy")
    message = str(info.value)
    assert keyword in message and "= <...>" in message
    assert value not in message
    assert "Length invalid for this VR = <" in message  # a count, not a value: kept


@pytest.mark.system
def test_no_quoted_value_survives_in_any_dciodvfy_message(good: Path) -> None:
    from dicomnode.outputs.validate import dciodvfy_errors, redact

    values = {
        "AcquisitionDateTime": "198701011299",  # a character quoted as '9' (0x39)
        "StudyTime": "1260",
        "PatientName": "O'Brien^Ann>x^^^^^",  # quote and '>' inside the value
        "PatientID": "0123456\x01",
        "PatientBirthDate": "1987011",
        "PatientAge": "45Y",
        "StudyID": "12345678901234567",
        "ReferringPhysicianName": "Smith> Jo\x01",  # '> ' inside the value
        "StudyDescription": "a> - b\x01",  # even '> - ' inside it
    }
    lines = dciodvfy_errors(_with(good, **values))
    quoted = [line for line in lines if any(v in line for v in values.values())]
    assert len(quoted) == len(values)  # dciodvfy quotes every one of them
    redacted = "\n".join(redact(line) for line in lines)
    for value in values.values():
        assert value not in redacted
    for char in ("'9'", "(0x39)", "'6'", "(0x36)", "Brien", "x^^", " Jo", " b>"):
        assert char not in redacted
    for keyword in values:
        assert f"/{keyword}(" in redacted  # which attribute is wrong is still said
