"""Printing for the CLI: aligned tables for people, JSON for scripts."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import fields
from datetime import datetime
from typing import Any

from dicomnode import errors

# A view's patient data: read, and printed, only with --show-phi.
PHI_FIELDS = ("patient_id", "accession_number")


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def print_json(data: Any) -> None:
    """Print ``data`` as indented JSON (datetimes in ISO 8601).

    Parameters
    ----------
    data : Any
        JSON-serialisable data.
    """
    json.dump(data, sys.stdout, indent=2, default=_default)
    sys.stdout.write("\n")


def view_record(view: Any, *, show_phi: bool) -> dict[str, Any]:
    """Return a view's fields as a mapping, in their order: the keys ``--json`` prints.

    Shallow: a field holding views or tuples is left as it is, for the caller to
    replace with what ``--json`` prints of it.

    Parameters
    ----------
    view : dataclass
        A view of :mod:`dicomnode.db` with ``patient_id`` and ``accession_number``.
    show_phi : bool
        Keep ``patient_id`` and ``accession_number`` (``--show-phi``).

    Returns
    -------
    dict[str, Any]
        Field name to value.
    """
    record = {f.name: getattr(view, f.name) for f in fields(view)}
    if not show_phi:
        for name in PHI_FIELDS:
            del record[name]
    return record


def format_time(value: datetime | None) -> str:
    """Format a timestamp for a table, in UTC to the second.

    Parameters
    ----------
    value : datetime or None
        The time.

    Returns
    -------
    str
        ``YYYY-MM-DD HH:MM:SS`` or ``-``.
    """
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print rows under headers with aligned columns.

    Parameters
    ----------
    headers : Sequence[str]
        Column titles.
    rows : Sequence[Sequence[Any]]
        Cells; ``None`` prints as ``-``.
    """
    cells = [[("-" if c is None else str(c)) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    print(line.rstrip())
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def first_line(text: str | None) -> str | None:
    """Return the first non-empty line of a message, or None.

    Parameters
    ----------
    text : str or None
        A message, possibly of several lines.

    Returns
    -------
    str or None
        Its first line, stripped; None for no message.
    """
    return errors.first_line(text) or None if text else None


def format_size(size: int | None) -> str:
    """Format a byte count for a table.

    Parameters
    ----------
    size : int or None
        Bytes.

    Returns
    -------
    str
        ``512 B``, ``3.4 KiB``, ``12.0 MiB``, ``1.2 GiB``, or ``-``.
    """
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"  # not reached
