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
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the usual torch alias

from dicomnode.errors import Disagreement, ModelPackageError, PermanentJobError, TransientJobError
from dicomnode.imaging import ModelSpec, Volume
from dicomnode.inference.autocast import AutocastModel, autocast_dtype
from dicomnode.inference.backends import (
    OpenVINOModel,
    compile_openvino,
    cpu_has_bf16,
    labels_agree,
    load_openvino_int8,
    masks_agree,
    openvino_available,
    wants_int8,
)
from dicomnode.inference.lungs import split_left_right
from dicomnode.inference.sliding import predict_volume
from dicomnode.inference.transforms import (
    FORWARD_ERRORS,
    channels,
    failure_reason,
    foreground_count,
    intensity,
    to_output,
)
from dicomnode.inference.weights import load_model, openvino_ir_sha256

log = logging.getLogger(__name__)


@dataclass
class SegmentationResult:
    """Labels on the source grid plus how long each step took."""

    labels: np.ndarray  # (slices, rows, columns) uint8; 0 background, i = segments[i-1]
    timings: dict[str, float] = field(default_factory=dict)


class ModelCache:
    """Loaded models, kept warm between jobs (one copy per model and device).

    On the CPU a model may also be compiled by a faster back-end (OpenVINO); it is
    used once it has agreed with the PyTorch model on the first batch of real data.

    Parameters
    ----------
    device : torch.device
        Where models are loaded.
    backend : str
        ``auto`` (OpenVINO on the CPU when installed), ``torch`` or ``openvino``.
    precision : str
        For the faster back-end: ``auto`` (bf16 where the CPU has it), ``fp32`` or ``bf16``.
    threads : int
        CPU threads for the faster back-end; 0 lets it decide.
    """

    def __init__(
        self,
        device: torch.device,
        backend: str = "torch",
        precision: str = "auto",
        threads: int = 0,
    ) -> None:
        self.device = device
        self.backend = backend
        self.precision = precision
        self.threads = threads
        self._models: dict[tuple[str, str], torch.nn.Module] = {}
        self._fast: dict[tuple[str, str], OpenVINOModel | AutocastModel | None] = {}
        self._trusted: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def get(self, spec: ModelSpec) -> torch.nn.Module:
        """Return the loaded PyTorch model for ``spec``, loading it on first use.

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

    def fast(self, spec: ModelSpec) -> OpenVINOModel | AutocastModel | None:
        """Return the model on its faster path, or None to use plain PyTorch.

        Parameters
        ----------
        spec : ModelSpec
            The package.

        Returns
        -------
        OpenVINOModel, AutocastModel or None
            On the CPU, the model compiled by OpenVINO; on a GPU, the model under
            autocast with channels-last inputs. None with ``backend = "torch"``, for 3D
            models, when OpenVINO is missing or cannot compile the model, with
            ``precision = "fp32"`` on a GPU, or after it disagreed with PyTorch.
        """
        if self.backend == "torch" or spec.input.dimensions == 3:
            return None
        key = (spec.name, spec.version)
        module = self.get(spec)
        with self._lock:
            if key not in self._fast:
                if self.device.type == "cuda":
                    self._fast[key] = self._autocast(spec, module)
                elif self.device.type == "cpu":
                    self._fast[key] = self._compile(spec, module)
                else:
                    self._fast[key] = None
            return self._fast[key]

    def _autocast(self, spec: ModelSpec, module: torch.nn.Module) -> AutocastModel | None:
        dtype = autocast_dtype(self.precision, torch.cuda.is_bf16_supported())
        if dtype is None:
            return None
        fast = AutocastModel(module, "cuda", dtype)
        log.info("model %s: autocast %s, channels-last on the GPU", spec.name, fast.precision)
        return fast

    def _compile(self, spec: ModelSpec, module: torch.nn.Module) -> OpenVINOModel | None:
        if not openvino_available():
            if self.backend == "openvino":
                log.warning("worker.backend is openvino but it is not installed; using PyTorch")
            return None
        started = time.perf_counter()
        example = torch.zeros(spec.input.batch_size, 1, *spec.input.matrix)
        try:
            int8 = self._int8_weights(spec)
            if int8 is not None:
                compiled = load_openvino_int8(int8, self.threads)
            else:
                compiled = compile_openvino(module, example, self.threads, self.precision)
        except Exception as exc:  # an operator OpenVINO lacks: PyTorch still runs it
            log.warning(
                "model %s: OpenVINO cannot compile it (%s); using PyTorch",
                spec.name,
                type(exc).__name__,
            )
            return None
        log.info(
            "model compiled model=%s backend=openvino precision=%s seconds=%.2f",
            spec.name,
            compiled.precision,
            time.perf_counter() - started,
        )
        return compiled

    def _int8_weights(self, spec: ModelSpec) -> Path | None:
        """Return the package's INT8 IR where it should run here, or None for fp32/bf16."""
        xml = spec.int8_path
        if xml is None or not wants_int8(self.precision, cpu_has_bf16()):
            return None
        expected = spec.weights.openvino_int8_sha256
        if expected and openvino_ir_sha256(xml) != expected:
            log.warning(
                "model %s: %s does not match weights.openvino_int8_sha256; not used",
                spec.name,
                xml.name,
            )
            return None
        return xml

    def trusted(self, spec: ModelSpec) -> bool:
        """Return whether the faster back-end has agreed with PyTorch for ``spec``."""
        with self._lock:
            return (spec.name, spec.version) in self._trusted

    def verdict(self, spec: ModelSpec, agreed: bool) -> None:
        """Record the agreement check: trust the faster back-end, or drop it.

        Parameters
        ----------
        spec : ModelSpec
            The package.
        agreed : bool
            Whether its first batch matched PyTorch's.
        """
        key = (spec.name, spec.version)
        with self._lock:
            if agreed:
                self._trusted.add(key)
            else:
                self._fast[key] = None
                log.warning(
                    "model %s: OpenVINO disagrees with PyTorch or failed; using PyTorch",
                    spec.name,
                )


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


