"""What ``dicomnode evaluate`` compares: our SEGs and findings, and the references.

Files are found by content, not by name (a folder may hold anything): DICOM SEGs by
their SOP class and source series, findings in JSON files and our SRs, references as
DICOM SEG, NIfTI label volumes or LIDC XML.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from dicomnode.errors import EvaluationError
from dicomnode.evaluate.detection import Finding
from dicomnode.evaluate.geometry import SourceGrid
from dicomnode.evaluate.lidc_reference import LidcCase, read_lidc
from dicomnode.evaluate.nifti import is_nifti
from dicomnode.evaluate.sr_findings import read_findings

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SR_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
}


def files_under(root: Path) -> list[Path]:
    """Return ``root`` itself if it is a file, else the files under it, sorted.

    Parameters
    ----------
    root : Path
        A file or a folder.

    Returns
    -------
    list[Path]
        The files.
    """
    return [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())


@dataclass
class OurFiles:
    """What our side holds, from one walk: SEGs by source series, and findings files.

    Attributes
    ----------
    segs : dict[str, Path]
        The SEG of each source Series Instance UID.
    findings : list[Path]
        JSON files and SRs, in file order (:func:`findings_in` reads them).
    """

    segs: dict[str, Path] = field(default_factory=dict)
    findings: list[Path] = field(default_factory=list)


def scan_ours(root: Path) -> OurFiles:
    """Sort the files under ``root`` (or ``root`` itself) by content, reading each once.

    Parameters
    ----------
    root : Path
        A file or a folder.

    Returns
    -------
    OurFiles
        The SEGs and the findings files; anything else is skipped, as a folder may
        hold anything.
    """
    found = OurFiles()
    for path in files_under(root):
        suffix = path.suffix.lower()
        if suffix == ".json":
            found.findings.append(path)
            continue
        if suffix == ".xml" or is_nifti(path):
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # not DICOM: skipped
            continue
        sop_class = str(ds.get("SOPClassUID", ""))
        if sop_class == SEG_CLASS and "ReferencedSeriesSequence" in ds:
            found.segs[str(ds.ReferencedSeriesSequence[0].SeriesInstanceUID)] = path
        elif sop_class in SR_CLASSES:
            found.findings.append(path)
    return found


def segs_by_series(root: Path) -> dict[str, Path]:
    """Find the SEG files under ``root`` (or ``root`` itself), keyed by source series.

    Parameters
    ----------
    root : Path
        A SEG file or a folder.

    Returns
    -------
    dict[str, Path]
        The SEG of each source Series Instance UID.

    Raises
    ------
    LookupError
        If there is none.
    """
    found = scan_ours(root).segs
    if not found:
        raise LookupError(f"no DICOM SEG found in {root}")
    return found


def parse_findings(data: Any, path: Path) -> dict[str, list[Finding]] | list[Finding]:
    """Read the findings of a parsed findings JSON file.

    Parameters
    ----------
    data : Any
        The parsed JSON: a list of findings, or an object of series UID -> list.
    path : Path
        The file, for the errors.

    Returns
    -------
    dict[str, list[Finding]] or list[Finding]
        As the file gave them.

    Raises
    ------
    EvaluationError
        If it is neither, or a finding lacks its center, diameter or probability.
    """

    def one(item: Any) -> Finding:
        try:
            center = np.asarray([float(v) for v in item["center"]], dtype=float)
            if center.shape != (3,):
                raise ValueError
            return Finding(center, float(item["diameter_mm"]), float(item["probability"]))
        except (KeyError, TypeError, ValueError):
            raise EvaluationError(
                f'{path}: a finding needs "center": [x, y, z], "diameter_mm" and "probability"'
            ) from None

    if isinstance(data, list):
        return [one(item) for item in data]
    if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()):
        return {str(uid): [one(item) for item in items] for uid, items in data.items()}
    raise EvaluationError(
        f"{path}: findings must be a JSON list of findings or an object of series UID -> list"
    )


def findings_for(ours_path: Path, grids: Mapping[str, SourceGrid]) -> dict[str, list[Finding]]:
    """Return the findings under ``ours_path`` by source series UID.

    The one place findings come from: a JSON file (a list, for the only case, under
    the key ""; or series UID -> list), a folder's JSON files, and our SR files
    (through :func:`read_findings`).

    Parameters
    ----------
    ours_path : Path
        A findings JSON file, an SR, or a folder holding them.
    grids : Mapping[str, SourceGrid]
        The source geometry by series UID, for the SRs.

    Returns
    -------
    dict[str, list[Finding]]
        By series UID; ``""`` holds a list that named no series.
    """
    return findings_in(scan_ours(ours_path).findings, grids)


def findings_in(paths: Iterable[Path], grids: Mapping[str, SourceGrid]) -> dict[str, list[Finding]]:
    """Read the findings of JSON files and our SRs (:attr:`OurFiles.findings`).

    Parameters
    ----------
    paths : Iterable[Path]
        JSON findings files and SRs.
    grids : Mapping[str, SourceGrid]
        The source geometry by series UID, for the SRs.

    Returns
    -------
    dict[str, list[Finding]]
        By series UID; ``""`` holds a list that named no series.

    Raises
    ------
    EvaluationError
        If a JSON file is not readable or not findings.
    """
    out: dict[str, list[Finding]] = {}
    for path in paths:
        if path.suffix.lower() != ".json":
            series, found = read_findings(path, grids)
            if series:
                out.setdefault(series, []).extend(found)
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise EvaluationError(f"{path}: not readable JSON ({exc})") from None
        parsed = parse_findings(data, path)
        if isinstance(parsed, list):
            out.setdefault("", []).extend(parsed)
        else:
            for uid, items in parsed.items():
                out.setdefault(uid, []).extend(items)
    return out


@dataclass
class References:
    """The references found, of one kind.

    Attributes
    ----------
    kind : str
        ``"seg"``, ``"nifti"`` or ``"lidc"``.
    segs : dict[str, Path]
        Reference SEGs by source series UID.
    niftis : list[Path]
        NIfTI label volumes.
    lidc : dict[str, LidcCase]
        LIDC cases by series UID.
    """

    kind: str
    segs: dict[str, Path] = field(default_factory=dict)
    niftis: list[Path] = field(default_factory=list)
    lidc: dict[str, LidcCase] = field(default_factory=dict)


def find_references(root: Path) -> References:
    """Find the references under ``root`` and decide their kind.

    Parameters
    ----------
    root : Path
        A reference file, or a folder of them.

    Returns
    -------
    references : References
        NIfTI if there is any, else LIDC XML if there is any, else SEG.

    Raises
    ------
    LookupError
        If there is no reference.
    EvaluationError
        If an XML file given alone, or every XML file of a folder, is not LIDC.
    """
    if root.is_file():
        if is_nifti(root):
            return References("nifti", niftis=[root])
        if root.suffix.lower() == ".xml":
            case = read_lidc(root)  # a single file that is not LIDC is an error
            return References("lidc", lidc={case.series_uid: case})
        return References("seg", segs=segs_by_series(root))
    files = files_under(root)
    niftis = [p for p in files if is_nifti(p)]
    if niftis:
        return References("nifti", niftis=niftis)
    xmls = [p for p in files if p.suffix.lower() == ".xml"]
    if xmls:
        cases: dict[str, LidcCase] = {}
        for path in xmls:
            try:
                case = read_lidc(path)
            except EvaluationError:
                continue  # other XML in the folder: skipped, as any other file
            cases[case.series_uid] = case
        if not cases:
            raise EvaluationError(f"{root}: no LIDC XML among its {len(xmls)} XML file(s)")
        return References("lidc", lidc=cases)
    try:
        return References("seg", segs=segs_by_series(root))
    except LookupError:
        raise LookupError(f"no reference (DICOM SEG, NIfTI or LIDC XML) found in {root}") from None
