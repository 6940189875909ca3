"""Source header values our outputs copy, made safe to copy.

highdicom copies the patient and study modules from the source images into every
object it builds and converts dates and times on the way; one malformed value (a
birth date of ``1970013``) would otherwise fail the whole job, and the error
message would quote the value. Such values are blanked instead: these attributes
are Type 2, so empty is valid.
"""

from __future__ import annotations

from collections.abc import Iterable

from pydicom.dataset import Dataset
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


def blank_malformed_dates(datasets: Iterable[Dataset]) -> int:
    """Empty the date and time values that do not parse.

    Parameters
    ----------
    datasets : Iterable[Dataset]
        Source headers, changed in place.

    Returns
    -------
    int
        How many values were blanked (for the log; the values themselves are not kept).
    """
    count = 0
    for ds in datasets:
        for keyword, convert in _CONVERTERS.items():
            element = ds.get(keyword)
            if element in (None, ""):
                continue
            try:
                convert(str(element))
            except (ValueError, TypeError):
                setattr(ds, keyword, "")
                count += 1
    return count
