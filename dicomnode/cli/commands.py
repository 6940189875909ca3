"""Commands that are imported when they run, not when the parser is built.

``dicomnode --help`` and ``dicomnode jobs list`` must start in a fraction of a
second; importing every command's module up front (highdicom, scipy, pydicom,
alembic, torch through the node) took two. Each subcommand names its function as
``"module:function"``, and only the chosen one is imported.
"""

from __future__ import annotations

import argparse
import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dicomnode.config import Settings


class Command:
    """A subcommand's function, imported on its first call.

    Parameters
    ----------
    target : str
        ``"package.module:function"``; the function takes ``(settings, args)``.
    reads_dicom : bool
        Whether the command reads or writes DICOM files; logging then quietens
        pydicom before it runs (:func:`dicomnode.logs.keep_phi_out_of_logs`).
    """

    def __init__(self, target: str, *, reads_dicom: bool = False) -> None:
        self.target = target
        self.reads_dicom = reads_dicom

    def __repr__(self) -> str:
        return f"Command({self.target!r})"

    def __call__(self, settings: Settings, args: argparse.Namespace) -> int:
        """Import the function and run it.

        Parameters
        ----------
        settings : Settings
            The node's settings.
        args : argparse.Namespace
            The parsed command line.

        Returns
        -------
        int
            The command's exit code.
        """
        module, _, name = self.target.partition(":")
        fn = getattr(importlib.import_module(module), name)
        return int(fn(settings, args))
