"""Argument types and options the commands share: ages, dates, counts, closed sets.

Each type raises :class:`argparse.ArgumentTypeError`, which the parser turns into a
one-line usage error (exit 2) naming the option and the bad value.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$", re.IGNORECASE)
WHEN_FORMS = "an ISO date or date-time (UTC unless it says otherwise) or an age such as 2h or 3d"


def closed_set(kind: str, values: Sequence[str]) -> Callable[[str], str]:
    """Return an argument type that accepts one of ``values``.

    Parameters
    ----------
    kind : str
        What the values are, for the error: ``job state``, ``audit event``, ...
    values : Sequence[str]
        The accepted values, listed in the error in this order.

    Returns
    -------
    Callable[[str], str]
        The type: the value itself, or ``unknown KIND 'x' (known: a, b)``.
    """
    known = tuple(values)

    def check(text: str) -> str:
        if text not in known:
            raise argparse.ArgumentTypeError(f"unknown {kind} {text!r} (known: {', '.join(known)})")
        return text

    check.__name__ = kind.replace(" ", "_")  # argparse names the type in some errors
    return check


def add_when(parser: argparse.ArgumentParser, flag: str, what: str, **kwargs: Any) -> None:
    """Add a date-or-age option such as ``--since`` (parsed by :func:`parse_since`).

    Parameters
    ----------
    parser : argparse.ArgumentParser
        The command's parser.
    flag : str
        ``--since``, ``--until``, ...
    what : str
        The help text before the forms, e.g. ``only jobs created since``.
    **kwargs : Any
        More ``add_argument`` keywords (``default``, ...).
    """
    parser.add_argument(
        flag, type=parse_since, metavar="WHEN", help=f"{what} WHEN: {WHEN_FORMS}", **kwargs
    )


def parse_duration(text: str) -> timedelta:
    """Parse an age such as ``90m``, ``2h``, ``3d`` or ``1w`` (for ``argparse``).

    Parameters
    ----------
    text : str
        A whole number and a unit: s, m, h, d or w.

    Returns
    -------
    timedelta
        The age.

    Raises
    ------
    argparse.ArgumentTypeError
        If it is not such an age (argparse turns it into a one-line usage error).
    """
    match = _DURATION.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(
            f"bad age {text!r}: expected a number and a unit s, m, h, d or w (e.g. 30d)"
        )
    return timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2).lower()])


def parse_since(text: str) -> datetime:
    """Parse a ``--since`` value: an ISO date or date-time, or an age back from now.

    A date or date-time without a time zone is taken as UTC, the time zone every
    timestamp of the CLI is printed in.

    Parameters
    ----------
    text : str
        ``2024-05-01``, ``2024-05-01T08:30``, ``2024-05-01 08:30:00+02:00``, or an age
        such as ``2h`` or ``3d``.

    Returns
    -------
    datetime
        The moment, aware, in UTC.

    Raises
    ------
    argparse.ArgumentTypeError
        If it is neither.
    """
    if _DURATION.match(text):
        return datetime.now(UTC) - parse_duration(text)
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"bad date {text!r}: expected an ISO date or date-time (2024-05-01, "
            "2024-05-01T08:30) or an age such as 2h or 3d"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def positive_int(text: str) -> int:
    """Check a count such as ``--limit`` (for ``argparse``).

    Parameters
    ----------
    text : str
        A whole number, at least 1.

    Returns
    -------
    int
        The number.

    Raises
    ------
    argparse.ArgumentTypeError
        If it is not.
    """
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value