def forward_in_pieces(
    module: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, name: str
) -> torch.Tensor:
    """Run a batch; out of device memory, run it again in halves, down to one slice.

    A GPU shared with other work (or a larger matrix than usual) can run out of memory
    at the package's batch size and still manage a smaller one: the job slows down
    instead of failing. Only a single slice that does not fit fails the attempt, as a
    transient error, so it is retried later (or on another worker).

    Parameters
    ----------
    module : callable
        The network (or a faster back-end's compiled model).
    x : torch.Tensor
        The batch.
    name : str
        The model's name, for the log and the error.

    Returns
    -------
    torch.Tensor
        The network's output for the whole batch.

    Raises
    ------
    TransientJobError
        If even one item does not fit in device memory.
    """
    try:
        return module(x)
    except torch.OutOfMemoryError:
        pass  # leave the handler first: its traceback holds the failed pass's tensors
    if x.shape[0] == 1:
        raise TransientJobError(f"model {name}: out of device memory even for one slice")
    if x.is_cuda:
        torch.cuda.empty_cache()
    half = (x.shape[0] + 1) // 2
    log.warning(
        "model %s: out of device memory at batch %d; retrying in batches of %d",
        name,
        x.shape[0],
        half,
    )
    return torch.cat([forward_in_pieces(module, p, name) for p in torch.split(x, half)])


DECISIVE_VOXELS = 1000  # foreground voxels a compared batch needs to settle the check


def _agree(expected: torch.Tensor, got: torch.Tensor, spec: ModelSpec) -> bool:
    if spec.output.kind == "softmax":
        return labels_agree(expected, got)
    return masks_agree(expected.float(), got.float(), spec.output.threshold)


