"""pynetdicom's internals: one module uses them, all of them guarded, at the pinned version."""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import pkgutil
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pynetdicom
import pytest
from packaging.requirements import Requirement
from packaging.version import Version

import dicomnode
from dicomnode.dimse import compat
from dicomnode.errors import ConfigError

PACKAGE = Path(dicomnode.__file__).resolve().parent
REPO = PACKAGE.parent
COMPAT = PACKAGE / "dimse" / "compat.py"


# --- the start-up check ---------------------------------------------------------------


def test_the_installed_pynetdicom_is_the_tested_one() -> None:
    assert compat.problems() == []
    compat.check()  # does not raise


def test_another_pynetdicom_is_named_and_refused(
    monkeypatch: pytest.MonkeyPatch, make_listener
) -> None:
    monkeypatch.setattr(pynetdicom, "__version__", "3.1.0")
    with pytest.raises(ConfigError, match=r"version 3\.1\.0 \(tested: 3\.0\.x\).*<3\.1"):
        make_listener()


def test_a_missing_internal_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    import pynetdicom.fsm

    monkeypatch.delattr(pynetdicom.fsm, "AE_6")
    assert compat.problems() == ["no fsm.AE_6"]


def _owner(internal: compat.Internal) -> object:
    return compat.resolve(internal.owner)


class _Absent:
    """Hides an attribute a class inherits: reading it raises AttributeError."""

    def __get__(self, instance: object, owner: type | None = None) -> object:
        raise AttributeError("hidden by the test")


@pytest.mark.parametrize("internal", [i for i in compat.INTERNALS if not i.instance], ids=str)
def test_each_internal_missing_is_refused_by_name(
    monkeypatch: pytest.MonkeyPatch, internal: compat.Internal
) -> None:
    owner = _owner(internal)
    if internal.name in vars(owner):
        monkeypatch.delattr(owner, internal.name)
    else:  # inherited: socketserver's finish_request, Thread's run
        monkeypatch.setattr(owner, internal.name, _Absent(), raising=False)
    with pytest.raises(ConfigError) as raised:
        compat.check()
    message = str(raised.value)
    assert "\n" not in message
    assert f"no {internal}" in message
    assert f"pynetdicom {pynetdicom.__version__}" in message
    assert compat.REQUIREMENT in message


@pytest.mark.parametrize("internal", [i for i in compat.INTERNALS if i.instance], ids=str)
def test_each_instance_attribute_missing_is_refused_by_name(
    monkeypatch: pytest.MonkeyPatch, internal: compat.Internal
) -> None:
    # Instance attributes are looked for on instances that the check builds (and
    # throws away): take the attribute off those instances as pynetdicom makes them.
    cls = _owner(internal)
    assert isinstance(cls, type)
    init = cls.__init__

    def init_without(self: object, *args: object, **kwargs: object) -> None:
        init(self, *args, **kwargs)
        if isinstance(self, cls):
            object.__delattr__(self, internal.name)

    monkeypatch.setattr(cls, "__init__", init_without)
    with pytest.raises(ConfigError, match=f"no {internal}"):
        compat.check()


@pytest.mark.parametrize(
    "internal",
    [i for i in compat.INTERNALS if not i.instance and i.expect is not compat.ANYTHING],
    ids=str,
)
def test_each_internal_of_another_kind_is_refused_by_name(
    monkeypatch: pytest.MonkeyPatch, internal: compat.Internal
) -> None:
    # None too: it is what a piece set lazily would be, and no replacement of ours.
    monkeypatch.setattr(_owner(internal), internal.name, None)
    with pytest.raises(ConfigError, match=f"{internal} is not {internal.expect.text}"):
        compat.check()


