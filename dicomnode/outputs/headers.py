"""Source header values our outputs copy, made safe to copy.

highdicom copies the patient and study modules from the source images into every
object it builds. A non-conformant source value would otherwise either fail the
job (highdicom cannot convert a birth date of ``1970013``, and its message quotes
the value) or produce an object that does not validate (an accession number longer
than SH allows is copied as it is). Real scanners and archives send both, so the
values are repaired here, in the headers of the job's volume only; the received
files stay untouched.
"""

from __future__ import annotations

from collections.abc import Iterable

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import DA, DT, TM

_CONVERTERS = {
    "PatientBirthDate": DA,
    "StudyDate": DA,
    "SeriesDate": DA,
    "ContentDate": DA,
    "AcquisitionDate": DA,
    "PatientBirthTime": TM,
    "StudyTime": TM,
    "SeriesTime": TM,
    "ContentTime": TM,
    "AcquisitionTime": TM,
    "AcquisitionDateTime": DT,
}

# PS3.5 table 6.2-1: maximum characters per value of the text VRs highdicom copies.
_MAX_LENGTH = {"AE": 16, "CS": 16, "SH": 16, "LO": 64, "PN": 64, "ST": 1024}


def _blank_malformed_dates(ds: Dataset) -> int:
    count = 0
    for keyword, convert in _CONVERTERS.items():
        value = ds.get(keyword)
        if value in (None, ""):
            continue
        try:
            convert(str(value))
        except (ValueError, TypeError):
            setattr(ds, keyword, "")  # Type 2 wherever we copy it: empty is valid
            count += 1
    return count


def _clip_long_text(ds: Dataset) -> int:
    count = 0
    for element in ds:  # top level only: that is what highdicom copies
        limit = _MAX_LENGTH.get(element.VR)
        if limit is None or element.value in (None, ""):
            continue
        values = list(element.value) if isinstance(element.value, MultiValue) else [element.value]
        if all(len(str(v)) <= limit for v in values):
            continue
        clipped = [str(v)[:limit] for v in values]
        element.value = clipped if len(clipped) > 1 else clipped[0]
        count += 1
    return count


def repair_source_headers(datasets: Iterable[Dataset]) -> int:
    """Blank unparseable dates and times and clip over-long text, in place.

    Parameters
    ----------
    datasets : Iterable[Dataset]
        Source headers (without pixel data), changed in place.

    Returns
    -------
    int
        How many values were changed (for the log; the values themselves are not kept).
    """
    return sum(_blank_malformed_dates(ds) + _clip_long_text(ds) for ds in datasets)