def predict_slices(
    module: Callable[[torch.Tensor], torch.Tensor],
    spec: ModelSpec,
    pixels: np.ndarray,
    device: torch.device,
    checkpoint: Callable[[], None] | None = None,
    reference: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> np.ndarray:
    """Run a slice-wise model over a volume, in batches.

    Parameters
    ----------
    module : torch.nn.Module
        The loaded network: ``[N, 1, H, W]`` in, ``[N, C, H, W]`` out, where ``C`` is 1,
        or the number of segments + 1 for ``output.kind = "softmax"``.
    spec : ModelSpec
        Its package (intensity transform, matrix, batch size, output kind).
    pixels : np.ndarray
        ``(slices, rows, columns)`` rescaled values (HU for CT).
    device : torch.device
        Where to run.
    checkpoint : callable, optional
        Called between batches; it raises to abandon the work (worker shutdown).
    reference : callable, optional
        The PyTorch model, when ``module`` is a faster back-end not yet trusted: the
        first batch runs through both and must agree (:func:`masks_agree`,
        :func:`labels_agree`).

    Returns
    -------
    np.ndarray
        ``(slices, rows, columns)`` on the input grid: float32 foreground
        probabilities for one channel, uint8 labels (argmax) for several.

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
    multi = spec.output.kind == "softmax"
    out = np.empty(pixels.shape, dtype=np.uint8 if multi else np.float32)
    batch = spec.input.batch_size
    expected_shape = (channels(spec), *matrix)
    with torch.inference_mode():
        for start in range(0, pixels.shape[0], batch):
            if checkpoint is not None:
                checkpoint()
            x = intensity(torch.from_numpy(pixels[start : start + batch]).to(device)[:, None], spec)
            if resample:
                x = F.interpolate(x, size=matrix, mode="bilinear", align_corners=False)
            try:
                y = forward_in_pieces(module, x, spec.name)
            except FORWARD_ERRORS as exc:
                raise PermanentJobError(
                    f"model {spec.name}: forward pass failed: {failure_reason(exc)}"
                ) from None
            if not isinstance(y, torch.Tensor) or tuple(y.shape[1:]) != expected_shape:
                shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
                raise PermanentJobError(
                    f"model {spec.name}: expected output [N, {', '.join(map(str, expected_shape))}]"
                    f", got {shape}"
                )
            y = to_output(y, spec)
            if reference is not None:
                expected = to_output(reference(x), spec)
                if not _agree(expected, y, spec):
                    raise Disagreement(spec.name)
                # The first batch with real foreground decides; empty ones (the first
                # slices above the lungs, say) prove little, so they are checked too.
                if foreground_count(expected, spec) >= DECISIVE_VOXELS:
                    reference = None
            if resample:
                # nearest-exact samples pixel centres, as bilinear with align_corners
                # False does on the way in; plain nearest shifts labels by up to a pixel.
                mode = "nearest-exact" if multi else "bilinear"
                y = F.interpolate(
                    y.float(), size=(rows, cols), mode=mode, **({} if multi else _CORNERS)
                )
            out[start : start + y.shape[0]] = y[:, 0].cpu().numpy()
    return out


_CORNERS = {"align_corners": False}


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
        fast = cache.fast(spec)
    except ModelPackageError as exc:
        raise PermanentJobError(str(exc)) from None
    if checkpoint is not None:
        checkpoint()  # loading and compiling can take a while: a stop is honoured here
    timings: dict[str, float] = {}
    started = time.perf_counter()
    out: np.ndarray | None = None
    if spec.input.dimensions == 3:
        out = predict_volume(module, spec, volume, cache.device, checkpoint)
    elif fast is not None:
        reference = None if cache.trusted(spec) else module
        try:
            out = predict_slices(
                fast, spec, volume.pixels, cache.device, checkpoint, reference=reference
            )
            # Every batch was compared until one had enough foreground; a volume with
            # hardly any leaves the back-end on probation for the next job.
            decisive = foreground_count(out, spec) >= DECISIVE_VOXELS
            if reference is not None and decisive:
                cache.verdict(spec, agreed=True)
        except (Disagreement, PermanentJobError):
            # Disagreed, or failed where PyTorch may not: PyTorch decides, from now on.
            cache.verdict(spec, agreed=False)
            out = None
    if out is None:
        out = predict_slices(module, spec, volume.pixels, cache.device, checkpoint)
    timings["inference_s"] = time.perf_counter() - started

    started = time.perf_counter()
    if spec.output.kind == "softmax":
        labels = out.astype(np.uint8, copy=False)
    else:
        foreground = out >= spec.output.threshold
        if spec.output.postprocess == "split-left-right":
            left, right = split_left_right(foreground, volume, spec.output.min_component_fraction)
            labels = np.zeros(foreground.shape, dtype=np.uint8)
            for index, seg in enumerate(spec.output.segments, start=1):
                labels[left if seg.side == "left" else right] = index
        else:
            labels = foreground.astype(np.uint8)
    timings["postprocess_s"] = time.perf_counter() - started
    return SegmentationResult(labels=labels, timings=timings)
