"""``dicomnode destinations``: being written (issue 7)."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    """Add this module's commands to the ``dicomnode`` parser.

    Parameters
    ----------
    sub : argparse._SubParsersAction
        The top-level subcommands.
    """
    _ = argparse
