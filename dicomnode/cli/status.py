"""``dicomnode status``: is the node healthy, at a glance.

Exit code 0 when healthy, 1 when something needs attention: the listener does not
answer, the spool's disk is below ``storage.min_free_mb``, deliveries have failed,
or jobs failed in the last hour (:mod:`dicomnode.health` gathers and judges). Nothing
here prints patient data: job errors and event notes carry none by design, and only
job ids, models, worker ids, counts and times are shown.
"""

from __future__ import annotations

import argparse
from typing import Any

from dicomnode.cli.output import format_time, print_json, print_table
from dicomnode.config import Settings
from dicomnode.health import collect

EXIT_HEALTHY, EXIT_ATTENTION = 0, 1


def _age(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {secs}s" if minutes else f"{secs}s"


def _print_human(report: dict[str, Any]) -> None:
    listener = report["listener"]
    print(f"{'listener':<12}{listener['state']} ({listener['detail']})")
    workers = report["workers"]
    busy = workers["busy"]
    processes = "unknown" if workers["processes"] is None else str(workers["processes"])
    print(
        f"{'workers':<12}{len(busy)} busy{' (' + ', '.join(busy) + ')' if busy else ''}; "
        f"{processes} worker process(es) waiting for work ({workers['processes_source']})"
    )
    print(f"{'queue':<12}" + "  ".join(f"{k} {v}" for k, v in report["queue"].items()))
    oldest = report["oldest_queued"]
    if oldest is not None:
        print(
            f"{'oldest':<12}job {oldest['job_id']} queued {_age(oldest['age_s'])} ago "
            f"({format_time(oldest['created_at'])})"
        )
    d = report["deliveries"]
    print(f"{'deliveries':<12}{d['pending']} pending, {d['failed']} failed")
    disk = report["disk"]
    watermark = f"watermark {disk['min_free_mb']} MiB" if disk["min_free_mb"] else "no watermark"
    print(f"{'disk':<12}{disk['free_mb']} MiB free of {disk['total_mb']} ({watermark})")
    if report["last_errors"]:
        print("last errors")
        print_table(
            ["  JOB", "MODEL", "AT", "OUTCOME", "ERROR"],
            [
                [f"  {e['job_id']}", e["model"], format_time(e["at"]), e["outcome"], e["error"]]
                for e in report["last_errors"]
            ],
        )
    if report["problems"]:
        print("needs attention")
        for line in report["problems"]:
            print(f"  {line}")
    else:
        print("healthy")


def status(settings: Settings, args: argparse.Namespace) -> int:
    """Print the node's health (``dicomnode status``).

    Parameters
    ----------
    settings : Settings
        Database, spool, listener.
    args : argparse.Namespace
        ``json``, ``no_listener`` (skip the C-ECHO, on a host without a listener) and
        ``timeout`` (seconds for the C-ECHO).

    Returns
    -------
    int
        0 when healthy, 1 when something needs attention (see the module docstring).
    """
    # Both outputs print the same dict: the lines show nothing that --json lacks.
    report = collect(settings, None if args.no_listener else args.timeout).as_dict()
    if args.json:
        print_json(report)
    else:
        _print_human(report)
    return EXIT_HEALTHY if report["healthy"] else EXIT_ATTENTION
