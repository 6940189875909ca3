"""Replacing earlier results: an IOCM rejection note for what a re-run supersedes.

A re-run of a model on a series (a late image, a new model version, an admin's retry
with new input) writes its results into the *same* result series (series UIDs depend
only on the input series and the model), as new instances (instance UIDs depend on
the input's exact contents and the model version). The earlier instances are then
rejected with a Key Object Selection "Rejected for Quality Reasons" (IHE Imaging
Object Change Management), sent after the new results: a PACS that implements IOCM
hides or deletes them, and every PACS keeps one SEG and one SR series per model and
input series, never a duplicate series. The note travels with the new results, so a
PACS that was down gets both when it is back.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicomnode.outputs.provenance import MANUFACTURER, Provenance
from dicomnode.outputs.seg import contributing_equipment

REJECTED_FOR_QUALITY_REASONS = codes.DCM.RejectedForQualityReasons  # DCM 113001


def build_rejection_note(
    superseded: Sequence[Path],
    provenance: Provenance,
    *,
    series_uid: str,
    sop_uid: str,
    series_number: int,
) -> hd.ko.KeyObjectSelectionDocument:
    """Build the KOS that rejects earlier result instances.

    Parameters
    ----------
    superseded : sequence of Path
        The earlier objects' files (kept in the spool); only their headers are read.
    provenance : Provenance
        Model and software, for the series description and equipment.
    series_uid, sop_uid : str
        UIDs of the note.
    series_number : int
        Its Series Number.

    Returns
    -------
    highdicom.ko.KeyObjectSelectionDocument
        The note, in the study of the rejected objects.
    """
    referenced: list[Dataset] = [pydicom.dcmread(p, stop_before_pixels=True) for p in superseded]
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=provenance.uid("device", MANUFACTURER, provenance.model_name),
            name=MANUFACTURER,
            manufacturer_name=MANUFACTURER,
            model_name=provenance.model_name,
        ),
    )
    content = hd.ko.KeyObjectSelection(
        document_title=REJECTED_FOR_QUALITY_REASONS,
        referenced_objects=referenced,
        observer_device_context=observer,
        description=f"Superseded by a newer result of {provenance.model_name}"[:64],
    )
    note = hd.ko.KeyObjectSelectionDocument(
        evidence=referenced,
        content=content,
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        contributing_equipment=[contributing_equipment(provenance)],
    )
    note.SeriesDescription = provenance.series_description("rejected results")
    return note
