"""Lazy faces for the subpackages: names resolve to their home module on first use.

Each subpackage's ``__init__.py`` lists its public names (``__all__``) and the module
each lives in. Importing them all eagerly would make ``import dicomnode.db.events``
(which runs ``dicomnode/db/__init__.py`` first) load every module of the package, and
with them SQLAlchemy, pydicom or torch: the CLI's ``--help`` would pay for all of
them. PEP 562's module ``__getattr__`` loads a home module only when one of its
names is asked for.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    package: str, homes: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """Return a package's ``__getattr__`` and ``__dir__`` for the names in ``homes``.

    Parameters
    ----------
    package : str
        The package's ``__name__``.
    homes : Mapping[str, str]
        Public name -> the absolute name of the module that defines it.

    Returns
    -------
    tuple
        ``(__getattr__, __dir__)``, to assign at the package's top level.
    """

    def get_attribute(name: str) -> Any:
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(home), name)
        # Cached on the package, so the next lookup is an ordinary attribute.
        setattr(sys.modules[package], name, value)
        return value

    def list_names() -> list[str]:
        return sorted(set(homes) | set(vars(sys.modules[package])))

    return get_attribute, list_names
