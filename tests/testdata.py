"""The real test data kept in the repository, under ``tests/data``.

The CT images of the LIDC-IDRI cases are stored as JPEG-LS lossless to keep the
checkout small; :func:`restore_series` gives back the original files (Explicit VR
Little Endian, byte for byte as TCIA published them), which is what the tests and
benchmarks that send or parse raw files expect. ``tests/data/ATTRIBUTION.md`` says
where every file comes from and under which licence.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

import pydicom
from pydicom.uid import JPEGLSLossless

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
CT = DATA / "ct"
MAKE_CT = DATA / "make_ct.py"  # writes a synthetic CT series of any size (load tests)


def restore_file(source: Path, dest: Path) -> None:
    """Write ``source`` to ``dest`` as it was before it was compressed.

    A JPEG-LS lossless file is decoded back to Explicit VR Little Endian, keeping
    every UID (``tests/data/compress.py`` proves the result equals the original
    byte for byte); any other file is copied unchanged.

    Parameters
    ----------
    source : Path
        A file under ``tests/data``.
    dest : Path
        Where to write the original.
    """
    if source.suffix == ".dcm":
        ds = pydicom.dcmread(source)
        if ds.file_meta.TransferSyntaxUID == JPEGLSLossless:
            ds.decompress(generate_instance_uid=False)
            ds.save_as(dest)
            return
    shutil.copyfile(source, dest)


def restore_series(source: Path, dest: Path) -> Path:
    """Restore every file of a data folder (images and readers' XML) into ``dest``.

    Parameters
    ----------
    source : Path
        A case folder, e.g. ``tests/data/ct/LIDC-IDRI-0001``.
    dest : Path
        The folder to fill; made if missing.

    Returns
    -------
    Path
        ``dest``, holding the same file names as ``source``.
    """
    dest.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.iterdir()):
        if path.is_file():
            restore_file(path, dest / path.name)
    return dest


def restored_case(case: str) -> Path:
    """Restore a case of ``tests/data/ct`` into a new temporary folder, removed at exit.

    For benchmarks and scripts, which have no pytest fixtures.

    Parameters
    ----------
    case : str
        The case folder's name, e.g. ``"LIDC-IDRI-0001"``.

    Returns
    -------
    Path
        The temporary folder with the case's original files.
    """
    folder = Path(tempfile.mkdtemp(prefix=f"dicomnode-{case}-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return restore_series(CT / case, folder)
