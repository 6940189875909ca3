"""``--config`` before or after the command, ``DICOMNODE_CONFIG``, and no files made by readers."""

from __future__ import annotations

import argparse
import ast
import importlib.util
from pathlib import Path

import pytest

from dicomnode.cli.commands import Command
from dicomnode.cli.main import config_path, main
from dicomnode.cli.parser import build_parser
from tests.unit.cli.test_main import one_line_error, run


def _leaf_commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _leaf_commands(sub, (*prefix, name))
            return
    yield prefix, parser


def test_every_command_takes_config_after_it() -> None:
    leaves = list(_leaf_commands(build_parser()))
    assert len(leaves) > 20
    for words, sub in leaves:
        options = {o for a in sub._actions for o in a.option_strings}
        assert {"-c", "--config"} <= options, words


def test_every_command_names_a_function_that_exists() -> None:
    # Commands are imported only when they run: a misspelt target would fail only then.
    # Read from the source, not imported, so that this stays light.
    for words, sub in _leaf_commands(build_parser()):
        command = sub.get_default("run")
        assert isinstance(command, Command), words
        module, _, name = command.target.partition(":")
        spec = importlib.util.find_spec(module)
        assert spec is not None and spec.origin, (words, module)
        tree = ast.parse(Path(spec.origin).read_text())
        functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert name in functions, (words, command.target)


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        (["--config", "before.toml", "status", "--config", "after.toml"], "env.toml", "after.toml"),
        (["status", "-c", "after.toml"], "env.toml", "after.toml"),
        (["--config", "before.toml", "status"], "env.toml", "before.toml"),
        (["status"], "env.toml", "env.toml"),
        (["status"], None, None),
        (["jobs", "list", "--config", "after.toml"], None, "after.toml"),
    ],
)
def test_precedence(argv: list[str], env: str | None, expected: str | None) -> None:
    args = build_parser().parse_args(argv)
    environ = {} if env is None else {"DICOMNODE_CONFIG": env}
    assert config_path(args, environ) == expected


def test_serve_accepts_config_after_the_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The reported case: `dicomnode serve --config x.toml` said "unrecognized arguments".
    # A missing file is reported as such: the option was accepted and read.
    code, _, err = run(capsys, "serve", "--config", str(tmp_path / "x.toml"))
    assert code == 2
    assert "x.toml: configuration file not found" in one_line_error(err)


@pytest.mark.system
def test_the_environment_names_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "env.toml"
    config.write_text(f'[database]\nurl = "sqlite:///{tmp_path / "db.sqlite"}"\n')
    monkeypatch.setenv("DICOMNODE_CONFIG", str(config))
    assert run(capsys, "db", "upgrade")[0] == 0
    assert (tmp_path / "db.sqlite").is_file()
    code, out, _ = run(capsys, "jobs", "list")
    assert code == 0 and out.strip() == "no jobs"


READ_ONLY = [
    ["status", "--no-listener"],
    ["jobs", "list"],
    ["jobs", "show", "1"],
    ["jobs", "show", "1", "--preview", "x.png"],
    ["studies", "list"],
    ["studies", "show", "1.2.3"],
    ["audit", "export"],
    ["destinations", "list"],
    ["models", "list"],
]


@pytest.mark.parametrize("argv", READ_ONLY, ids=lambda a: " ".join(a))
def test_read_only_commands_create_nothing(
    argv: list[str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DICOMNODE_CONFIG", raising=False)
    monkeypatch.delenv("DICOMNODE_DATABASE_URL", raising=False)
    code, _, err = run(capsys, *argv)
    assert list(tmp_path.iterdir()) == []  # no var/, no dicomnode.db, no spool
    if argv[0] in ("models", "destinations"):
        return  # they do not need the database (destinations list notes its absence)
    assert code == 2
    line = one_line_error(err)
    assert "no configuration given and no database at" in line
    assert "--config FILE (before or after the command) or set DICOMNODE_CONFIG" in line


@pytest.mark.system
def test_a_configured_database_that_is_missing_is_not_created(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "sub" / "node.db"
    config = tmp_path / "node.toml"
    config.write_text(f'[database]\nurl = "sqlite:///{db}"\n[storage]\npath = "spool"\n')
    code, _, err = run(capsys, "jobs", "list", "--config", str(config))
    assert code == 1
    assert f"database not found: {db}" in one_line_error(err)
    assert "run `dicomnode db upgrade`" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node.toml"]
    # The command meant to create it does.
    assert main(["db", "upgrade", "--config", str(config)]) == 0
    assert db.is_file()
