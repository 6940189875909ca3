"""dicomnode: receive DICOM studies, run AI models on them, send SEG and SR results back."""

from __future__ import annotations

from functools import cache


@cache
def _version() -> str:
    # importlib.metadata costs tens of milliseconds to import and read: every CLI command
    # would pay for it at start-up, and only --version, the node and provenance need it.
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dicomnode")
    except PackageNotFoundError:  # running from a checkout that is not installed
        return "0.0.0+unknown"


def __getattr__(name: str) -> str:
    """Compute ``dicomnode.__version__`` on first use (PEP 562).

    Parameters
    ----------
    name : str
        The attribute asked for.

    Returns
    -------
    str
        The installed version, for ``__version__``.

    Raises
    ------
    AttributeError
        For any other name.
    """
    if name == "__version__":
        return _version()
    raise AttributeError(f"module 'dicomnode' has no attribute {name!r}")
