"""Conformance checks of the objects we write, before they leave the node."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from dicomnode.errors import PermanentJobError

DCIODVFY = "dciodvfy"


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


_QUOTED = re.compile(r"= <([^>]*)>")


def redact(line: str) -> str:
    """Remove the values dciodvfy quotes, which may be patient data; keep numbers.

    Parameters
    ----------
    line : str
        A dciodvfy message, e.g. ``... Value invalid for this VR [SH] = <ABC> - ...``.

    Returns
    -------
    str
        The message with every non-numeric ``= <value>`` replaced by ``= <...>``.
    """
    return _QUOTED.sub(lambda m: m.group(0) if m.group(1).isdigit() else "= <...>", line)


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
        True if a validator ran (and found no errors), False if none ran.

    Raises
    ------
    PermanentJobError
        If the validator reports errors (the first is quoted), or if ``dciodvfy``
        is required but not installed.
    """
    if mode == "off":
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
