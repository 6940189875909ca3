"""Several receiver processes on one port (listener.processes), on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from tests.conftest import wait_for
from tests.dcmtk import STORESCU
from tests.integration.node_process import NodeProcess, listener_port, write_config
from tests.testdata import MAKE_CT

pytestmark = pytest.mark.skipif(
    shutil.which(STORESCU) is None, reason="dcmtk is installed by .ci/run"
)

SENDERS, SLICES = 6, 40


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> list[list[Path]]:
    root = tmp_path_factory.mktemp("senders")
    for i in range(SENDERS):
        subprocess.run(
            [sys.executable, str(MAKE_CT), str(root / f"s{i}"),
             "--slices", str(SLICES), "--size", "128", "--seed", str(i)],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
    return [sorted((root / f"s{i}").glob("*.dcm")) for i in range(SENDERS)]


def receiver_pids(log: str) -> set[int]:
    return {int(m) for m in re.findall(r"receiver \d+ started pid=(\d+)", log)}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead too, however long its parent takes to reap it.
    return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"


def config_for(tmp_path: Path, db_url: str) -> Path:
    config = write_config(
        tmp_path, db_url=db_url, pacs_port=9, quiet_seconds=3600, listener_extra="processes = 3"
    )
    if not db_url.startswith("sqlite"):
        assert NodeProcess(config).cli("db", "upgrade").returncode == 0
    return config


def test_associations_spread_over_receivers(
    series: list[list[Path]], db_url: str, tmp_path: Path
) -> None:
    config = config_for(tmp_path, db_url)
    with NodeProcess(config, command="listen") as node:
        assert wait_for(lambda: len(receiver_pids(node.log())) == 2)
        senders = [
            subprocess.Popen(
                [
                    STORESCU,
                    "-aec",
                    "DICOMNODE",
                    "-to",
                    "20",
                    "127.0.0.1",
                    str(listener_port(config)),
                    *map(str, files),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for files in series
        ]
        assert [s.wait(120) for s in senders] == [0] * SENDERS
        children = receiver_pids(node.log())
        assert node.stop() == 0
    accepted = {int(p) for p in re.findall(r"association accepted .* pid=(\d+)", node.log())}
    assert len(accepted) >= 2  # 6 associations over 3 processes: not all in one
    assert not any(alive(pid) for pid in children)  # SIGTERM reached the children too
    engine = create_engine(db_url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM instances")).scalar() == SENDERS * SLICES
    engine.dispose()


def test_receivers_leave_when_the_node_is_killed(db_url: str, tmp_path: Path) -> None:
    config = config_for(tmp_path, db_url)
    node = NodeProcess(config, command="listen")
    with node:
        assert wait_for(lambda: len(receiver_pids(node.log())) == 2)
        children = receiver_pids(node.log())
        assert node.proc is not None
        node.proc.send_signal(signal.SIGKILL)
        node.proc.wait(10)
        # Orphaned receivers must not go on accepting images without their node.
        assert wait_for(lambda: not any(alive(pid) for pid in children), timeout=15)
