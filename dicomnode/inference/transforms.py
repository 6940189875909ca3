"""What goes into a network and what is kept of its output, shared by 2D and 3D models."""

from __future__ import annotations

import numpy as np
import torch

from dicomnode.imaging import ModelSpec


def intensity(x: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """Apply the package's intensity transform: clip, then ``(value + offset) * scale``.

    Parameters
    ----------
    x : torch.Tensor
        Rescaled values (HU for CT).
    spec : ModelSpec
        The package.

    Returns
    -------
    torch.Tensor
        What the network takes.
    """
    if spec.input.clip:
        x = x.clamp(spec.input.clip[0], spec.input.clip[1])
    return (x + spec.input.offset) * spec.input.scale


def channels(spec: ModelSpec) -> int:
    """Return the output channels a package's network must give (1, or segments + 1)."""
    return len(spec.output.segments) + 1 if spec.output.kind == "softmax" else 1


def to_output(y: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """Turn a network output into what is kept: probabilities, or argmax labels.

    One channel gives the foreground probability (a sigmoid for logits); several give
    integer labels by argmax over the channels, taken on the network's grid, before
    any resampling, so that labels are never interpolated.
    """
    if spec.output.kind == "softmax":
        return y.argmax(dim=1, keepdim=True).to(torch.uint8)
    return torch.sigmoid(y) if spec.output.kind == "logits" else y


def foreground_count(out: torch.Tensor | np.ndarray, spec: ModelSpec) -> int:
    """Return how many voxels of an output (from :func:`to_output`) are foreground."""
    if spec.output.kind == "softmax":
        return int((out > 0).sum())
    return int((out >= spec.output.threshold).sum())


def example_shapes(spec: ModelSpec, batch: int = 1) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Return the input shape a package's network takes and the output it must give.

    Parameters
    ----------
    spec : ModelSpec
        The package.
    batch : int
        Batch size of the example.

    Returns
    -------
    tuple
        ``(input shape, output shape)``: slices ``[N, 1, rows, columns]`` to
        ``[N, C, rows, columns]``; 3D windows ``[N, 1, *roi]`` to ``[N, C, *roi]``;
        classified slices ``[N, 1, rows, columns]`` to ``[N, classes]`` (``[N, 1]``
        for one channel); detection patch stacks ``[N, offsets, rows, columns]`` to
        ``[N, 1]``.
    """
    if spec.task == "detection":
        depth = len(spec.detection.slice_offsets_mm)
        return (batch, depth, *spec.input.matrix), (batch, 1)
    if spec.task == "classification":
        width = len(spec.output.classes) if spec.output.kind == "softmax" else 1
        return (batch, 1, *spec.input.matrix), (batch, width)
    grid = spec.input.roi if spec.input.dimensions == 3 else spec.input.matrix
    return (batch, 1, *grid), (batch, channels(spec), *grid)


# What a failing forward pass raises: kernels raise RuntimeError; a TorchScript
# network's own ``raise`` (a shape check, say) comes out as torch.jit.Error.
FORWARD_ERRORS: tuple[type[Exception], ...] = (RuntimeError, torch.jit.Error)
_TORCHSCRIPT_PREAMBLE = "The following operation failed in the TorchScript interpreter"


def failure_reason(exc: BaseException) -> str:
    """Return the line of a forward-pass error that says what went wrong.

    TorchScript puts its interpreter traceback first and the error itself last;
    eager PyTorch puts the error first.
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return lines[-1] if lines[0].startswith(_TORCHSCRIPT_PREAMBLE) else lines[0]
