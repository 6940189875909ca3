"""Coded concepts our outputs use, in one place."""

from __future__ import annotations

import highdicom as hd
from pydicom.sr.codedict import codes

from dicomnode.imaging import CodeSpec

MILLILITER = hd.sr.CodedConcept("mL", "UCUM", "milliliter")
MILLIMETER = hd.sr.CodedConcept("mm", "UCUM", "millimeter")
NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")
DIAMETER = codes.SCT.Diameter
SHORT_AXIS = codes.SCT.ShortAxis
IMAGING_MEASUREMENTS = codes.DCM.ImagingMeasurements
FINDING = codes.DCM.Finding
# TID 1500's container for evaluations of the whole report (row 12).
QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
STANDARD_DEVIATION = codes.SCT.StandardDeviation
PERCENT = hd.sr.CodedConcept("%", "UCUM", "Percent")
# No standard code names %LAA-950, so a private scheme (99 prefix, as Part 16 asks)
# carries it; its meaning says exactly what was measured.
LAA_950 = hd.sr.CodedConcept(
    "LAA950", "99DICOMNODE", "Percentage of lung volume below -950 HU (%LAA-950)"
)
LUNG_CODES = {"39607008", "44029006", "3341006"}  # SCT lung, left lung, right lung
PROBABILITY = codes.DCM.Probability
LUNG = codes.SCT.Lung
PRESENT = codes.SCT.Present
ABSENT = codes.SCT.Absent
MORPHOLOGICALLY_ABNORMAL = CodeSpec("SCT", "49755003", "Morphologically Abnormal Structure")
HOUNSFIELD_UNIT = hd.sr.CodedConcept("[hnsf'U]", "UCUM", "Hounsfield unit")
VOLUME = codes.SCT.Volume
MEAN = codes.SCT.Mean
ATTENUATION = codes.DCM.AttenuationCoefficient
CT_CHEST = hd.sr.CodedConcept("24627-2", "LN", "CT Chest")
CT_UNSPECIFIED = hd.sr.CodedConcept("25045-6", "LN", "CT unspecified body region")
MR_UNSPECIFIED = hd.sr.CodedConcept("25056-3", "LN", "MR unspecified body region")
IMAGING_PROCEDURE = hd.sr.CodedConcept("363679005", "SCT", "Imaging procedure")
ARTIFICIAL_INTELLIGENCE = codes.DCM.ArtificialIntelligence
PROCESSING_EQUIPMENT = codes.DCM.ProcessingEquipment


def coded(spec: CodeSpec) -> hd.sr.CodedConcept:
    """Turn a model package's code into a highdicom coded concept.

    Parameters
    ----------
    spec : CodeSpec
        Scheme, value and meaning.

    Returns
    -------
    highdicom.sr.CodedConcept
        The concept.
    """
    return hd.sr.CodedConcept(spec.value, spec.scheme, spec.meaning)
