"""Lung-nodule candidates: a classical blob detector inside the lung mask, and patches.

The detector finds bright blobs of nodule size with a scale-normalised Laplacian of
Gaussian at a few physical scales, keeps the local maxima that lie inside the lung
region, and ranks them. It finds nearly every nodule along with hundreds of vessels
seen end-on; a CNN then scores a small stack of axial patches around each candidate
(:func:`extract_patches`). Everything works in millimetres, so scans of other pixel
spacings and slice thicknesses see the same physical scales.

The same functions serve the shipped model's ``train.py`` and the worker, so training
and inference cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the usual torch alias
from scipy import ndimage as ndi

# Clipping window and scale for the CNN's input: lung parenchyma to bone.
HU_LOW = -1000.0
HU_HIGH = 400.0


@dataclass(frozen=True)
class Candidates:
    """Candidate positions, best first.

    Attributes
    ----------
    centers : np.ndarray
        ``(n, 3)`` float voxel indices ``(slice, row, column)`` on the volume grid.
    response : np.ndarray
        ``(n,)`` blob strength (scale-normalised LoG).
    sigma_mm : np.ndarray
        ``(n,)`` the scale that responded best; a blob's diameter is about
        ``2 * sqrt(3) * sigma``.
    """

    centers: np.ndarray
    response: np.ndarray
    sigma_mm: np.ndarray

    def __len__(self) -> int:
        return int(self.centers.shape[0])


def _block_factors(spacing: Sequence[float], target: Sequence[float]) -> tuple[int, int, int]:
    f = [max(1, round(t / s)) for s, t in zip(spacing, target, strict=True)]
    return f[0], f[1], f[2]


def _reduce(array: np.ndarray, factors: tuple[int, int, int], how: str) -> np.ndarray:
    z, r, c = (n // f * f for n, f in zip(array.shape, factors, strict=True))
    blocks = array[:z, :r, :c].reshape(
        z // factors[0], factors[0], r // factors[1], factors[1], c // factors[2], factors[2]
    )
    return blocks.max(axis=(1, 3, 5)) if how == "max" else blocks.mean(axis=(1, 3, 5))


def lung_region(lung: np.ndarray, spacing: Sequence[float], closing_mm: float = 10.0) -> np.ndarray:
    """Return the lung mask with nodules put back in.

    A segmentation network leaves dense nodules out of the lung, as holes inside it
    or as bites out of its edge where a nodule touches the pleura. Holes are filled
    slice by slice, and bites up to ``closing_mm`` wide are closed.

    Parameters
    ----------
    lung : np.ndarray
        ``(slices, rows, columns)`` bool lung mask (both lungs).
    spacing : sequence of float
        ``(slice, row, column)`` spacing in mm.
    closing_mm : float
        Radius of the in-plane closing.

    Returns
    -------
    np.ndarray
        The region, same shape, bool.
    """
    radius = max(1, round(closing_mm / float(spacing[1])))
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    disk = xx**2 + yy**2 <= radius * radius
    region = np.zeros(lung.shape, dtype=bool)
    for k in range(lung.shape[0]):
        if not lung[k].any():
            continue
        filled = ndi.binary_fill_holes(lung[k])
        # Padding keeps the closing from gluing the mask to the image border.
        closed = ndi.binary_closing(np.pad(filled, radius), disk)[radius:-radius, radius:-radius]
        region[k] = ndi.binary_fill_holes(closed)
    return region


def detect_candidates(
    hu: np.ndarray,
    lung: np.ndarray,
    spacing: Sequence[float],
    sigmas_mm: Sequence[float] = (2.0, 3.0, 4.5, 6.5),
    min_hu: float = -600.0,
    limit: int = 300,
) -> Candidates:
    """Find nodule-like blobs inside the lungs.

    Parameters
    ----------
    hu : np.ndarray
        ``(slices, rows, columns)`` Hounsfield units.
    lung : np.ndarray
        Lung mask on the same grid.
    spacing : sequence of float
        ``(slice, row, column)`` spacing in mm.
    sigmas_mm : sequence of float
        Blob scales; 2-6.5 mm covers nodules of about 7-23 mm and still responds to
        smaller and larger ones.
    min_hu : float
        A candidate's centre must be at least this dense (solid or part-solid).
    limit : int
        At most this many candidates, strongest first.

    Returns
    -------
    Candidates
        On the input grid.
    """
    # Work at about 1.4 mm: nodules of 3 mm and up survive, and the filters run on a
    # quarter of the voxels of a 0.7 mm scan.
    factors = _block_factors(spacing, (2.0, 1.4, 1.4))
    coarse_lung = _reduce(lung, factors, "max")
    coarse_spacing = np.asarray(spacing, dtype=np.float64) * np.asarray(factors)
    if not coarse_lung.any():
        return Candidates(np.empty((0, 3)), np.empty(0, np.float32), np.empty(0))
    # Only the lungs' bounding box is filtered, with a margin as wide as the filters
    # reach (4 sigma), so every value inside the box is what the whole volume gives.
    margin = np.ceil(4 * max(sigmas_mm) / coarse_spacing).astype(int) + 1
    found = np.argwhere(coarse_lung)
    low = np.maximum(found.min(axis=0) - margin, 0)
    high = np.minimum(found.max(axis=0) + margin + 1, coarse_lung.shape)
    box = tuple(slice(a, b) for a, b in zip(low, high, strict=True))
    coarse_lung = coarse_lung[box]
    fine_box = tuple(slice(a * f, b * f) for a, b, f in zip(low, high, factors, strict=True))
    coarse_hu = _reduce(hu[fine_box].astype(np.float32, copy=False), factors, "mean")
    region = lung_region(coarse_lung, coarse_spacing)

    image = np.clip(coarse_hu, HU_LOW, HU_HIGH)
    best = np.full(image.shape, -np.inf, dtype=np.float32)
    scale = np.zeros(image.shape, dtype=np.uint8)
    for i, sigma in enumerate(sigmas_mm):
        # Scale normalisation (sigma^2) lets blobs of different sizes compete fairly.
        response = -(sigma**2) * ndi.gaussian_laplace(image, sigma=sigma / coarse_spacing)
        better = response > best
        best[better] = response[better]
        scale[better] = i
    peaks = (best == ndi.maximum_filter(best, size=(3, 5, 5))) & region & (coarse_hu > min_hu)
    peaks &= best > 0
    where = np.argwhere(peaks)
    strength = best[peaks]
    order = np.argsort(-strength, kind="stable")[:limit]
    where, strength = where[order], strength[order]
    # Back to the input grid: the centre of each coarse block.
    offset = (np.asarray(factors) - 1) / 2.0
    centers = (where + low) * np.asarray(factors) + offset
    sigmas = np.asarray(sigmas_mm, dtype=np.float64)[scale[tuple(where.T)]]
    return Candidates(centers=centers.astype(np.float64), response=strength, sigma_mm=sigmas)


def extract_patches(
    hu: np.ndarray,
    spacing: Sequence[float],
    centers: np.ndarray,
    size_mm: float = 48.0,
    pixels: int = 32,
    offsets_mm: Sequence[float] = (-5.0, -2.5, 0.0, 2.5, 5.0),
) -> np.ndarray:
    """Cut a stack of axial patches around each centre, in physical units.

    Parameters
    ----------
    hu : np.ndarray
        ``(slices, rows, columns)`` Hounsfield units.
    spacing : sequence of float
        ``(slice, row, column)`` spacing in mm.
    centers : np.ndarray
        ``(n, 3)`` voxel indices ``(slice, row, column)``; need not be integers.
    size_mm : float
        Width and height of each patch.
    pixels : int
        Patch matrix (square).
    offsets_mm : sequence of float
        Where the slices of the stack lie along the slice axis, relative to the
        centre; each takes the nearest acquired slice.

    Returns
    -------
    np.ndarray
        ``(n, len(offsets_mm), pixels, pixels)`` float32 scaled to 0..1.
    """
    n = centers.shape[0]
    out = np.empty((n, len(offsets_mm), pixels, pixels), dtype=np.float32)
    if n == 0:
        return out
    slices, rows, cols = hu.shape
    # Sample points of one patch, in source pixels relative to the centre.
    step = np.linspace(-size_mm / 2, size_mm / 2, pixels)
    dy = step / float(spacing[1])
    dx = step / float(spacing[2])
    volume = torch.from_numpy(np.ascontiguousarray(hu, dtype=np.float32))
    for i, (z, y, x) in enumerate(centers):
        ks = [int(np.clip(round(z + o / float(spacing[0])), 0, slices - 1)) for o in offsets_mm]
        stack = volume[ks][None]  # (1, depth, rows, cols)
        # grid_sample wants x, y in -1..1 (align_corners=True: -1 is the first pixel).
        gy = (y + dy) / max(rows - 1, 1) * 2 - 1
        gx = (x + dx) / max(cols - 1, 1) * 2 - 1
        grid = torch.from_numpy(
            np.stack(np.meshgrid(gx, gy, indexing="xy"), axis=-1).astype(np.float32)
        )[None]
        patch = F.grid_sample(
            stack, grid, mode="bilinear", padding_mode="border", align_corners=True
        )[0]
        out[i] = patch.numpy()
    np.clip(out, HU_LOW, HU_HIGH, out=out)
    out -= HU_LOW
    out /= HU_HIGH - HU_LOW
    return out


def suppress(centers_mm: np.ndarray, scores: np.ndarray, radius_mm: float) -> np.ndarray:
    """Non-maximum suppression: keep the best-scoring point within each ``radius_mm``.

    Parameters
    ----------
    centers_mm : np.ndarray
        ``(n, 3)`` positions in mm.
    scores : np.ndarray
        ``(n,)`` scores; higher is better.
    radius_mm : float
        Points closer than this to a better one are dropped.

    Returns
    -------
    np.ndarray
        Indices of the kept points, best first.
    """
    kept: list[int] = []
    for i in np.argsort(-scores, kind="stable"):
        if all(np.linalg.norm(centers_mm[i] - centers_mm[j]) >= radius_mm for j in kept):
            kept.append(int(i))
    return np.asarray(kept, dtype=np.int64)


@dataclass(frozen=True)
class Extent:
    """A nodule as segmented around its centre, and its diameters on those voxels.

    Attributes
    ----------
    long_axis_mm : float
        The longest in-plane diameter over all its slices (0 when nothing was found).
    short_axis_mm : float
        Its width perpendicular to the long axis, on the long axis's slice.
    long_axis_slice : int
        The slice on which the long axis lies (-1 when nothing was found).
    voxels : np.ndarray
        ``(m, 3)`` voxel indices ``(slice, row, column)``: what the SEG shows and
        what its volume is measured on.
    """

    long_axis_mm: float
    short_axis_mm: float
    long_axis_slice: int
    voxels: np.ndarray

    def volume_mm3(self, spacing: Sequence[float]) -> float:
        """Return the volume of its voxels."""
        return float(len(self.voxels) * np.prod(np.asarray(spacing, dtype=np.float64)))


NOTHING = Extent(0.0, 0.0, -1, np.empty((0, 3), dtype=np.int64))


def blob_diameter_mm(sigma_mm: float) -> float:
    """Return the diameter of the sphere a scale-normalised LoG finds best at ``sigma_mm``.

    In three dimensions the response of a solid sphere of radius r peaks at
    sigma = r / sqrt(3).
    """
    return 2.0 * np.sqrt(3.0) * float(sigma_mm)


def _axes(mask: np.ndarray, step: np.ndarray) -> tuple[float, float]:
    """Return the longest chord of a 2-D mask and its width perpendicular to it, in mm."""
    # The longest chord runs between boundary pixels, so only those are compared.
    edge = np.argwhere(mask & ~ndi.binary_erosion(mask)) * step
    gaps = edge[:, None, :] - edge[None, :, :]
    lengths = (gaps**2).sum(-1)
    i, j = np.unravel_index(int(np.argmax(lengths)), lengths.shape)
    longest = float(np.sqrt(lengths[i, j]))
    pixel = float(step[0])
    if longest == 0.0:
        return pixel, pixel  # a single pixel is one pixel wide each way
    direction = gaps[i, j] / longest
    across = np.array([-direction[1], direction[0]])
    spread = np.argwhere(mask) * step @ across
    # Each extreme measures from pixel centre to pixel centre: one pixel more is the
    # object's edge to edge, as a reader's calliper would measure it.
    return longest + pixel, float(spread.max() - spread.min()) + pixel


def nodule_extent(
    hu: np.ndarray,
    spacing: Sequence[float],
    center: np.ndarray,
    lung: np.ndarray | None = None,
    max_diameter_mm: float = 50.0,
    threshold_hu: float = -500.0,
    opening_mm: float = 1.5,
) -> Extent:
    """Segment a nodule around its centre and measure it on its own voxels.

    The nodule is the dense voxels (above ``threshold_hu``) connected to the centre,
    within a sphere of ``max_diameter_mm`` around it. Three things keep vessels and the
    chest wall out of it: only voxels inside the lung region count (``lung``, with
    holes and bites filled by :func:`lung_region`); an opening of ``opening_mm`` cuts
    the thin necks where a vessel touches the nodule; and the sphere, sized by the
    caller from the blob's scale, bounds what is left. The diameters are then measured
    on exactly the voxels the volume is, so the two always describe one object.

    Parameters
    ----------
    hu : np.ndarray
        ``(slices, rows, columns)`` Hounsfield units.
    spacing : sequence of float
        ``(slice, row, column)`` spacing in mm.
    center : np.ndarray
        ``(3,)`` voxel index of the centre.
    lung : np.ndarray, optional
        The lung mask on the same grid; without it the chest wall may join in.
    max_diameter_mm : float
        Diameter of the search sphere.
    threshold_hu : float
        Density that counts as nodule.
    opening_mm : float
        In-plane radius of the opening.

    Returns
    -------
    Extent
        Its voxels and diameters; :data:`NOTHING` when the centre is not dense.
    """
    step_mm = np.asarray(spacing, dtype=np.float64)
    half = [max(1, round(max_diameter_mm / 2 / float(s))) for s in spacing]
    c = [int(np.rint(v)) for v in center]
    lo = [max(0, c[a] - half[a]) for a in range(3)]
    hi = [min(hu.shape[a], c[a] + half[a] + 1) for a in range(3)]
    window = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
    local = np.asarray([c[a] - lo[a] for a in range(3)])
    # A sphere, not a box: a box's corners would let a vessel run 1.7 times further
    # along a diagonal than along an axis.
    grid = np.ogrid[tuple(slice(0, hi[a] - lo[a]) for a in range(3))]
    reach = sum(((g - local[a]) * step_mm[a]) ** 2 for a, g in enumerate(grid))
    box = (hu[window] > threshold_hu) & (reach <= (max_diameter_mm / 2) ** 2)
    if lung is not None:
        box &= lung_region(lung[window], spacing)
    radius = max(1, round(opening_mm / float(spacing[1])))
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    disk = (xx**2 + yy**2 <= radius * radius)[None]
    opened = ndi.binary_opening(box, disk)
    # A nodule smaller than the opening would vanish: then the raw mask is measured.
    labels, _ = ndi.label(opened if opened.any() else box)
    dense = np.argwhere(labels > 0)
    if dense.size == 0:
        return NOTHING
    # The centre may sit in a partial-volume voxel: take the nearest dense one.
    nearest = dense[np.argmin((((dense - local) * step_mm) ** 2).sum(axis=1))]
    if np.linalg.norm((nearest - local) * step_mm) > 3.0:
        return NOTHING
    own = labels == labels[tuple(nearest)]
    # Give back what the opening shaved off the nodule itself (its top and bottom
    # slices, its rim) with two conditional dilation steps: a vessel gets two voxels.
    own = ndi.binary_dilation(own, ndi.generate_binary_structure(3, 1), iterations=2, mask=box)
    voxels = np.argwhere(own) + np.asarray(lo)
    best = (0.0, 0.0, -1)
    for k in range(own.shape[0]):
        if own[k].any():
            long_axis, short_axis = _axes(own[k], step_mm[1:])
            if long_axis > best[0]:
                best = (long_axis, short_axis, k + lo[0])
    return Extent(best[0], best[1], best[2], voxels)


def score_patches(
    module: torch.nn.Module | object,
    patches: np.ndarray,
    device: torch.device,
    batch_size: int = 64,
    logits: bool = True,
) -> np.ndarray:
    """Return the nodule probability of each patch stack.

    Parameters
    ----------
    module : callable
        The CNN: ``[N, depth, H, W]`` in, ``[N, 1]`` (or ``[N]``) out.
    patches : np.ndarray
        From :func:`extract_patches`.
    device : torch.device
        Where to run.
    batch_size : int
        Patches per forward pass.
    logits : bool
        Whether the CNN returns logits (a sigmoid is applied) or probabilities.

    Returns
    -------
    np.ndarray
        ``(n,)`` float32 probabilities.

    Raises
    ------
    ValueError
        If the CNN returns more than one value per patch.
    """
    out = np.empty(patches.shape[0], dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, patches.shape[0], batch_size):
            x = torch.from_numpy(patches[start : start + batch_size]).to(device)
            y = module(x)  # type: ignore[operator]
            if not isinstance(y, torch.Tensor) or y.reshape(x.shape[0], -1).shape[1] != 1:
                shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
                raise ValueError(f"expected one score per patch [N, 1], got {shape}")
            y = y.reshape(-1).float()
            out[start : start + x.shape[0]] = (torch.sigmoid(y) if logits else y).cpu().numpy()
    return out
