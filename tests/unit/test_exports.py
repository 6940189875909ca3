"""Each subpackage's face: ``__all__`` names its public API and each name resolves."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import dicomnode
from dicomnode.exports import lazy_exports

SUBPACKAGES = sorted(m.name for m in pkgutil.iter_modules(dicomnode.__path__) if m.ispkg)


def test_there_are_subpackages() -> None:
    assert {"db", "listener", "send", "store"} <= set(SUBPACKAGES)


@pytest.mark.parametrize("name", SUBPACKAGES)
def test_each_subpackage_names_its_public_api(name: str) -> None:
    package = importlib.import_module(f"dicomnode.{name}")
    assert package.__doc__, f"dicomnode.{name} has no docstring"
    public = package.__all__
    assert len(public) == len(set(public))
    # The lazy faces list each name twice, for readers and for the loader: the same.
    assert set(public) == set(getattr(package, "_HOMES", public))
    for attribute in public:
        value = getattr(package, attribute)
        home = getattr(value, "__module__", None)
        # Classes and functions say where they live; constants do not.
        if home is not None and home.startswith("dicomnode."):
            assert home.startswith(f"dicomnode.{name}."), (attribute, home)
        assert attribute in dir(package)


def test_an_unknown_name_is_an_attribute_error() -> None:
    get, _ = lazy_exports("dicomnode", {})
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        get("nothing")