@pytest.mark.parametrize(
    "internal",
    [i for i in compat.INTERNALS if i.instance and i.expect is not compat.ANYTHING],
    ids=str,
)
def test_each_instance_attribute_of_another_kind_is_refused_by_name(
    monkeypatch: pytest.MonkeyPatch, internal: compat.Internal
) -> None:
    cls = _owner(internal)
    assert isinstance(cls, type)
    init = cls.__init__

    def init_with_none(self: object, *args: object, **kwargs: object) -> None:
        init(self, *args, **kwargs)
        if isinstance(self, cls):
            object.__setattr__(self, internal.name, None)

    monkeypatch.setattr(cls, "__init__", init_with_none)
    with pytest.raises(ConfigError, match=f"{internal} is not {internal.expect.text}"):
        compat.check()


def test_each_internal_has_a_name_of_its_own() -> None:
    # What the check knows about is what it reports on: one missing piece each.
    labels = [str(i) for i in compat.INTERNALS]
    assert len(labels) == len(set(labels))


def test_a_replacement_of_ours_is_not_a_problem() -> None:
    # A second listener in the process checks again after the first one's patches.
    from dicomnode.dimse import reactor
    from dicomnode.listener import chunked

    reactor.install()
    chunked.install()
    assert compat.problems() == []


# --- the version range ------------------------------------------------------------------


def _pinned() -> Requirement:
    with (REPO / "pyproject.toml").open("rb") as f:
        project = tomllib.load(f)["project"]
    (pinned,) = [
        Requirement(d) for d in project["dependencies"] if Requirement(d).name == "pynetdicom"
    ]
    return pinned


def test_the_tested_range_is_the_one_pyproject_requires() -> None:
    pinned = _pinned()
    ours = Requirement(compat.REQUIREMENT)
    assert ours.name == pinned.name
    assert ours.specifier == pinned.specifier


def test_the_tested_minor_release_is_the_range() -> None:
    specifier = Requirement(compat.REQUIREMENT).specifier
    major, minor = (int(p) for p in compat.TESTED.split("."))
    assert Version(f"{major}.{minor}.0") in specifier
    assert Version(f"{major}.{minor}.99") in specifier
    assert Version(f"{major}.{minor + 1}.0") not in specifier
    assert Version(f"{major}.{minor - 1}.99") not in specifier if minor else True
    assert Version(pynetdicom.__version__) in specifier


# --- nobody else touches pynetdicom's internals -----------------------------------------


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _pynetdicom_modules() -> Iterator[str]:
    # Its own test suite, benchmarks and example apps are not the library.
    for info in pkgutil.walk_packages(pynetdicom.__path__, "pynetdicom."):
        if not any(part in {"tests", "benchmarks", "apps"} for part in info.name.split(".")):
            yield info.name


@functools.cache
def pynetdicom_private_names() -> frozenset[str]:
    """Every private name pynetdicom's own source defines or uses.

    Attribute names (``self._recv_pdu``, ``dul._recv_pdu``), function, method and
    class names, module-level names and private module names (``_config``). Names
    pynetdicom's classes only inherit from the standard library are not in it.
    """
    names: set[str] = set()
    for module_name in _pynetdicom_modules():
        names.update(p for p in module_name.split(".") if _private(p))
        module = importlib.import_module(module_name)
        source = inspect.getsource(module)
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Attribute):
                found = node.attr
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                found = node.name
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                found = node.id
            else:
                continue
            if _private(found):
                names.add(found)
    return frozenset(names)


@functools.cache
def class_private_names(cls: type) -> frozenset[str]:
    """Private names a pynetdicom class has, inherited ones included, and its instances'."""
    names = {n for n in dir(cls) if _private(n)}
    for klass in cls.__mro__:
        if not klass.__module__.startswith("pynetdicom"):
            continue
        for node in ast.walk(ast.parse(inspect.getsource(klass).strip() + "\n")):
            if (
                isinstance(node, ast.Attribute)
                and _private(node.attr)
                and isinstance(node.value, ast.Name)
                and node.value.id == "self"
            ):
                names.add(node.attr)
    return frozenset(names)


