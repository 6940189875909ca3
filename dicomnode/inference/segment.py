"""Run a slice-wise segmentation model over a volume and turn its output into labels.

Pre-processing (intensity transform, in-plane resampling to the network's matrix),
the forward passes in batches under ``torch.inference_mode()``, and the
post-processing named by the model package. Arrays in, arrays out: nothing here
knows about DICOM files or the database.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the usual torch alias

from dicomnode.errors import ModelPackageError, PermanentJobError, TransientJobError
from dicomnode.inference.lungs import split_left_right
from dicomnode.inference.registry import ModelSpec
from dicomnode.inference.volume import Volume
from dicomnode.inference.weights import load_model

log = logging.getLogger(__name__)


@dataclass
class SegmentationResult:
    """Labels on the source grid plus how long each step took."""

    labels: np.ndarray  # (slices, rows, columns) uint8; 0 background, i = segments[i-1]
    timings: dict[str, float] = field(default_factory=dict)


class ModelCache:
    """Loaded models, kept warm between jobs (one copy per model and device).

    Parameters
    ----------
    device : torch.device
        Where models are loaded.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._models: dict[tuple[str, str], torch.nn.Module] = {}
        self._lock = threading.Lock()

    def get(self, spec: ModelSpec) -> torch.nn.Module:
        """Return the loaded model for ``spec``, loading it on first use.

        Parameters
        ----------
        spec : ModelSpec
            The package.

        Returns
        -------
        torch.nn.Module
            The model in eval mode on :attr:`device`.
        """
        key = (spec.name, spec.version)
        with self._lock:
            if key not in self._models:
                started = time.perf_counter()
                self._models[key] = load_model(spec, self.device)
                log.info(
                    "model loaded model=%s version=%s device=%s seconds=%.2f",
                    spec.name,
                    spec.version,
                    self.device,
                    time.perf_counter() - started,
                )
            return self._models[key]


def check_input(spec: ModelSpec, volume: Volume) -> None:
    """Refuse a volume the model was not made for.

    Parameters
    ----------
    spec : ModelSpec
        The model.
    volume : Volume
        The input.

    Raises
    ------
    PermanentJobError
        If the modality does not match the package's input contract.
    """
    if volume.modality not in spec.input.modality:
        raise PermanentJobError(
            f"model {spec.name} takes {', '.join(spec.input.modality)}, "
            f"not {volume.modality or 'an unknown modality'}"
        )


def predict_foreground(
    module: torch.nn.Module,
    spec: ModelSpec,
    pixels: np.ndarray,
    device: torch.device,
    checkpoint: Callable[[], None] | None = None,
) -> np.ndarray:
    """Return the per-voxel foreground probability of a slice-wise model.

    Parameters
    ----------
    module : torch.nn.Module
        The loaded network: ``[N, 1, H, W]`` in, ``[N, 1, H, W]`` out.
    spec : ModelSpec
        Its package (intensity transform, matrix, batch size, output kind).
    pixels : np.ndarray
        ``(slices, rows, columns)`` rescaled values (HU for CT).
    device : torch.device
        Where to run.
    checkpoint : callable, optional
        Called between batches; it raises to abandon the work (worker shutdown).

    Returns
    -------
    np.ndarray
        ``(slices, rows, columns)`` float32 probabilities on the input grid.

    Raises
    ------
    PermanentJobError
        If the network returns an unexpected shape.
    TransientJobError
        If the device runs out of memory.
    """
    rows, cols = pixels.shape[1:]
    matrix = tuple(spec.input.matrix)
    resample = (rows, cols) != matrix
    out = np.empty(pixels.shape, dtype=np.float32)
    batch = spec.input.batch_size
    with torch.inference_mode():
        for start in range(0, pixels.shape[0], batch):
            if checkpoint is not None:
                checkpoint()
            x = torch.from_numpy(pixels[start : start + batch]).to(device)[:, None]
            x = (x + spec.input.offset) * spec.input.scale
            if resample:
                x = F.interpolate(x, size=matrix, mode="bilinear", align_corners=False)
            try:
                y = module(x)
            except torch.OutOfMemoryError:
                raise TransientJobError(f"model {spec.name}: out of device memory") from None
            except RuntimeError as exc:
                raise PermanentJobError(
                    f"model {spec.name}: forward pass failed: {str(exc).splitlines()[0]}"
                ) from None
            if not isinstance(y, torch.Tensor) or tuple(y.shape[1:]) != (1, *matrix):
                shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
                raise PermanentJobError(
                    f"model {spec.name}: expected output [N, 1, {matrix[0]}, {matrix[1]}], "
                    f"got {shape}"
                )
            if spec.output.kind == "logits":
                y = torch.sigmoid(y)
            if resample:
                y = F.interpolate(y, size=(rows, cols), mode="bilinear", align_corners=False)
            out[start : start + y.shape[0]] = y[:, 0].float().cpu().numpy()
    return out


def segment(
    spec: ModelSpec,
    volume: Volume,
    cache: ModelCache,
    checkpoint: Callable[[], None] | None = None,
) -> SegmentationResult:
    """Segment a volume with a model package and post-process the result.

    Parameters
    ----------
    spec : ModelSpec
        The model package.
    volume : Volume
        The input series.
    cache : ModelCache
        Warm models.
    checkpoint : callable, optional
        Called between batches; it raises to abandon the work.

    Returns
    -------
    SegmentationResult
        Labels on the source grid and the time spent in each step.

    Raises
    ------
    PermanentJobError
        If the series does not fit the model, or the model misbehaves.
    TransientJobError
        If the device runs out of memory.
    """
    check_input(spec, volume)
    try:
        module = cache.get(spec)
    except ModelPackageError as exc:
        raise PermanentJobError(str(exc)) from None
    timings: dict[str, float] = {}
    started = time.perf_counter()
    prob = predict_foreground(module, spec, volume.pixels, cache.device, checkpoint)
    timings["inference_s"] = time.perf_counter() - started

    started = time.perf_counter()
    foreground = prob >= spec.output.threshold
    if spec.output.postprocess == "split-left-right":
        left, right = split_left_right(foreground, volume, spec.output.min_component_fraction)
        labels = np.zeros(foreground.shape, dtype=np.uint8)
        for index, seg in enumerate(spec.output.segments, start=1):
            labels[left if seg.side == "left" else right] = index
    else:
        labels = foreground.astype(np.uint8)
    timings["postprocess_s"] = time.perf_counter() - started
    return SegmentationResult(labels=labels, timings=timings)
