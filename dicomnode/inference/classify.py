"""Run a classification model: one class for the whole series, from its slices.

The network scores each slice (``[N, 1, rows, columns]`` in, ``[N, classes]`` out); the
slice scores are combined into the series' score by their mean or their maximum, as
the package says (a finding visible on a few slices needs ``max``).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the usual torch alias

from dicomnode.errors import ModelPackageError, PermanentJobError
from dicomnode.imaging import ClassificationResult, ClassSpec, ModelSpec, Volume
from dicomnode.inference.segment import ModelCache, check_input, forward_in_pieces
from dicomnode.inference.transforms import FORWARD_ERRORS, failure_reason, intensity


def classify(
    spec: ModelSpec,
    volume: Volume,
    cache: ModelCache,
    checkpoint: Callable[[], None] | None = None,
) -> ClassificationResult:
    """Classify a series with a classification package.

    Parameters
    ----------
    spec : ModelSpec
        The package (``task = "classification"``).
    volume : Volume
        The input series.
    cache : ModelCache
        Warm models.
    checkpoint : callable, optional
        Called between batches; it raises to abandon the work.

    Returns
    -------
    ClassificationResult
        Scores per class and the chosen class.

    Raises
    ------
    PermanentJobError
        If the series does not fit the model, or the model misbehaves.
    TransientJobError
        If the device runs out of memory even for one slice.
    """
    check_input(spec, volume)
    try:
        module = cache.get(spec)
    except ModelPackageError as exc:
        raise PermanentJobError(str(exc)) from None
    classes = spec.output.classes
    width = len(classes) if spec.output.kind == "softmax" else 1
    matrix = tuple(spec.input.matrix)
    started = time.perf_counter()
    scores = np.empty((volume.shape[0], width), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, volume.shape[0], spec.input.batch_size):
            if checkpoint is not None:
                checkpoint()
            x = torch.from_numpy(volume.pixels[start : start + spec.input.batch_size])
            x = intensity(x.to(cache.device)[:, None], spec)
            if tuple(x.shape[2:]) != matrix:
                x = F.interpolate(x, size=matrix, mode="bilinear", align_corners=False)
            try:
                y = forward_in_pieces(module, x, spec.name)
            except FORWARD_ERRORS as exc:
                raise PermanentJobError(
                    f"model {spec.name}: forward pass failed: {failure_reason(exc)}"
                ) from None
            if not isinstance(y, torch.Tensor) or tuple(y.shape) != (x.shape[0], width):
                got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
                raise PermanentJobError(
                    f"model {spec.name}: expected output [N, {width}], got {got}"
                )
            y = y.float()
            if spec.output.kind == "softmax":
                y = torch.softmax(y, dim=1)
            elif spec.output.kind == "logits":
                y = torch.sigmoid(y)
            scores[start : start + x.shape[0]] = y.cpu().numpy()
    timings = {"inference_s": time.perf_counter() - started}

    series = scores.max(axis=0) if spec.output.aggregate == "max" else scores.mean(axis=0)
    probabilities = {c.label: float(p) for c, p in zip(classes, series, strict=True)}
    if spec.output.kind == "softmax":
        chosen: ClassSpec | None = classes[int(np.argmax(series))]
    else:
        chosen = classes[0] if series[0] >= spec.output.threshold else None
    return ClassificationResult(
        probabilities=probabilities, chosen=chosen, per_slice=scores, timings=timings
    )