def _is_pynetdicom(module: str | None) -> bool:
    return module is not None and (module == "pynetdicom" or module.startswith("pynetdicom."))


class _Finder(ast.NodeVisitor):
    """Find where one module reaches into pynetdicom below its public API.

    It reports:

    * an import of a private pynetdicom name or module (``from pynetdicom import
      _config``, ``from pynetdicom.x import _y``, ``import pynetdicom._handlers``);
    * an attribute with one of pynetdicom's private names (``x._servers``,
      ``acse._negotiate_as_acceptor``), read, written or deleted, also through
      ``getattr``, ``setattr``, ``hasattr`` or ``delattr`` with the name spelled out.
      ``self._foo`` and ``cls._foo`` count only in a class derived from a pynetdicom
      class, and there only for a private name of that class (``self._lock`` of our
      own subclass is ours); ``module._foo`` of a dicomnode module is ours;
    * a private method of a pynetdicom base class defined again in a subclass;
    * a value set on (or deleted from) a pynetdicom module or class: a name bound
      to one by an import, or to an attribute or tuple of such names (``module =
      pynetdicom.dul``; ``for module in (pynetdicom.association, pynetdicom.dul)``).
      Calls are not followed: ``ae = AE(); ae.maximum_pdu_size = ...`` is the
      public API.
    """

    def __init__(self, tree: ast.Module) -> None:
        self.found: list[tuple[int, str]] = []
        self.ours: set[str] = set()  # names bound to dicomnode modules and their names
        self.theirs: dict[str, object] = {}  # names bound to pynetdicom modules/classes
        self._class_names: list[frozenset[str] | None] = []  # per enclosing class
        self._bind(tree)

    # Which names in the module are pynetdicom's, which are ours.
    def _bind(self, tree: ast.Module) -> None:
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    bound = alias.asname or alias.name.split(".")[0]
                    if _is_pynetdicom(alias.name):
                        self.theirs[bound] = importlib.import_module(
                            alias.name if alias.asname else "pynetdicom"
                        )
                    elif alias.name.split(".")[0] == "dicomnode":
                        self.ours.add(bound)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                for alias in node.names:
                    bound = alias.asname or alias.name
                    if _is_pynetdicom(node.module):
                        module = importlib.import_module(str(node.module))
                        self.theirs[bound] = getattr(module, alias.name, alias.name)
                    elif (node.module or "").split(".")[0] == "dicomnode":
                        self.ours.add(bound)
        # Plain aliases of those names, followed until nothing changes.
        changed = True
        while changed:
            changed = False
            for node in ast.walk(tree):
                targets: list[ast.expr] = []
                if isinstance(node, ast.Assign):
                    targets, value = node.targets, node.value
                elif isinstance(node, ast.AnnAssign) and node.value is not None:
                    targets, value = [node.target], node.value
                elif isinstance(node, ast.For):
                    targets, value = [node.target], node.iter
                else:
                    continue
                if not self._refers_to_theirs(value):
                    continue
                for name in (n for target in targets for n in _bound_names(target)):
                    if name not in self.theirs:
                        self.theirs[name] = value
                        changed = True

    def _refers_to_theirs(self, node: ast.expr) -> bool:
        if isinstance(node, ast.Name):
            return node.id in self.theirs
        if isinstance(node, ast.Attribute):
            return self._refers_to_theirs(node.value)
        if isinstance(node, ast.Tuple | ast.List):
            return any(self._refers_to_theirs(e) for e in node.elts)
        return False

    def _root(self, node: ast.expr) -> str | None:
        while isinstance(node, ast.Attribute):
            node = node.value
        return node.id if isinstance(node, ast.Name) else None

    def _report(self, node: ast.AST, what: str) -> None:
        self.found.append((getattr(node, "lineno", 0), what))

    def _private_on(self, receiver: ast.expr, name: str) -> bool:
        """Whether ``receiver.name`` is a pynetdicom private name, as the docstring says."""
        if not _private(name):
            return False
        if isinstance(receiver, ast.Name) and receiver.id in {"self", "cls"} and self._class_names:
            names = self._class_names[-1]
            return names is not None and name in names
        if isinstance(receiver, ast.Name) and receiver.id in self.ours:
            return False
        return name in pynetdicom_private_names()

    # Imports.
    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if _is_pynetdicom(alias.name) and any(_private(p) for p in alias.name.split(".")):
                self._report(node, f"import {alias.name}")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level == 0 and _is_pynetdicom(node.module):
            module = str(node.module)
            if any(_private(p) for p in module.split(".")):
                self._report(node, f"from {module} import ...")
            for alias in node.names:
                if _private(alias.name):
                    self._report(node, f"from {module} import {alias.name}")

    # Classes derived from pynetdicom's.
    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        names: set[str] = set()
        for base in node.bases:
            root = self._root(base)
            value = self.theirs.get(root) if root else None
            if root is None or value is None:
                continue
            for attr in _attribute_chain(base)[1:]:
                value = getattr(value, attr, None)
            if isinstance(value, type):
                names |= class_private_names(value)
        self._class_names.append(frozenset(names) if names else None)
        for item in node.body:
            if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef) and item.name in names:
                self._report(item, f"overrides {item.name}")
        self.generic_visit(node)
        self._class_names.pop()

    # Attributes.
    def visit_Attribute(self, node: ast.Attribute) -> None:
        if self._private_on(node.value, node.attr):
            self._report(node, f".{node.attr}")
        elif isinstance(node.ctx, ast.Store | ast.Del) and self._root(node.value) in self.theirs:
            self._report(node, f"sets {ast.unparse(node)}")
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        if (
            isinstance(node.func, ast.Name)
            and node.func.id in {"getattr", "setattr", "hasattr", "delattr"}
            and len(node.args) >= 2
        ):
            receiver, name = node.args[0], node.args[1]
            if (
                isinstance(name, ast.Constant)
                and isinstance(name.value, str)
                and self._private_on(receiver, name.value)
            ):
                self._report(node, f"{node.func.id}(..., {name.value!r})")
            elif node.func.id in {"setattr", "delattr"} and self._root(receiver) in self.theirs:
                self._report(node, f"{node.func.id}({ast.unparse(receiver)}, ...)")
        self.generic_visit(node)


