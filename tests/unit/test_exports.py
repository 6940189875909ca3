"""Each subpackage's face: ``__all__`` names its public API and each name resolves."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

import dicomnode
from dicomnode.exports import lazy_exports

SUBPACKAGES = sorted(m.name for m in pkgutil.iter_modules(dicomnode.__path__) if m.ispkg)
LAZY = [
    name for name in SUBPACKAGES if hasattr(importlib.import_module(f"dicomnode.{name}"), "_HOMES")
]
# What a lazy face may import when it is imported: nothing of its own modules.
FACE_IMPORTS = {"__future__", "typing", "dicomnode.exports"}


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


def test_most_subpackages_have_lazy_faces() -> None:
    assert {"db", "evaluate", "outputs", "pipeline", "store"} <= set(LAZY)


@pytest.mark.parametrize("name", LAZY)
def test_a_lazy_face_imports_its_modules_for_the_type_checker_only(name: str) -> None:
    package = importlib.import_module(f"dicomnode.{name}")
    tree = ast.parse(Path(str(package.__file__)).read_text())
    eager: set[str] = set()
    typed: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            for imported in node.body:
                assert isinstance(imported, ast.ImportFrom) and imported.module, (name, imported)
                typed.update({alias.name: imported.module for alias in imported.names})
        elif isinstance(node, ast.ImportFrom):
            eager.add(str(node.module))
        elif isinstance(node, ast.Import):
            eager.update(alias.name for alias in node.names)
    assert eager <= FACE_IMPORTS, sorted(eager - FACE_IMPORTS)
    # What the type checker sees is what the loader resolves: each name from the same home.
    assert typed == package._HOMES


@pytest.fixture
def lazy_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A package ``lazyface`` of two modules, ``one`` and ``two``, behind a lazy face."""
    root = tmp_path / "lazyface"
    root.mkdir()
    (root / "__init__.py").write_text(
        "from dicomnode.exports import lazy_exports\n"
        "_HOMES = {'ONE': 'lazyface.one', 'TWO': 'lazyface.two'}\n"
        "__getattr__, __dir__ = lazy_exports(__name__, _HOMES)\n"
    )
    (root / "one.py").write_text("ONE = 1\n")
    (root / "two.py").write_text("TWO = 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "lazyface"
    for module in [m for m in sys.modules if m.split(".")[0] == "lazyface"]:
        del sys.modules[module]


def test_a_name_loads_its_home_module_alone_on_first_use(lazy_package: str) -> None:
    package: ModuleType = importlib.import_module(lazy_package)
    assert "lazyface.one" not in sys.modules and "lazyface.two" not in sys.modules
    assert {"ONE", "TWO"} <= set(dir(package))  # listed before they are loaded
    assert package.ONE == 1
    assert "lazyface.one" in sys.modules and "lazyface.two" not in sys.modules
    assert vars(package)["ONE"] == 1  # kept: the next lookup is an ordinary attribute
    from lazyface import TWO  # type: ignore[import-not-found]

    assert TWO == 2 and "lazyface.two" in sys.modules
