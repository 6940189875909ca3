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

# What a radiology AI node is sent when a scanner or PACS auto-routes whole studies:
# every radiology image storage class, plus the non-image objects that travel with
# the images (SR, dose reports, key objects, presentation states, PDFs). Refusing
# those would make many senders report the whole study as failed; they are stored,
# and routing decides what, if anything, runs on them.
ACCEPTED_SOP_CLASSES: list[str] = [
    # CT and MR, classic and enhanced
    uid.CTImageStorage,
    uid.EnhancedCTImageStorage,
    uid.LegacyConvertedEnhancedCTImageStorage,
    uid.MRImageStorage,
    uid.EnhancedMRImageStorage,
    uid.EnhancedMRColorImageStorage,
    uid.LegacyConvertedEnhancedMRImageStorage,
    # Projection radiography, mammography, tomosynthesis
    uid.ComputedRadiographyImageStorage,
    uid.DigitalXRayImageStorageForPresentation,
    uid.DigitalXRayImageStorageForProcessing,
    uid.DigitalMammographyXRayImageStorageForPresentation,
    uid.DigitalMammographyXRayImageStorageForProcessing,
    uid.BreastTomosynthesisImageStorage,
    uid.BreastProjectionXRayImageStorageForPresentation,
    # Angiography and fluoroscopy
    uid.XRayAngiographicImageStorage,
    uid.EnhancedXAImageStorage,
    uid.XRayRadiofluoroscopicImageStorage,
    uid.EnhancedXRFImageStorage,
    uid.XRay3DAngiographicImageStorage,
    uid.XRay3DCraniofacialImageStorage,
    # Ultrasound, nuclear medicine, PET
    uid.UltrasoundImageStorage,
    uid.UltrasoundMultiFrameImageStorage,
    uid.EnhancedUSVolumeStorage,
    uid.NuclearMedicineImageStorage,
    uid.PositronEmissionTomographyImageStorage,
    uid.EnhancedPETImageStorage,
    uid.LegacyConvertedEnhancedPETImageStorage,
    # Secondary capture
    uid.SecondaryCaptureImageStorage,
    uid.MultiFrameSingleBitSecondaryCaptureImageStorage,
    uid.MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    uid.MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    uid.MultiFrameTrueColorSecondaryCaptureImageStorage,
    # Derived objects: priors, and our own results when a PACS routes them back
    uid.SegmentationStorage,
    uid.UID("1.2.840.10008.5.1.4.1.1.66.7"),  # Label Map Segmentation (pydicom lacks a name)
    uid.ParametricMapStorage,
    uid.Comprehensive3DSRStorage,
    uid.ComprehensiveSRStorage,
    uid.EnhancedSRStorage,
    uid.BasicTextSRStorage,
    # Objects that travel with studies
    uid.XRayRadiationDoseSRStorage,
    uid.KeyObjectSelectionDocumentStorage,
    uid.GrayscaleSoftcopyPresentationStateStorage,
    uid.EncapsulatedPDFStorage,
]