def _bound_names(target: ast.expr) -> list[str]:
    """Names an assignment target binds: ``a``, ``a, b``; not ``self.a`` or ``a[0]``."""
    if isinstance(target, ast.Name):
        return [target.id]
    if isinstance(target, ast.Tuple | ast.List):
        return [name for e in target.elts for name in _bound_names(e)]
    if isinstance(target, ast.Starred):
        return _bound_names(target.value)
    return []


def _attribute_chain(node: ast.expr) -> list[str]:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return parts[::-1]


def internals_used(path: Path) -> list[tuple[int, str]]:
    """Return (line, what) for each place ``path`` uses pynetdicom below its public API."""
    tree = ast.parse(path.read_text(), str(path))
    finder = _Finder(tree)
    finder.visit(tree)
    return sorted(finder.found)


def test_only_compat_touches_pynetdicom_internals() -> None:
    found = [
        f"{path.relative_to(REPO)}:{line}: {what}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != COMPAT
        for line, what in internals_used(path)
    ]
    assert found == [], "pynetdicom internals outside dicomnode/dimse/compat.py:\n" + "\n".join(
        found
    )


def _touched(what: str) -> set[str]:
    """The names one finding of :func:`internals_used` is about."""
    if what.startswith("."):  # .name
        return {what[1:]}
    if what.startswith("sets "):  # sets owner.name
        return {what.rsplit(".", 1)[-1]}
    if what.startswith(("import ", "from ")):  # private modules and names
        return {w for part in what.split() for w in part.split(".") if _private(w)}
    if "'" in what:  # getattr(..., 'name')
        return {what.split("'")[1]}
    return {what.split()[-1]}  # overrides name; setattr(owner, ...) names no attribute


