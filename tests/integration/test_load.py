"""Load: eight scanners sending 300 images each at once lose nothing and fail nothing.

`dicomnode listen` runs as its own process on SQLite and on PostgreSQL; eight dcmtk
storescu processes send eight 300-instance series concurrently. Every instance
must be acknowledged, on disk and in the database exactly once, and the node's
memory must stay bounded (datasets stream to disk; nothing accumulates).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from tests.conftest import memory_bytes
from tests.dcmtk import STORESCU
from tests.integration.node_process import NodeProcess, listener_port, write_config
from tests.testdata import MAKE_CT

pytestmark = pytest.mark.skipif(
    shutil.which(STORESCU) is None, reason="dcmtk is installed by .ci/run"
)

ASSOCIATIONS, SLICES, SIZE = 8, 300, 256


@pytest.fixture(scope="module")
def eight_series(tmp_path_factory: pytest.TempPathFactory) -> list[list[Path]]:
    root = tmp_path_factory.mktemp("load")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(MAKE_CT),
                str(root / f"s{i}"),
                "--slices",
                str(SLICES),
                "--size",
                str(SIZE),
                "--seed",
                str(i),
            ],
            stdout=subprocess.DEVNULL,
        )
        for i in range(ASSOCIATIONS)
    ]
    assert all(p.wait(300) == 0 for p in procs)
    return [sorted((root / f"s{i}").glob("*.dcm")) for i in range(ASSOCIATIONS)]


def test_eight_concurrent_associations(
    eight_series: list[list[Path]], db_url: str, tmp_path: Path
) -> None:
    config = write_config(tmp_path, db_url=db_url, pacs_port=9, quiet_seconds=3600)
    if not db_url.startswith("sqlite"):
        upgrade = NodeProcess(config).cli("db", "upgrade")
        assert upgrade.returncode == 0, upgrade.stderr
    with NodeProcess(config, command="listen") as node:
        assert node.proc is not None
        idle = memory_bytes(node.proc.pid) / 2**20
        senders = [
            subprocess.Popen(
                [
                    STORESCU,
                    "-aet",
                    f"CT{i:02d}",
                    "-aec",
                    "DICOMNODE",
                    "-to",
                    "30",
                    "-td",
                    "60",
                    "127.0.0.1",
                    str(listener_port(config)),
                    *map(str, files),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i, files in enumerate(eight_series)
        ]
        for sender in senders:
            assert sender.wait(300) == 0, sender.stderr.read() if sender.stderr else ""
        peak = memory_bytes(node.proc.pid) / 2**20
    print(f"node peak RSS {peak:.0f} MiB (idle {idle:.0f} MiB)")
    total = ASSOCIATIONS * SLICES
    engine = create_engine(db_url)
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT count(*), count(DISTINCT sop_instance_uid) FROM instances")
        )
        count, distinct = rows.one()
        per_series = conn.execute(text("SELECT instance_count FROM series")).scalars().all()
        paths = set(conn.execute(text("SELECT path FROM instances")).scalars())
    engine.dispose()
    assert count == distinct == total
    assert sorted(per_series) == [SLICES] * ASSOCIATIONS
    on_disk = {
        p.relative_to(tmp_path / "spool").as_posix()
        for p in (tmp_path / "spool" / "incoming").rglob("*.dcm")
    }
    assert on_disk == paths  # every row has its file, and no file lacks a row
    assert list((tmp_path / "spool" / "tmp").iterdir()) == []
    # 8 x 300 x 128 KiB went through; memory must not have grown with it.
    assert peak - idle < 150, f"peak RSS grew by {peak - idle:.0f} MiB"
