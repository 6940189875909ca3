"""Time the CLI's start-up: ``--help``, ``status`` and ``jobs list``.

Each command runs as a subprocess (the way an admin runs it) against a temporary
configuration with a freshly upgraded SQLite database, ``--runs`` times; the median
wall time is printed beside the interpreter's own floor, ``python -c pass``, measured
in the same run, and as a ratio to it. The target is under 0.5 s each.

Usage::

    python bench/cli.py [--runs 10] [--json]

Timings depend on the machine and what else runs on it: compare figures from one run,
or from runs on the same idle machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

TARGET_S = 0.5


def wall_time(argv: Sequence[str], cwd: Path, runs: int) -> tuple[float, list[float]]:
    """Run ``argv`` ``runs`` times; return the median wall time and every time.

    Parameters
    ----------
    argv : Sequence[str]
        The command line.
    cwd : Path
        Its working directory.
    runs : int
        How many times.

    Returns
    -------
    tuple[float, list[float]]
        Median seconds, and each run's seconds.
    """
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        done = subprocess.run(argv, cwd=cwd, capture_output=True, check=False)
        times.append(time.perf_counter() - start)
        if done.returncode not in (0, 1):  # status: 1 means "needs attention", still ran
            raise SystemExit(f"{' '.join(argv)} failed: {done.stderr.decode().strip()}")
    return statistics.median(times), times


def main(argv: Sequence[str] | None = None) -> int:
    """Measure and print.

    Parameters
    ----------
    argv : Sequence[str], optional
        Command-line arguments.

    Returns
    -------
    int
        0 when every command is under the target, else 1.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="runs per command (default 10)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="dicomnode-bench-cli-") as tmp:
        root = Path(tmp)
        config = root / "node.toml"
        config.write_text(
            f'[database]\nurl = "sqlite:///{root / "node.db"}"\n'
            f'[storage]\npath = "{root / "spool"}"\n'
        )
        dicomnode = [sys.executable, "-m", "dicomnode"]
        subprocess.run([*dicomnode, "--config", str(config), "db", "upgrade"], check=True,
                       capture_output=True)  # fmt: skip
        commands = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "dicomnode --help": [*dicomnode, "--help"],
            # --config before the command: older versions only took it there (before/after).
            "dicomnode status": [*dicomnode, "-c", str(config), "status", "--no-listener"],
            "dicomnode jobs list": [*dicomnode, "-c", str(config), "jobs", "list"],
        }
        wall_time(commands["dicomnode jobs list"], root, 1)  # warm the file cache
        results = {name: wall_time(cmd, root, args.runs) for name, cmd in commands.items()}

    floor = results["python -c pass"][0]
    report = [
        {
            "command": name,
            "median_s": round(median, 4),
            "min_s": round(min(times), 4),
            "ratio_to_floor": round(median / floor, 1),
            "under_target": median < TARGET_S,
        }
        for name, (median, times) in results.items()
    ]
    if args.json:
        json.dump({"runs": args.runs, "target_s": TARGET_S, "results": report}, sys.stdout,
                  indent=2)  # fmt: skip
        print()
    else:
        print(f"{'COMMAND':<22}{'MEDIAN':>9}{'MIN':>9}{'x FLOOR':>9}  (median of {args.runs})")
        for r in report:
            mark = "" if r["command"].startswith("python") else (
                "  ok" if r["under_target"] else f"  over {TARGET_S} s"
            )  # fmt: skip
            print(
                f"{r['command']:<22}{r['median_s']:>8.3f}s{r['min_s']:>8.3f}s"
                f"{r['ratio_to_floor']:>8.1f}x{mark}"
            )
    commands_ok = all(r["under_target"] for r in report if r["command"].startswith("dicomnode"))
    return 0 if commands_ok else 1


if __name__ == "__main__":
    sys.exit(main())
