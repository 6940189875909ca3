"""Where the listener's time goes: py-spy samples ``dicomnode listen`` while it receives.

It starts ``dicomnode listen`` on a fresh SQLite database and spool (as
``bench/ingest.py`` does), attaches py-spy to it (every thread, native frames off,
without pausing the process), sends one synthetic CT series with dcmtk's
``storescu``, and stops the sampler when the send ends. It writes:

* ``--out``.svg: a flame graph (open it in a browser);
* ``--out``.txt: collapsed stacks, one line per stack with its sample count, the
  input of every flame-graph tool;

and prints the functions with the most samples on top of the stack (self time) and
in the stack at all (inclusive time), as shares of the listener's busy samples.
py-spy is not a dependency of the node: ``pip install py-spy``.

Usage::

    python bench/profile_ingest.py [--slices 300] [--size 512] [--out ingest-profile]
"""

from __future__ import annotations

import argparse
import collections
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from ingest import make_series, send_all  # noqa: E402

from tests.conftest import free_port  # noqa: E402
from tests.integration.node_process import NodeProcess, write_config  # noqa: E402

# Threads that wait are sampled too unless --idle is off (the default): what remains
# is where the listener works, which is what a receive-speed change must shrink.


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(found).exists():
        raise SystemExit("py-spy is not installed: pip install py-spy")
    return found


def record(pid: int, fmt: str, out: Path) -> subprocess.Popen[bytes]:
    sampler = subprocess.Popen(
        [py_spy(), "record", "--pid", str(pid), "--rate", "200", "--nonblocking",
         "--format", fmt, "--output", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    time.sleep(1.0)  # attached before the first association
    return sampler


def stop(sampler: subprocess.Popen[bytes]) -> None:
    sampler.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
    if sampler.wait(60) != 0:
        raise RuntimeError(f"py-spy failed: {sampler.stderr.read().decode()[-500:]}")  # type: ignore[union-attr]


def summarise(collapsed: Path, top: int) -> None:
    own: collections.Counter[str] = collections.Counter()
    anywhere: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        # "function (path/file.py:123)" -> "function (file.py)": per function, not per line.
        frames = [
            f"{f.split(' (')[0]} ({Path(f.rsplit(' (', 1)[-1].rsplit(':', 1)[0]).name})"
            for f in stack.split(";")
        ]
        if not frames:
            continue
        n = int(count)
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            anywhere[frame] += n
    # py-spy leaves out threads it sees idle, but a thread in poll() or on a lock that
    # releases the GIL late can still count: read the waits at the top as waiting.
    print(f"{total} samples of non-idle threads")
    for title, counter in (("self", own), ("inclusive", anywhere)):
        print(f"\n{title}:")
        for frame, n in counter.most_common(top):
            print(f"  {100 * n / total:5.1f}%  {frame}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--out", type=Path, default=Path("ingest-profile"))
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="profile-ingest-") as tmp:
        workdir = Path(tmp)
        (series,) = make_series(workdir / "data", 1, args.slices, args.size)
        for fmt, suffix in (("raw", ".txt"), ("flamegraph", ".svg")):
            run = workdir / f"node-{fmt}"
            run.mkdir()
            config = write_config(
                run,
                db_url=f"sqlite:///{run / 'node.db'}",
                pacs_port=free_port(),
                quiet_seconds=3600,
            )
            port = int(config.read_text().split("port = ", 1)[1].split()[0])
            with NodeProcess(config, command="listen") as node:
                assert node.proc is not None
                sampler = record(node.proc.pid, fmt, args.out.with_suffix(suffix))
                elapsed = send_all(port, "DICOMNODE", [series])
                stop(sampler)
            print(f"{fmt}: {len(series) / elapsed:.0f} instances/s while sampled")
    summarise(args.out.with_suffix(".txt"), args.top)


if __name__ == "__main__":
    main()
