"""NIfTI label volumes as references, laid on the source series' grid.

A NIfTI's affine maps voxel indices to RAS millimetres; DICOM positions are LPS, so the
two differ by the sign of x and y. Every pixel of every source slice is mapped into
the NIfTI's voxel grid and takes the nearest voxel's label: exact when the NIfTI was
converted from the same series (the indices land on integers), nearest-neighbour
resampling otherwise. A NIfTI whose grid does not cover the source slices (another
series, a crop, a missing or default orientation) is refused rather than silently
scored against zeros.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dicomnode.errors import EvaluationError, UsageError
from dicomnode.evaluate.geometry import SourceGrid, grid_from_seg
from dicomnode.evaluate.seg_reference import (
    CaseMasks,
    _source,
    read_seg,
    score_masks,
    segment_names,
    stack_segments,
)

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
NIFTI_SUFFIXES = (".nii.gz", ".nii")
_PAIR = re.compile(r"^\s*(\d+)\s*=\s*(.+?)\s*$")


def is_nifti(path: Path) -> bool:
    """Return whether ``path`` is named like a NIfTI file (.nii or .nii.gz)."""
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(path: Path) -> str:
    """Return the file name without .nii or .nii.gz."""
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def parse_label_map(items: Sequence[str]) -> dict[int, str]:
    """Parse ``--label-map`` values such as ``1="Left lung"`` or ``1=Left lung,2=Right lung``.

    Parameters
    ----------
    items : sequence of str
        The option's values; each holds one or more comma-separated ``N=LABEL``.

    Returns
    -------
    dict[int, str]
        Segment label by NIfTI label value.

    Raises
    ------
    UsageError
        On a pair that is not ``N=LABEL`` with N a positive integer, or a value given
        twice.
    """
    out: dict[int, str] = {}
    for item in items:
        for pair in item.split(","):
            match = _PAIR.match(pair)
            label = match.group(2).strip().strip("\"'").strip() if match else ""
            if not match or not label or int(match.group(1)) == 0:
                raise UsageError(
                    f"--label-map: {pair.strip()!r} is not N=LABEL (N a label value > 0), "
                    'e.g. 1="Left lung"'
                )
            value = int(match.group(1))
            if value in out:
                raise UsageError(f"--label-map: label value {value} is mapped twice")
            out[value] = label
    return out


def affine_of(grid: SourceGrid) -> np.ndarray:
    """Return the NIfTI (RAS) affine of a grid, voxel index order (column, row, slice).

    Parameters
    ----------
    grid : SourceGrid
        A grid with regularly spaced slices.

    Returns
    -------
    np.ndarray
        4x4 affine; a label map ``labels[slice, row, column]`` goes with it as
        ``labels.transpose(2, 1, 0)``.
    """
    affine = np.eye(4)
    affine[:3, 0] = LPS_TO_RAS @ (grid.row_direction * grid.pixel_spacing[1])
    affine[:3, 1] = LPS_TO_RAS @ (grid.column_direction * grid.pixel_spacing[0])
    affine[:3, 2] = LPS_TO_RAS @ (grid.normal * grid.spacing[0])
    affine[:3, 3] = LPS_TO_RAS @ grid.positions[0]
    return affine


def load_labels(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI label volume.

    Parameters
    ----------
    path : Path
        A .nii or .nii.gz file.

    Returns
    -------
    tuple of np.ndarray
        Integer labels indexed (i, j, k), and the 4x4 voxel-to-RAS affine.

    Raises
    ------
    EvaluationError
        If nibabel is missing, the file is unreadable, not 3D, or has no orientation.
    """
    try:
        import nibabel as nib
    except ImportError:
        raise EvaluationError(
            "NIfTI references need nibabel: pip install 'dicomnode[evaluate]'"
        ) from None
    try:
        image: Any = nib.load(str(path))
        data = np.asanyarray(image.dataobj)
    except Exception as exc:
        raise EvaluationError(f"{path}: not a readable NIfTI ({type(exc).__name__})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise EvaluationError(
            f"{path}: a label volume must be 3D, this one has shape {tuple(data.shape)}"
        )
    header = image.header
    codes = (int(header["sform_code"]), int(header["qform_code"]))
    if codes == (0, 0):
        raise EvaluationError(f"{path}: no orientation (sform and qform codes are 0)")
    if not np.issubdtype(data.dtype, np.integer):
        data = np.rint(data)
    return data.astype(np.int32), np.asarray(image.affine, dtype=float)


