"""The CLI starts without the heavy libraries: checked on the import graph, not on time.

``bench/cli.py`` measures the start-up time; this test keeps what makes it fast from
regressing: torch, monai, highdicom, pynetdicom (and scipy, pydicom, alembic, numpy)
are imported only by the commands that use them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("torch", "monai", "highdicom", "pynetdicom", "scipy", "pydicom", "alembic", "numpy")

# Parse and run the command in a fresh interpreter, then list what is loaded.
PROBE = """
import json, sys
from dicomnode.cli.main import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:  # --help
    code = exc.code
print(json.dumps({"code": code, "modules": sorted(sys.modules)}), file=sys.stderr)
"""


def _loaded(cwd: Path, *argv: str) -> tuple[int, set[str]]:
    code, modules = _modules(cwd, *argv)
    return code, {m.split(".")[0] for m in modules}


def _modules(cwd: Path, *argv: str) -> tuple[int, set[str]]:
    """Run the command in a fresh interpreter; its exit code and every module loaded."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    report = json.loads(done.stderr.strip().splitlines()[-1])
    return report["code"], set(report["modules"])


@pytest.fixture
def config(tmp_path: Path) -> str:
    path = tmp_path / "node.toml"
    path.write_text(
        f'[database]\nurl = "sqlite:///{tmp_path / "db.sqlite"}"\n[storage]\npath = "spool"\n'
    )
    from dicomnode.cli.main import main

    assert main(["--config", str(path), "db", "upgrade"]) == 0
    return str(path)


@pytest.mark.system
@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["jobs", "list"],
        ["status", "--no-listener"],
        ["jobs", "list", "--json"],
        ["studies", "list"],
    ],
    ids=lambda a: " ".join(a),
)
def test_light_commands_import_no_heavy_library(
    argv: list[str], config: str, tmp_path: Path
) -> None:
    code, modules = _loaded(tmp_path, *argv, *([] if argv == ["--help"] else ["-c", config]))
    assert code in (0, 1)  # status: 1 when this host's disk is below the watermark
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))


@pytest.mark.system
def test_jobs_show_draws_no_preview_code_without_preview(config: str, tmp_path: Path) -> None:
    # jobs show reads DICOM only for --preview: pydicom is set up, but the drawing
    # (highdicom, the preview modules) is left to the preview.
    code, modules = _modules(tmp_path, "jobs", "show", "1", "-c", config)
    assert code == 1  # no job 1 in the new database
    assert "highdicom" not in {m.split(".")[0] for m in modules}
    preview = {"dicomnode.cli.preview", "dicomnode.pipeline.preview", "dicomnode.outputs.preview"}
    assert not modules & preview, sorted(modules & preview)


@pytest.mark.system
def test_help_builds_every_parser_without_the_database_layer(tmp_path: Path) -> None:
    # The parser names each command's code, which is imported only when it runs.
    code, modules = _loaded(tmp_path, "--help")
    assert code == 0
    assert "sqlalchemy" not in modules


def test_the_parsers_states_are_the_database_states() -> None:
    from dicomnode.cli import subcommands
    from dicomnode.db import EVENTS, JobState
    from dicomnode.db.jobs import FINAL_STATES

    assert tuple(s.value for s in JobState) == subcommands.JOB_STATES
    assert set(subcommands.FINAL_STATE_NAMES) == {s.value for s in FINAL_STATES}
    assert subcommands.event_name("admin") == "admin" and "admin" in EVENTS
