"""Receive speed: dicomnode (durable: fsync + database row) against storescp and Orthanc.

For each number of concurrent associations it runs, in this order and on this machine:

1. dcmtk's ``storescp`` writing to a temporary folder with ``TCP_NODELAY=1`` (the
   floor; ``--fork`` so it also takes concurrent associations). It does not
   fsync, so its files are in the page cache, not on disk, when it says "stored";
2. Orthanc (Debian's package, files and its SQLite index, ``TCP_NODELAY=1``), the
   PACS a site might route to instead, with its default settings;
3. ``dicomnode listen`` on a fresh database and spool, where every success means
   the file was fsynced, renamed, its folder fsynced and its row committed.

Both are fed by dcmtk's ``storescu`` (one process per association) with the same
synthetic CT series made by ``tests/data/make_ct.py``. It prints instances/s
for each, the ratios dicomnode / Orthanc and dicomnode / storescp, and the node's
peak resident memory and CPU time (user + system, receiver processes included) per
instance: the figure to cut, steadier than a rate on a shared VM.
Each figure is the median of ``--repeat`` runs.

Usage::

    python bench/ingest.py [--slices 300] [--size 512] [--concurrency 1 4 8]
                           [--repeat 3] [--database URL] [--processes N]

``--database`` takes a PostgreSQL URL (a fresh database is made and dropped per
run); the default is SQLite in the run's temporary folder.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sqlalchemy import create_engine, text  # noqa: E402

from tests.conftest import free_port, fresh_pg_database, memory_bytes  # noqa: E402
from tests.dcmtk import STORESCP, STORESCU  # noqa: E402
from tests.integration.node_process import NodeProcess, write_config  # noqa: E402
from tests.integration.orthanc import Orthanc  # noqa: E402
from tests.testdata import MAKE_CT  # noqa: E402

ENV = {**os.environ, "TCP_NODELAY": "1"}  # dcmtk: no Nagle on either side


def make_series(folder: Path, count: int, slices: int, size: int) -> list[list[Path]]:
    series = []
    for i in range(count):
        out = folder / f"series{i}"
        if not out.is_dir():
            subprocess.run(
                [sys.executable, str(MAKE_CT), str(out), "--slices", str(slices),
                 "--size", str(size), "--seed", str(i)],
                check=True, capture_output=True,
            )  # fmt: skip
        series.append(sorted(out.glob("*.dcm")))
    return series


def send_all(port: int, aet: str, series: list[list[Path]]) -> float:
    """Run one storescu per series at once; return the wall time until all finished."""
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            [
                STORESCU,
                "-aec",
                aet,
                "-to",
                "30",
                "-td",
                "60",
                "127.0.0.1",
                str(port),
                *map(str, files),
            ],
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for files in series
    ]
    failures = [p for p in procs if p.wait(600) != 0]
    elapsed = time.perf_counter() - started
    if failures:
        raise RuntimeError(f"storescu failed: {failures[0].stderr.read().decode()[-500:]}")
    return elapsed


def wait_for_port(port: int, timeout: float = 20) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def run_storescp(series: list[list[Path]], workdir: Path) -> float:
    out = workdir / f"storescp-{uuid.uuid4().hex[:6]}"
    out.mkdir()
    port = free_port()
    mode = ["--fork"] if len(series) > 1 else []
    scp = subprocess.Popen(
        [STORESCP, *mode, "-od", str(out), str(port)],
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_port(port)
        elapsed = send_all(port, "STORESCP", series)
    finally:
        scp.terminate()
        scp.wait(10)
    stored = sum(1 for _ in out.iterdir())
    expected = sum(map(len, series))
    if stored != expected:
        raise RuntimeError(f"storescp stored {stored} of {expected}")
    settle(out)
    return elapsed


def run_orthanc(series: list[list[Path]], workdir: Path) -> float:
    run = workdir / f"orthanc-{uuid.uuid4().hex[:6]}"
    with Orthanc(run, aet="ORTHANC", env=ENV) as pacs:
        elapsed = send_all(pacs.dicom_port, "ORTHANC", series)
        stored = pacs.get("/statistics")["CountInstances"]
    expected = sum(map(len, series))
    if stored != expected:
        raise RuntimeError(f"Orthanc stored {stored} of {expected}")
    settle(run)
    return elapsed


def settle(folder: Path) -> None:
    """Delete a run's files and flush the disk, so the next run starts even.

    storescp leaves its files dirty in the page cache; on ext4 the next fsync (ours)
    would wait for all of them to reach the disk and be charged for its work.
    """
    shutil.rmtree(folder)
    os.sync()


@contextmanager
def database(url: str | None, workdir: Path) -> Iterator[str]:
    if url is None:
        yield f"sqlite:///{workdir / f'node-{uuid.uuid4().hex[:6]}.db'}"
        return
    with fresh_pg_database(url, prefix="dicomnode_bench") as fresh:
        yield fresh


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its living children (receiver processes)."""
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    total = (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            for child in (task / "children").read_text().split():
                with contextlib.suppress(OSError):
                    total += cpu_seconds(int(child))
    return total


def run_dicomnode(
    series: list[list[Path]], workdir: Path, db: str | None, processes: int
) -> tuple[float, int, float]:
    run = workdir / f"node-{uuid.uuid4().hex[:6]}"
    run.mkdir()
    with database(db, run) as url:
        if not url.startswith("sqlite"):
            subprocess.run(
                [sys.executable, "-m", "dicomnode", "--config",
                 str(write_config(run, db_url=url, pacs_port=9)), "db", "upgrade"],
                check=True, capture_output=True,
            )  # fmt: skip
        config = write_config(
            run,
            db_url=url,
            pacs_port=9,
            quiet_seconds=3600,
            listener_extra=f"processes = {processes}",
        )
        with NodeProcess(config, command="listen") as node:
            assert node.proc is not None
            port = int(config.read_text().split("port = ", 1)[1].split()[0])
            cpu = cpu_seconds(node.proc.pid)
            elapsed = send_all(port, "DICOMNODE", series)
            cpu = cpu_seconds(node.proc.pid) - cpu
            rss = memory_bytes(node.proc.pid)  # the parent; children are smaller
        engine = create_engine(url)
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT count(*) FROM instances")).scalar()
        engine.dispose()
    expected = sum(map(len, series))
    files = sum(1 for _ in (run / "spool" / "incoming").rglob("*.dcm"))
    if rows != expected or files != expected:
        raise RuntimeError(f"dicomnode kept {rows} rows and {files} files of {expected}")
    settle(run)
    return elapsed, rss, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--database", help="PostgreSQL admin URL; default SQLite")
    parser.add_argument("--processes", type=int, default=1, help="listener.processes")
    parser.add_argument("--data", type=Path, help="keep the generated series here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        workdir = Path(tmp)
        data = args.data or workdir / "data"
        series = make_series(data, max(args.concurrency), args.slices, args.size)
        os.sync()
        mib = sum(f.stat().st_size for f in series[0]) / 2**20
        db = "PostgreSQL" if args.database else "SQLite"
        print(f"{args.slices} x {args.size}x{args.size} CT per association ({mib:.0f} MiB); "
              f"dicomnode on {db}, {args.processes} receiver process(es); "
              f"median of {args.repeat}; {os.cpu_count()} CPUs")  # fmt: skip
        print(f"{'associations':>12} {'storescp/s':>11} {'orthanc/s':>10} {'dicomnode/s':>12} "
              f"{'x orthanc':>10} {'x storescp':>11} {'node peak RSS':>14} "
              f"{'node CPU ms/inst':>17}")  # fmt: skip
        for n in args.concurrency:
            chosen = series[:n]
            total = sum(map(len, chosen))
            ref, pacs, ours, rss, cpu = [], [], [], [], []
            for _ in range(args.repeat):
                ref.append(total / run_storescp(chosen, workdir))
                pacs.append(total / run_orthanc(chosen, workdir))
                elapsed, peak, seconds = run_dicomnode(
                    chosen, workdir, args.database, args.processes
                )
                ours.append(total / elapsed)
                rss.append(peak)
                cpu.append(seconds * 1000 / total)
            r, p, o = (statistics.median(x) for x in (ref, pacs, ours))
            print(f"{n:>12} {r:>11.0f} {p:>10.0f} {o:>12.0f} {o / p:>10.2f} {o / r:>11.2f} "
                  f"{max(rss) / 2**20:>11.0f} MiB {statistics.median(cpu):>17.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
