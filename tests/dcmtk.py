"""dcmtk's command-line tools, always by absolute path.

pynetdicom installs console scripts with dcmtk's names (``storescu``, ``storescp``,
``echoscu``, ...) into the virtual environment; with the venv activated a bare name
finds those, which take other options. Tests and benchmarks call dcmtk's own.
"""

from __future__ import annotations

import shutil
from pathlib import Path

BIN = Path("/usr/bin")  # where Debian's dcmtk package puts them


def tool(name: str) -> str:
    """The absolute path of a dcmtk tool, e.g. ``tool("storescu")``."""
    return str(BIN / name)


def installed(*names: str) -> bool:
    """Tell whether all the named dcmtk tools are there and executable."""
    return all(shutil.which(tool(name)) for name in names)


STORESCU = tool("storescu")
STORESCP = tool("storescp")
ECHOSCU = tool("echoscu")
