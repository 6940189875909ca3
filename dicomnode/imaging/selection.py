"""Series selection: which of a study's series a study-scope route runs on.

A CT study usually holds a localizer, a thin lung-kernel series and a thick
soft-tissue series (and often more: contrast phases, reformats, dose reports). A
route's ``match`` says which of them could do; :class:`~dicomnode.config.SeriesSelection`
says which one is best. This module judges series from facts the completion sweep
gathers (:class:`Candidate`) and returns the choice with its reasons, which the job
keeps so that ``jobs show`` can say why the model saw that series.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from dicomnode.config import Route, SeriesSelection
from dicomnode.imaging.routing import attribute_text, route_matches, value_matches
from dicomnode.imaging.volumetric import why_not_volumetric

AXIAL_DEGREES = 10.0  # the most a slice normal may lean from head-foot and be "axial"
POSITION_TOLERANCE_MM = 0.01  # two slices closer than this along the normal share a position


@dataclass(frozen=True)
class Candidate:
    """What the selection needs to know about one series of the study.

    Attributes
    ----------
    series_uid : str
        Its Series Instance UID.
    header : Dataset
        One instance's header (routing and preferences read it).
    instances : int
        How many instances it has.
    positions : np.ndarray or None
        Every slice's position (n x 3, mm), when they were read (``distinct_positions``).
    """

    series_uid: str
    header: Dataset
    instances: int
    positions: np.ndarray | None = None

    @property
    def series_number(self) -> int | None:
        """Return the Series Number, or None."""
        try:
            value = self.header.get("SeriesNumber")
            return None if value in (None, "") else int(value)
        except (TypeError, ValueError):
            return None

    @property
    def slices(self) -> int:
        """Return the slice count: instances, or frames of a multi-frame instance."""
        try:
            frames = int(self.header.get("NumberOfFrames", 1) or 1)
        except (TypeError, ValueError):
            frames = 1
        return self.instances * max(frames, 1)

    def normal(self) -> np.ndarray | None:
        """Return the slice normal, from Image Orientation (Patient), or None."""
        iop = self.header.get("ImageOrientationPatient")
        if iop is None:
            shared = self.header.get("SharedFunctionalGroupsSequence")
            try:
                iop = shared[0].PlaneOrientationSequence[0].ImageOrientationPatient
            except (TypeError, IndexError, AttributeError):
                return None
        try:
            values = [float(v) for v in iop]
        except (TypeError, ValueError):
            return None
        if len(values) != 6:
            return None
        normal = np.cross(values[:3], values[3:])
        norm = float(np.linalg.norm(normal))
        return normal / norm if norm > 1e-6 else None

    def tilt(self) -> float | None:
        """Return the angle between the slices' normal and head-foot, in degrees."""
        normal = self.normal()
        return None if normal is None else tilt_degrees(normal)

    def thickness(self) -> float | None:
        """Return the Slice Thickness in mm, else the spacing of the read positions."""
        value = self.header.get("SliceThickness")
        if value in (None, ""):
            shared = self.header.get("SharedFunctionalGroupsSequence")
            try:
                value = shared[0].PixelMeasuresSequence[0].SliceThickness
            except (TypeError, IndexError, AttributeError):
                value = None
        try:
            if value not in (None, "") and float(value) > 0:
                return float(value)
        except (TypeError, ValueError):
            pass
        gaps = self._gaps()
        return float(np.median(gaps)) if gaps is not None and gaps.size else None

    def repeated_positions(self) -> int | None:
        """Return how many slices share a position with another, or None when not read."""
        gaps = self._gaps()
        if gaps is None:
            return None
        return int(np.count_nonzero(gaps < POSITION_TOLERANCE_MM))

    def _gaps(self) -> np.ndarray | None:
        normal = self.normal()
        if self.positions is None or normal is None or len(self.positions) < 2:
            return None
        along = np.sort(self.positions @ normal)
        return np.diff(along)


def tilt_degrees(normal: np.ndarray) -> float:
    """Return the angle between a slice normal (unit vector, LPS) and head-foot, in degrees."""
    return math.degrees(math.acos(min(abs(float(normal[2])), 1.0)))


def read_positions(paths: Iterable[Path]) -> np.ndarray | None:
    """Return every slice's Image Position (Patient), ``(n, 3)`` mm; None if one lacks it.

    Only that element of each header is read, for ``distinct_positions``.
    """
    found = []
    for path in paths:
        try:
            ds = pydicom.dcmread(
                path, stop_before_pixels=True, specific_tags=["ImagePositionPatient"]
            )
            found.append([float(v) for v in ds.ImagePositionPatient])
        except Exception:  # unreadable, or no position: the positions are unknown
            return None
    return np.asarray(found, dtype=float) if found else None


