"""Conformance checks of the objects we write, before they leave the node.

Two layers: our own checks, which always run (the file reads back, its meta agrees
with its dataset, highdicom parses it as the IOD it claims to be, and its frames
decode), and dicom3tools' ``dciodvfy``, which checks every module against the
standard where it is installed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import pydicom
from pydicom.uid import UID

from dicomnode.errors import PermanentJobError

DCIODVFY = "dciodvfy"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
LABELMAP_SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.7"
SR_CLASSES = {"1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.88.34"}
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7.4"  # our overlay: Multi-frame True Color SC
# IODs newer than the dciodvfy in Debian (Label Map Segmentation, Sup 243): it answers
# "Information Object Not found", so only our own checks apply to them.
UNKNOWN_TO_DCIODVFY = {LABELMAP_SEG_CLASS}


def own_check_errors(path: Path) -> list[str]:
    """Check an object we wrote without external tools; return what is wrong.

    Parameters
    ----------
    path : Path
        The DICOM file.

    Returns
    -------
    list[str]
        One line per problem (no values that could be patient data); empty when fine.
    """
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:
        return [f"unreadable: {type(exc).__name__}"]
    errors = []
    meta = ds.get("file_meta")
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        value = str(ds.get(keyword, ""))
        if not value or not UID(value).is_valid:
            errors.append(f"{keyword} missing or not a valid UID")
    if meta is None or str(meta.get("MediaStorageSOPClassUID", "")) != str(ds.get("SOPClassUID")):
        errors.append("file meta MediaStorageSOPClassUID differs from SOPClassUID")
    if meta is None or str(meta.get("MediaStorageSOPInstanceUID", "")) != str(
        ds.get("SOPInstanceUID")
    ):
        errors.append("file meta MediaStorageSOPInstanceUID differs from SOPInstanceUID")
    if errors:
        return errors
    sop_class = str(ds.SOPClassUID)
    try:
        if sop_class in (SEG_CLASS, LABELMAP_SEG_CLASS):
            seg = hd.seg.Segmentation.from_dataset(ds, copy=False)
            frames = int(seg.get("NumberOfFrames", 0))
            if frames != len(seg.PerFrameFunctionalGroupsSequence):
                errors.append("NumberOfFrames differs from the per-frame functional groups")
            elif frames and seg.pixel_array.size != frames * int(seg.Rows) * int(seg.Columns):
                # pydicom drops the frame axis of a single frame, so count pixels.
                errors.append("pixel data does not hold NumberOfFrames frames")
        elif sop_class in SR_CLASSES:
            hd.sr.srread(path)
        elif sop_class == SC_CLASS:
            if int(ds.SamplesPerPixel) != 3 or ds.PhotometricInterpretation != "RGB":
                errors.append("the overlay is not RGB")
            frames = int(ds.get("NumberOfFrames", 1) or 1)
            if ds.pixel_array.size != frames * int(ds.Rows) * int(ds.Columns) * 3:
                errors.append("pixel data does not hold NumberOfFrames frames")
    except Exception as exc:  # highdicom raises many kinds for malformed objects
        errors.append(f"does not parse as its IOD: {type(exc).__name__}")
    return errors


def dciodvfy_errors(path: Path) -> list[str]:
    """Run dicom3tools' ``dciodvfy`` on a file and return its error lines.

    Parameters
    ----------
    path : Path
        The DICOM file.

    Returns
    -------
    list[str]
        Lines starting with ``Error``; warnings are not errors.

    Raises
    ------
    FileNotFoundError
        If ``dciodvfy`` is not installed.
    """
    exe = shutil.which(DCIODVFY)
    if exe is None:
        raise FileNotFoundError(DCIODVFY)
    proc = subprocess.run(
        [exe, "-new", str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    lines = (proc.stdout + proc.stderr).splitlines()
    return [line.strip() for line in lines if line.startswith("Error")]


# dciodvfy quotes values in several ways: ``= <value>``, ``value is <value>``,
# ``<a> != <b>``, a character as ``'c' (0x63)`` and a few strings in double quotes.
# Anything quoted may be patient data, digits included (a birth date, a numeric
# patient ID), so every quote is removed except two kinds that never are: the
# attribute's path (``</PatientID(0010,0020)[1]>``) and a length dciodvfy counted
# (``Length invalid for this VR = <17>``). A value may itself hold ``>``, even
# ``> - `` (seen: ``= <Smith> Jo> - ...``), and nothing tells its end from a ``>``
# inside it; so a value's quote runs to the *last* ``>`` of the line that ends a
# quote (before `` - `` or the end), stopping only at the length dciodvfy counted
# for that value. That may hide a second quote's text too: more hidden, not less.
_ATTRIBUTE_PATH = re.compile(r"<((?:/[A-Za-z0-9]*\([0-9A-Fa-f]{4},[0-9A-Fa-f]{4}\)(?:\[\d+\])?)+)>")
_QUOTE_END = re.compile(r">(?= - |\s*$)")
_OTHER_QUOTES = re.compile(r"'[^']*'|\"[^\"]*\"|\(0x[0-9A-Fa-f]+\)")
_LENGTH_BEFORE = re.compile(r"(?:[Ll]ength invalid for this VR = |[Ll]ength is )$")
_OTHER_REDACTED = {"'": "'...'", '"': '"..."', "(": "(0x..)"}
_COUNTED_NEXT = "> - Length invalid for this VR = <"


def redact(line: str) -> str:
    """Remove every value dciodvfy quotes, which may be patient data.

    Parameters
    ----------
    line : str
        A dciodvfy message, e.g. ``... Value invalid for this VR [SH] = <ABC> - ...``.

    Returns
    -------
    str
        The message with each quoted value replaced: ``<...>``, ``'...'``,
        ``"..."`` or ``(0x..)``; attribute paths and counted lengths are kept.
    """
    out, at = [], 0
    while (start := line.find("<", at)) >= 0:
        out.append(line[at:start])
        path = _ATTRIBUTE_PATH.match(line, start)
        if path is not None:
            out.append(path.group(0))
            at = path.end()
            continue
        # The last quote end, but not past dciodvfy's own counted length that
        # follows a value it measured (``= <1987011> - Length invalid ... = <7>``).
        counted_at = line.find(_COUNTED_NEXT, start)
        ends = [
            m.start()
            for m in _QUOTE_END.finditer(line, start + 1)
            if counted_at < 0 or m.start() <= counted_at
        ]
        end = ends[-1] if ends else len(line)
        value = line[start + 1 : end]
        counted = value.isdigit() and _LENGTH_BEFORE.search(line, 0, start)
        out.append(f"<{value}>" if counted else "<...>")
        at = end + 1
    out.append(line[at:])
    return _OTHER_QUOTES.sub(lambda m: _OTHER_REDACTED[m.group(0)[0]], "".join(out))


def validate_file(path: Path, mode: str) -> bool:
    """Check a file we are about to send.

    Parameters
    ----------
    path : Path
        The object.
    mode : str
        ``auto`` (dciodvfy when installed), ``dciodvfy`` (required) or ``off``.

    Returns
    -------
    bool
        True if ``dciodvfy`` ran (and found no errors); False if only our own checks
        did (dciodvfy missing, or an IOD it does not know) or nothing did (``off``).

    Raises
    ------
    PermanentJobError
        If a check reports errors (the first is quoted), or if ``dciodvfy`` is
        required but not installed.
    """
    if mode == "off":
        return False
    own = own_check_errors(path)
    if own:
        more = f" (and {len(own) - 1} more)" if len(own) > 1 else ""
        raise PermanentJobError(f"{path.name} failed our checks: {own[0]}{more}")
    sop_class = str(pydicom.dcmread(path, stop_before_pixels=True).SOPClassUID)
    if sop_class in UNKNOWN_TO_DCIODVFY:
        return False
    try:
        errors = dciodvfy_errors(path)
    except FileNotFoundError:
        if mode == "dciodvfy":
            raise PermanentJobError(
                "outputs.validate is dciodvfy but it is not installed"
            ) from None
        return False
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise PermanentJobError(f"{path.name} failed validation: {redact(errors[0])}{more}")
    return True
