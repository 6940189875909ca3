"""Which SOP classes and transfer syntaxes the node accepts and sends."""

from __future__ import annotations

from pydicom import uid

# Stored exactly as received; compressed pixel data is decoded only when a series is
# loaded for a model (pylibjpeg's openjpeg and libjpeg plugins, or pydicom's RLE).
ACCEPTED_TRANSFER_SYNTAXES: list[str] = [
    uid.ExplicitVRLittleEndian,
    uid.ImplicitVRLittleEndian,
    uid.DeflatedExplicitVRLittleEndian,
    uid.JPEGBaseline8Bit,
    uid.JPEGExtended12Bit,
    uid.JPEGLosslessSV1,
    uid.JPEGLossless,
    uid.JPEGLSLossless,
    uid.JPEGLSNearLossless,
    uid.JPEG2000Lossless,
    uid.JPEG2000,
    uid.RLELossless,
]

# Image storage a radiology AI node meets, plus SEG and SR (priors, and our own results
# when a PACS routes them back).
ACCEPTED_SOP_CLASSES: list[str] = [
    uid.CTImageStorage,
    uid.EnhancedCTImageStorage,
    uid.LegacyConvertedEnhancedCTImageStorage,
    uid.MRImageStorage,
    uid.EnhancedMRImageStorage,
    uid.EnhancedMRColorImageStorage,
    uid.LegacyConvertedEnhancedMRImageStorage,
    uid.SegmentationStorage,
    uid.Comprehensive3DSRStorage,
    uid.ComprehensiveSRStorage,
    uid.EnhancedSRStorage,
]