def test_compat_guards_every_internal_it_touches() -> None:
    # A private name compat uses, or a piece it replaces, without listing it in
    # INTERNALS would go unchecked at start-up.
    guarded = {i.name for i in compat.INTERNALS} | {
        part for i in compat.INTERNALS for part in i.owner.split(".")
    }
    used = set().union(*(_touched(what) for _, what in internals_used(COMPAT)))
    assert {"_create_association", "_recv_pdu", "_config"} <= used, (
        "the finder no longer sees what compat does"
    )
    assert used <= guarded, f"not in compat.INTERNALS: {sorted(used - guarded)}"


@pytest.mark.parametrize(
    ("source", "what"),
    [
        ("def f(ae):\n    return ae._servers\n", "._servers"),
        ("from pynetdicom.acse import _x\n", "from pynetdicom.acse import _x"),
        ("from pynetdicom import _config\n", "from pynetdicom import _config"),
        ("import pynetdicom._handlers\n", "import pynetdicom._handlers"),
        ("def f(assoc):\n    assoc.acse._negotiate_as_acceptor()\n", "._negotiate_as_acceptor"),
        ("def f(dul):\n    dul._recv_pdu.put(1)\n", "._recv_pdu"),
        (
            "def f(m):\n    return getattr(m, '_data_set_file', None)\n",
            "getattr(..., '_data_set_file')",
        ),
        (
            "from pynetdicom.transport import RequestHandler\n"
            "class H(RequestHandler):\n    def handle(self):\n"
            "        return self._create_association()\n",
            "._create_association",
        ),
        (
            "from pynetdicom.transport import RequestHandler\n"
            "class H(RequestHandler):\n    def _create_association(self):\n        pass\n",
            "overrides _create_association",
        ),
        (
            "from pynetdicom.transport import AssociationSocket\nAssociationSocket.recv = len\n",
            "sets AssociationSocket.recv",
        ),
        (
            "import pynetdicom.dul\nfor module in (pynetdicom.dul,):\n    module.time = None\n",
            "sets module.time",
        ),
        (
            "import pynetdicom.dul\nsetattr(pynetdicom.dul, 'time', None)\n",
            "setattr(pynetdicom.dul, ...)",
        ),
        ("from pynetdicom import dul\ndelattr(dul, 'time')\n", "delattr(dul, ...)"),
        (
            "from pynetdicom._handlers import debug_fsm\n",
            "from pynetdicom._handlers import ...",
        ),
    ],
)
def test_the_finder_sees_internals(tmp_path: Path, source: str, what: str) -> None:
    path = tmp_path / "m.py"
    path.write_text(source)
    assert what in [w for _, w in internals_used(path)]


@pytest.mark.parametrize(
    "source",
    [
        "class C:\n    def __init__(self):\n        self._servers = []\n        self._lock = 1\n",
        "from pynetdicom.transport import AssociationServer\n"
        "class S(AssociationServer):\n    def f(self):\n        self._lock = 1\n",
        "from pynetdicom import AE\nae = AE()\nae.maximum_pdu_size = 0\n",
        "from dicomnode.dimse import reactor\nreactor._poll((), 0)\n",
        "from pynetdicom import __version__\n",
        "import pynetdicom.dul\nclass C:\n    def __init__(self):\n"
        "        self.module = pynetdicom.dul\n        self.x = 1\n",
    ],
)
def test_the_finder_leaves_our_own_names_alone(tmp_path: Path, source: str) -> None:
    path = tmp_path / "m.py"
    path.write_text(source)
    assert internals_used(path) == []