def refusal(select: SeriesSelection, candidate: Candidate) -> str | None:
    """Return why ``candidate`` fails a required check of ``select``, or None.

    Parameters
    ----------
    select : SeriesSelection
        The route's selection.
    candidate : Candidate
        The series.

    Returns
    -------
    str or None
        A short reason without PHI, e.g. ``"5 mm slices, above 3 mm"``.
    """
    if candidate.slices < select.min_slices:
        return f"{candidate.slices} slices, fewer than {select.min_slices}"
    if select.axial:
        tilt = candidate.tilt()
        if tilt is None:
            return "no slice orientation"
        if tilt > AXIAL_DEGREES:
            return f"not axial ({tilt:.0f} degrees from head-foot)"
    if select.max_slice_thickness:
        thickness = candidate.thickness()
        if thickness is None:
            return "no slice thickness"
        if thickness > select.max_slice_thickness + 1e-6:
            return f"{thickness:g} mm slices, above {select.max_slice_thickness:g} mm"
    if select.distinct_positions:
        repeated = candidate.repeated_positions()
        if repeated is None:
            return "slice positions unknown"
        if repeated:
            return f"{repeated} slice(s) repeat a position"
    return None


def _met(select: SeriesSelection, candidate: Candidate) -> list[str]:
    """Return the preferences (keywords) ``candidate`` meets, in the route's order."""
    met = []
    for keyword, wanted in select.prefer.items():
        text = attribute_text(candidate.header, keyword)
        if text is not None and value_matches(text, wanted):
            met.append(keyword)
    return met


def _rank_key(select: SeriesSelection, candidate: Candidate) -> tuple[Any, ...]:
    met = set(_met(select, candidate))
    thickness = candidate.thickness()
    number = candidate.series_number
    return (
        *(keyword not in met for keyword in select.prefer),
        -candidate.slices,
        thickness if thickness is not None else math.inf,
        number if number is not None else math.inf,
        candidate.series_uid,
    )


def _describe(candidate: Candidate) -> dict[str, Any]:
    thickness = candidate.thickness()
    return {
        "series_uid": candidate.series_uid,
        "series_number": candidate.series_number,
        "slices": candidate.slices,
        "thickness_mm": None if thickness is None else round(thickness, 3),
    }


def choose(
    route: Route, candidates: Sequence[Candidate], unreadable: Sequence[str] = ()
) -> dict[str, Any]:
    """Judge every series of a study for ``route`` and pick its input.

    Parameters
    ----------
    route : Route
        A study-scope route: its ``match`` and ``select``.
    candidates : Sequence[Candidate]
        Every complete series of the study.
    unreadable : Sequence[str]
        Series Instance UIDs whose header could not be read: listed, never chosen.

    Returns
    -------
    dict[str, Any]
        ``chosen`` (a Series Instance UID, or None when none fits), ``why`` (one line),
        and ``series``: each series with its slices, thickness and ``verdict``
        (``chosen``, ``ranked N``, or why it was left out). No PHI: UIDs, counts and
        header codes only, as in the job history.
    """
    select = route.select
    judged: list[dict[str, Any]] = []
    fit: list[tuple[Candidate, dict[str, Any]]] = []
    for candidate in candidates:
        entry = _describe(candidate)
        judged.append(entry)
        if not route_matches(route, candidate.header):
            entry["verdict"] = "does not match the route"
        elif (why := why_not_volumetric(candidate.header, candidate.instances)) is not None:
            entry["verdict"] = f"not a volume ({why})"
        elif (why := refusal(select, candidate)) is not None:
            entry["verdict"] = f"refused: {why}"
        else:
            fit.append((candidate, entry))
    for uid in unreadable:
        judged.append(
            {
                "series_uid": uid,
                "series_number": None,
                "slices": 0,
                "thickness_mm": None,
                "verdict": "header unreadable",
            }
        )
    if not fit:
        return {"chosen": None, "why": f"no series fits ({len(judged)} judged)", "series": judged}
    fit.sort(key=lambda pair: _rank_key(select, pair[0]))
    for rank, (_, entry) in enumerate(fit, start=1):
        entry["verdict"] = "chosen" if rank == 1 else f"ranked {rank}"
    best, entry = fit[0]
    met = _met(select, best)
    reasons = [f"prefers {k}" for k in met] if select.prefer else []
    reasons.append(f"{best.slices} slices")
    if entry["thickness_mm"] is not None:
        reasons.append(f"{entry['thickness_mm']:g} mm")
    return {
        "chosen": best.series_uid,
        "why": f"best of {len(fit)} fitting series ({len(judged)} judged): " + ", ".join(reasons),
        "series": judged,
    }
