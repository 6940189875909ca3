"""Run a detection model: mask model, candidate search, CNN scoring, findings.

A detection package (``task = "detection"``) names the segmentation model whose mask
bounds the search (``detection.lung_model``). Both run from the same warm cache; the
mask model's own faster back-end and agreement check apply as in a segmentation job.
The caller may instead hand over that mask as another job already made it (read back
from its SEG), and the mask model is then not run at all.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np

from dicomnode.errors import ModelPackageError, PermanentJobError
from dicomnode.imaging import DetectionResult, Finding, ModelSpec, Volume
from dicomnode.inference.nodules import (
    blob_diameter_mm,
    detect_candidates,
    extract_patches,
    nodule_extent,
    score_patches,
    suppress,
)
from dicomnode.inference.segment import ModelCache, SegmentationResult, check_input, segment
from dicomnode.inference.transforms import FORWARD_ERRORS, failure_reason

log = logging.getLogger(__name__)


MAX_FINDINGS = 50  # a scan with more is a failed search, not 50 nodules to list
MAX_DIAMETER_MM = 50.0  # the largest nodule segmented; a larger mass is not a nodule

# A network's failure (FORWARD_ERRORS), or patches that do not fit it (ValueError).
SCORING_ERRORS: tuple[type[Exception], ...] = (*FORWARD_ERRORS, ValueError)


def detect(
    spec: ModelSpec,
    mask_spec: ModelSpec,
    volume: Volume,
    cache: ModelCache,
    checkpoint: Callable[[], None] | None = None,
    mask: np.ndarray | None = None,
) -> DetectionResult:
    """Find objects in a volume with a detection package.

    Parameters
    ----------
    spec : ModelSpec
        The detection package.
    mask_spec : ModelSpec
        The segmentation package named by ``spec.detection.lung_model``.
    volume : Volume
        The input series.
    cache : ModelCache
        Warm models.
    checkpoint : callable, optional
        Called between steps; it raises to abandon the work.
    mask : np.ndarray, optional
        ``mask_spec``'s labels on this volume (``(slices, rows, columns)``, 0
        background), as a job of that model made them; None to run ``mask_spec`` here.

    Returns
    -------
    DetectionResult
        The findings and the time spent in each step (no ``mask_*`` steps when
        ``mask`` was given).

    Raises
    ------
    PermanentJobError
        If the series does not fit the models, or a model misbehaves.
    TransientJobError
        If the device runs out of memory.
    ValueError
        If ``mask`` is not of the volume's shape.
    """
    check_input(spec, volume)
    if volume.shape[0] < 3:
        raise PermanentJobError(
            f"model {spec.name}: needs at least 3 slices, the series has {volume.shape[0]}"
        )
    if mask is None:
        lungs = segment(mask_spec, volume, cache, checkpoint=checkpoint)
    elif mask.shape != volume.shape:
        raise ValueError(f"mask of shape {mask.shape} for a volume of shape {volume.shape}")
    else:
        # Already made by the mask model: no time of its own here (the caller, who
        # found and read it, knows what that cost).
        lungs = SegmentationResult(labels=mask)
    timings = {f"mask_{k}": v for k, v in lungs.timings.items()}
    if checkpoint is not None:
        checkpoint()

    settings = spec.detection
    spacing = (volume.slice_spacing, *volume.pixel_spacing)
    started = time.perf_counter()
    candidates = detect_candidates(
        volume.pixels, lungs.labels > 0, spacing, limit=settings.max_candidates
    )
    timings["candidates_s"] = time.perf_counter() - started
    if checkpoint is not None:
        checkpoint()

    started = time.perf_counter()
    patches = extract_patches(
        volume.pixels,
        spacing,
        candidates.centers,
        size_mm=settings.patch_mm,
        pixels=spec.input.matrix[0],
        offsets_mm=settings.slice_offsets_mm,
    )
    try:
        module = cache.get(spec)
    except ModelPackageError as exc:
        raise PermanentJobError(str(exc)) from None
    try:
        probability = score_patches(
            module,
            patches,
            cache.device,
            spec.input.batch_size,
            logits=spec.output.kind == "logits",
        )
    except SCORING_ERRORS as exc:
        raise PermanentJobError(
            f"model {spec.name}: scoring failed: {failure_reason(exc)[:200]}"
        ) from None
    timings["inference_s"] = time.perf_counter() - started

    started = time.perf_counter()
    points = volume.to_patient(candidates.centers)
    findings: list[Finding] = []
    claimed = np.zeros(volume.shape, dtype=bool)
    for i in suppress(points, probability, settings.merge_mm):
        if probability[i] < spec.output.threshold or len(findings) == MAX_FINDINGS:
            break  # suppress() returns the best first
        # The blob's own scale sizes the sphere it is segmented in: twice the diameter
        # the detector saw leaves room for an irregular nodule, while the vessels it
        # touches are cut where they leave that sphere.
        extent = nodule_extent(
            volume.pixels,
            spacing,
            candidates.centers[i],
            lung=lungs.labels > 0,
            max_diameter_mm=min(MAX_DIAMETER_MM, 2 * blob_diameter_mm(candidates.sigma_mm[i])),
        )
        voxels = extent.voxels
        if extent.long_axis_mm < settings.min_diameter_mm or len(voxels) == 0:
            continue
        # A large nodule can hold two candidates further apart than merge_mm: the
        # weaker one is the same object when most of it is already a finding.
        if claimed[tuple(voxels.T)].mean() > 0.5:
            continue
        claimed[tuple(voxels.T)] = True
        findings.append(
            Finding(
                center_index=candidates.centers[i],
                center=points[i],
                diameter_mm=extent.long_axis_mm,
                short_axis_mm=extent.short_axis_mm,
                long_axis_slice=extent.long_axis_slice,
                probability=float(probability[i]),
                voxels=voxels,
            )
        )
    timings["postprocess_s"] = time.perf_counter() - started
    log.debug("detection: %d candidates, %d findings", len(candidates), len(findings))
    return DetectionResult(
        findings=findings,
        candidates=len(candidates),
        best_probability=float(probability.max()) if len(probability) else 0.0,
        timings=timings,
    )