def sample_labels(
    labels: np.ndarray, affine: np.ndarray, grid: SourceGrid, path: Path
) -> np.ndarray:
    """Return the label at every pixel of ``grid`` by nearest neighbour.

    Parameters
    ----------
    labels : np.ndarray
        The NIfTI's labels, indexed (i, j, k).
    affine : np.ndarray
        Its voxel-to-RAS affine.
    grid : SourceGrid
        The source slices; those with a source UID must lie within the NIfTI.
    path : Path
        For the error message.

    Returns
    -------
    np.ndarray
        ``(slices, rows, columns)`` labels; 0 outside the NIfTI.

    Raises
    ------
    EvaluationError
        If a source slice (one with a UID) falls outside the NIfTI's grid.
    """
    to_index = np.linalg.inv(affine)
    # LPS -> RAS -> voxel index, as one linear map plus offset.
    linear = to_index[:3, :3] @ LPS_TO_RAS
    offset = to_index[:3, 3]
    rows, cols = grid.shape
    dims = np.asarray(labels.shape)
    corners = [(0, 0), (0, cols - 1), (rows - 1, 0), (rows - 1, cols - 1)]
    tolerance = 0.5 + 0.05  # half a voxel, and a little for rounding in the headers
    for k, uid in enumerate(grid.sop_uids):
        if not uid:
            continue
        for r, c in corners:
            point = (
                grid.positions[k]
                + c * grid.pixel_spacing[1] * grid.row_direction
                + r * grid.pixel_spacing[0] * grid.column_direction
            )
            index = linear @ point + offset
            if np.any(index < -tolerance) or np.any(index > dims - 1 + tolerance):
                raise EvaluationError(
                    f"{path}: its grid (shape {tuple(labels.shape)}) does not cover the source "
                    f"series ({rows}x{cols}, {sum(1 for u in grid.sop_uids if u)} slices); "
                    "another series, a crop or a wrong affine?"
                )
    out = np.zeros((len(grid.sop_uids), rows, cols), dtype=labels.dtype)
    step_c = linear @ (grid.row_direction * grid.pixel_spacing[1])
    step_r = linear @ (grid.column_direction * grid.pixel_spacing[0])
    r_idx = np.arange(rows, dtype=float)[:, None, None] * step_r
    c_idx = np.arange(cols, dtype=float)[None, :, None] * step_c
    for k in range(len(grid.sop_uids)):
        index = np.rint(linear @ grid.positions[k] + offset + r_idx + c_idx).astype(np.int64)
        inside = np.all((index >= 0) & (index < dims), axis=-1)
        if not inside.any():
            continue
        i, j, kk = (np.where(inside, index[..., a], 0) for a in range(3))
        out[k] = np.where(inside, labels[i, j, kk], 0)
    return out


def _extent(labels: np.ndarray, affine: np.ndarray, grid: SourceGrid) -> tuple[float, float]:
    """Return the offsets along the grid's normal that the NIfTI's labelled voxels span."""
    found = np.argwhere(labels > 0)
    if found.size == 0:
        return float(grid.offsets.min()), float(grid.offsets.max())
    lo, hi = found.min(axis=0), found.max(axis=0)
    corners = np.array(
        [[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])]
    )
    lps = (LPS_TO_RAS @ (affine[:3, :3] @ corners.T + affine[:3, 3:4])).T
    along = lps @ grid.normal
    return float(along.min()), float(along.max())


def compare_nifti_case(
    ours: Path,
    reference: Path,
    label_map: dict[int, str] | None = None,
    grid: SourceGrid | None = None,
) -> CaseMasks:
    """Score our SEG's segments against a NIfTI label volume of the same series.

    Parameters
    ----------
    ours : Path
        Our SEG.
    reference : Path
        The NIfTI; label value N is our segment number N unless ``label_map`` says
        which segment label each value is.
    label_map : dict[int, str], optional
        Segment label by NIfTI value (from :func:`parse_label_map`).
    grid : SourceGrid, optional
        The source series' grid (from its images); else taken from our SEG's frames
        and extended on their lattice over the NIfTI's labelled extent.

    Returns
    -------
    CaseMasks
        One comparison per paired segment, then all of them together.

    Raises
    ------
    EvaluationError
        If the files cannot be read, the NIfTI does not cover the series, or no label
        pairs with a segment.
    """
    seg = read_seg(ours)
    series, _ = _source(seg, ours)
    names = segment_names(seg)
    labels, affine = load_labels(reference)
    if label_map:
        by_label = {name.strip().lower(): number for number, name in names.items()}
        pairs = []
        for value, name in sorted(label_map.items()):
            if name.strip().lower() not in by_label:
                raise EvaluationError(
                    f"--label-map names {name!r}, not a segment of {ours} "
                    f"(segments: {', '.join(names.values())})"
                )
            pairs.append((value, by_label[name.strip().lower()]))
    else:
        present = {int(v) for v in np.unique(labels) if v > 0}
        pairs = [(n, n) for n in sorted(names)]
        if present and not present & set(names):
            raise EvaluationError(
                f"{reference}: no label value ({sorted(present)}) is a segment number of {ours} "
                f"({sorted(names)}); pair them with --label-map"
            )
    if grid is None:
        grid = grid_from_seg(seg)
        if grid is None:
            raise EvaluationError(
                f"{ours}: no frames with geometry to place {reference} on; "
                "give the source images with --images"
            )
        grid = grid.extended(*_extent(labels, affine, grid))
    elif grid.series_uid != series:
        raise EvaluationError(f"{ours} segments series {series}, the images are {grid.series_uid}")
    sampled = sample_labels(labels, affine, grid, reference)
    ours_masks = stack_segments(seg, grid.sop_uids, [n for _, n in pairs])
    reference_masks = np.stack([sampled == value for value, _ in pairs], axis=-1)
    results = score_masks(
        series, [names[n] for _, n in pairs], ours_masks, reference_masks, grid.spacing,
        list(grid.offsets),
    )  # fmt: skip
    return CaseMasks(
        results,
        np.any(ours_masks, axis=-1),
        np.any(reference_masks, axis=-1),
        grid.sop_uids,
        grid.files,
    )
