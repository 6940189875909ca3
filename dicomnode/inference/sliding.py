"""3D models: the whole volume through a sliding window (MONAI's inferer).

The volume is resampled to the spacing the network was trained at, put in the array
order it expects (as stored, or RAS as MONAI's ``Orientationd`` makes from NIfTI),
windowed with Gaussian blending, and brought back: labels by argmax on the network's
grid and nearest-neighbour resampling, so no label is ever interpolated.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the usual torch alias

from dicomnode.errors import PermanentJobError, TransientJobError
from dicomnode.imaging import ModelSpec, Volume
from dicomnode.inference.transforms import (
    FORWARD_ERRORS,
    channels,
    failure_reason,
    intensity,
    to_output,
)

_RAS_SIGN = np.array([-1.0, -1.0, 1.0])  # RAS = LPS with x and y reversed
# For each network axis, the stored axis that becomes it, and whether it is reversed.
Layout = tuple[tuple[int, int, int], tuple[bool, bool, bool]]


def ras_layout(volume: Volume) -> Layout:
    """Return how to turn the volume's (slice, row, column) array into RAS (x, y, z).

    Each stored axis goes to the patient axis its direction is closest to, and is
    reversed where it runs against R, A or S (nibabel's ``as_closest_canonical``).

    Parameters
    ----------
    volume : Volume
        The volume.

    Returns
    -------
    tuple
        ``order``: for each RAS axis, the stored axis that becomes it; ``flip``: for
        each RAS axis, whether it is reversed.

    Raises
    ------
    PermanentJobError
        If two stored axes point along the same patient axis (a degenerate orientation).
    """
    directions = [volume.normal, volume.column_direction, volume.row_direction]
    order = [-1, -1, -1]
    flip = [False, False, False]
    for stored, direction in enumerate(directions):
        world = int(np.argmax(np.abs(direction)))
        if order[world] != -1:
            raise PermanentJobError("cannot orient the volume: two axes share a direction")
        order[world] = stored
        flip[world] = bool(direction[world] * _RAS_SIGN[world] < 0)
    return (order[0], order[1], order[2]), (flip[0], flip[1], flip[2])


def _to_network(x: torch.Tensor, layout: Layout | None) -> torch.Tensor:
    if layout is None:
        return x
    order, flip = layout
    x = x.permute(0, 1, *(2 + a for a in order))
    dims = [2 + i for i, f in enumerate(flip) if f]
    return torch.flip(x, dims) if dims else x


def _from_network(y: torch.Tensor, layout: Layout | None) -> torch.Tensor:
    if layout is None:
        return y
    order, flip = layout
    dims = [2 + i for i, f in enumerate(flip) if f]
    if dims:
        y = torch.flip(y, dims)
    inverse = np.argsort(order)
    return y.permute(0, 1, *(2 + int(a) for a in inverse))


def predict_volume(
    module: Callable[[torch.Tensor], torch.Tensor],
    spec: ModelSpec,
    volume: Volume,
    device: torch.device,
    checkpoint: Callable[[], None] | None = None,
) -> np.ndarray:
    """Run a 3D model over a volume with a sliding window.

    Parameters
    ----------
    module : callable
        The network: ``[B, 1, *roi]`` in, ``[B, C, *roi]`` out (``C`` as for 2D models).
    spec : ModelSpec
        Its package: ``input.roi``, ``spacing``, ``axes``, ``overlap``, ``batch_size``
        (windows per forward pass) and the intensity transform.
    volume : Volume
        The input.
    device : torch.device
        Where to run.
    checkpoint : callable, optional
        Called before every batch of windows; it raises to abandon the work.

    Returns
    -------
    np.ndarray
        ``(slices, rows, columns)`` on the volume's grid: float32 probabilities for one
        output channel, uint8 labels for several.

    Raises
    ------
    PermanentJobError
        If the network fails or returns the wrong number of channels.
    TransientJobError
        If the device runs out of memory.
    """
    from monai.inferers import sliding_window_inference  # imported when a 3D model runs

    layout = ras_layout(volume) if spec.input.axes == "ras" else None
    native = np.array([volume.slice_spacing, *volume.pixel_spacing])
    shape = np.array(volume.shape)
    with torch.inference_mode():
        x = intensity(torch.from_numpy(volume.pixels).to(device)[None, None], spec)
        if spec.input.spacing:
            # spacing is given in the network's axis order; bring it to the stored one.
            wanted = np.asarray(spec.input.spacing, dtype=float)
            if layout is not None:
                wanted = wanted[np.argsort(layout[0])]
            target = tuple(int(v) for v in np.maximum(1, np.round(shape * native / wanted)))
            if target != tuple(shape):
                x = F.interpolate(x, size=target, mode="trilinear", align_corners=False)
        x = _to_network(x, layout)

        def predictor(window: torch.Tensor) -> torch.Tensor:
            if checkpoint is not None:
                checkpoint()
            y = module(window)
            if not isinstance(y, torch.Tensor) or y.shape[1] != channels(spec):
                got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
                raise PermanentJobError(
                    f"model {spec.name}: expected {channels(spec)} output channel(s), got {got}"
                )
            return y

        try:
            y = sliding_window_inference(
                x,
                roi_size=tuple(spec.input.roi),
                sw_batch_size=spec.input.batch_size,
                predictor=predictor,
                overlap=spec.input.overlap,
                mode="gaussian",
            )
        except torch.OutOfMemoryError:
            # A RuntimeError too, but one a retry (or a smaller batch) can cure.
            raise TransientJobError(f"model {spec.name}: out of device memory") from None
        except FORWARD_ERRORS as exc:
            raise PermanentJobError(
                f"model {spec.name}: forward pass failed: {failure_reason(exc)}"
            ) from None
        assert isinstance(y, torch.Tensor)  # one tensor in, one tensor out
        out = _from_network(to_output(y, spec), layout)
        if tuple(out.shape[2:]) != tuple(shape):
            multi = spec.output.kind == "softmax"
            out = F.interpolate(
                out.float(),
                size=tuple(int(v) for v in shape),
                mode="nearest-exact" if multi else "trilinear",  # centres, not corners
                **({} if multi else {"align_corners": False}),
            )
        result: np.ndarray = out[0, 0].cpu().numpy()
    return result.astype(np.uint8 if spec.output.kind == "softmax" else np.float32, copy=False)
