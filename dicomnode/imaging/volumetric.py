"""Which series can be a volume: localizers, dose reports and the like cannot.

Routes match on header values, and a scout image or a dose report often carries the
same Modality and Body Part as the scan itself. Sending those to a volume model
only produces a failed job (or worse, a result for a two-image "volume"), so the
completion sweep asks here first and queues no model jobs for them.
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.uid import UID

# Modalities that are never images of the patient's anatomy.
_NON_IMAGE_MODALITIES = {"SR", "KO", "PR", "DOC", "SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "REG"}
# Image Type values that mark projection scouts rather than slices.
_SCOUT_TYPES = {"LOCALIZER", "SCOUT", "SCANOGRAM", "TOPOGRAM", "SURVIEW"}
# A single-frame series needs more than one slice to be a volume at all.
MIN_SLICES = 2


def why_not_volumetric(header: Dataset, instance_count: int) -> str | None:
    """Return why a series cannot be a volume, or None if it can.

    Parameters
    ----------
    header : Dataset
        The header of one of the series' instances.
    instance_count : int
        How many instances the series has.

    Returns
    -------
    str or None
        A short reason without PHI ("localizer", "dose report", ...), or None.
    """
    modality = str(header.get("Modality", "") or "").upper()
    sop_class = UID(str(header.get("SOPClassUID", "") or ""))
    if modality in _NON_IMAGE_MODALITIES or not _has_pixels(header):
        if "Dose" in sop_class.name:
            return "dose report"
        return f"no images ({modality or 'unknown modality'})"
    image_type = {str(v).upper() for v in (header.get("ImageType") or [])}
    if image_type & _SCOUT_TYPES:
        return "localizer"
    frames = int(header.get("NumberOfFrames", 1) or 1)
    if frames == 1 and instance_count < MIN_SLICES:
        return f"{instance_count} slice(s)"
    if frames == 1 and sop_class.name.startswith("Secondary Capture"):
        return "secondary capture"  # screen captures and snapshots, not acquisitions
    return None


def _has_pixels(header: Dataset) -> bool:
    # Headers are read without pixel data; image attributes say whether there are any.
    return "Rows" in header and "Columns" in header
