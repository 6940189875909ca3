"""Routing rules: which routes a series matches, judged from its DICOM header."""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from dicomnode.config import REGEX_PREFIX, Route


@lru_cache(maxsize=256)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def attribute_text(header: Dataset, keyword: str) -> str | None:
    r"""Return an attribute as text, multi-valued ones joined by a backslash.

    Parameters
    ----------
    header : Dataset
        The series' header (one instance's).
    keyword : str
        A DICOM keyword, e.g. ``Modality`` or ``ImageType``.

    Returns
    -------
    str or None
        The value, e.g. ``ORIGINAL\PRIMARY\AXIAL``, or None when absent or empty.
    """
    try:
        value = header.get(keyword)
    except Exception:  # an undecodable value cannot match anything
        return None
    if value is None or value == "":
        return None
    if isinstance(value, MultiValue | list):
        return "\\".join(str(v).strip() for v in value)
    return str(value).strip()


def value_matches(text: str, wanted: str | list[str]) -> bool:
    """Return whether ``text`` satisfies a rule value.

    Parameters
    ----------
    text : str
        The attribute's text.
    wanted : str or list of str
        An exact value, ``"re:"`` + a regular expression (searched, so anchor it with
        ``^...$`` for a full match), or a list of either (any may match).

    Returns
    -------
    bool
        True on a match.
    """
    if isinstance(wanted, list):
        return any(value_matches(text, w) for w in wanted)
    if wanted.startswith(REGEX_PREFIX):
        return _compiled(wanted[len(REGEX_PREFIX) :]).search(text) is not None
    return text == wanted


def route_matches(route: Route, header: Dataset) -> bool:
    """Return whether every rule of ``route`` holds for ``header``.

    Parameters
    ----------
    route : Route
        The route; an empty ``match`` matches every series.
    header : Dataset
        The series' header.

    Returns
    -------
    bool
        True when all rules match; a missing attribute never matches.
    """
    for keyword, wanted in route.match.items():
        text = attribute_text(header, keyword)
        if text is None or not value_matches(text, wanted):
            return False
    return True


def matching_routes(routes: Sequence[Route], header: Dataset) -> list[Route]:
    """Return the routes that apply to a series, in configuration order.

    Parameters
    ----------
    routes : Sequence[Route]
        All configured routes.
    header : Dataset
        The series' header.

    Returns
    -------
    list[Route]
        The matching routes.
    """
    return [r for r in routes if route_matches(r, header)]
