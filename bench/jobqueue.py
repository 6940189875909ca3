"""The job table as a queue: throughput, and the delay it adds to a job.

On SQLite (a file in a temporary folder) and on PostgreSQL (a fresh database on
127.0.0.1, if one answers) it measures:

1. enqueue: one job per transaction, as the completion sweep queues them;
2. claim + finish: 1 and 4 worker threads draining the queue (the model's work
   itself is left out: this is what the queue costs);
3. latency from "series complete" (the job row committed) to "job running" (claimed),
   with jobs arriving every 20 ms to 4 idle workers:

   - in the same process, woken by the doorbell, as in ``dicomnode serve``;
   - in another process, woken by the cross-process announcement (PostgreSQL
     NOTIFY, or a datagram on a SQLite host), as ``dicomnode worker`` processes are
     when ``dicomnode listen`` queues work;
   - in the same process by polling alone (``worker.poll_seconds = 0.5``), the
     reference: what a worker without any wakeup would add.

Usage::

    python bench/jobqueue.py [--jobs 500] [--latency-jobs 150]

(Not ``queue.py``: run as a script, that name would hide the standard library
module from everything the script imports.)
"""

from __future__ import annotations

import argparse
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sqlalchemy.orm import Session, sessionmaker  # noqa: E402

from dicomnode.db import jobs, migrate  # noqa: E402
from dicomnode.db.engine import make_engine, session_factory, transaction  # noqa: E402
from dicomnode.db.models import JobState, Series, Study  # noqa: E402
from dicomnode.queue.wakeup import (  # noqa: E402
    Announcer,
    Doorbell,
    WakeListener,
)
from tests.conftest import fresh_pg_database  # noqa: E402


@contextmanager
def databases(workdir: Path) -> Iterator[list[tuple[str, str]]]:
    found = [("SQLite", f"sqlite:///{workdir / 'queue.db'}")]
    with ExitStack() as stack:
        try:
            pg = stack.enter_context(fresh_pg_database(prefix="dicomnode_bench"))
            found.append(("PostgreSQL", pg))
        except Exception as exc:  # no server here: SQLite only
            print(f"(PostgreSQL skipped: {type(exc).__name__}: {exc})")
        yield found


def make_series(sessions: sessionmaker[Session], count: int) -> list[int]:
    with transaction(sessions) as s:
        study = Study(study_uid=f"1.2.{uuid.uuid4().int % 10**12}")
        s.add(study)
        s.flush()
        rows = [
            Series(study_id=study.id, series_uid=f"{study.study_uid}.{i}") for i in range(count)
        ]
        s.add_all(rows)
        s.flush()
        return [r.id for r in rows]


def enqueue_one(sessions: sessionmaker[Session], series_id: int, tag: str) -> int:
    with transaction(sessions) as s:
        job = jobs.enqueue(
            s, s.get(Series, series_id), route=tag, model="m", version="1", max_attempts=3
        )
        assert job is not None
        s.flush()
        return job.id


def drain(sessions: sessionmaker[Session], workers: int) -> int:
    done = [0] * workers

    def work(i: int) -> None:
        while (claim := jobs.claim(sessions, f"bench-{i}", 60)) is not None:
            jobs.finish(sessions, claim, JobState.DONE)
            done[i] += 1

    threads = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done)


def latency(
    sessions: sessionmaker[Session], series: list[int], workers: int, doorbell: bool
) -> list[float]:
    """Seconds from a job's commit to its claim, jobs arriving every 20 ms."""
    bell, stop = Doorbell(), threading.Event()
    committed: dict[int, float] = {}
    claimed: dict[int, float] = {}

    def work(i: int) -> None:
        while not stop.is_set():
            seen = bell.rings
            claim = jobs.claim(sessions, f"lat-{i}", 60)
            if claim is None:
                if doorbell:
                    bell.wait(seen, 0.5)
                else:
                    stop.wait(0.5)
                continue
            claimed[claim.job_id] = time.perf_counter()
            jobs.finish(sessions, claim, JobState.DONE)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    tag = f"lat-{'bell' if doorbell else 'poll'}"
    for series_id in series:
        job_id = enqueue_one(sessions, series_id, tag)
        committed[job_id] = time.perf_counter()
        bell.ring()
        time.sleep(0.02)
    deadline = time.monotonic() + 10
    while len(claimed) < len(committed) and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    bell.ring()
    for t in threads:
        t.join()
    return [claimed[j] - committed[j] for j in committed if j in claimed]


def worker_process(url: str, spool: Path, workers: int) -> None:
    """Run ``workers`` claiming threads woken by announcements, until SIGTERM."""
    engine = make_engine(url)
    sessions = session_factory(engine)
    bell, stop = Doorbell(), threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: (stop.set(), bell.ring()))
    listener = WakeListener(engine, spool, bell, stop)
    listener.start()

    def work(i: int) -> None:
        while not stop.is_set():
            seen = bell.rings
            claim = jobs.claim(sessions, f"proc-{i}", 60)
            if claim is None:
                bell.wait(seen, 0.5)
                continue
            # Wall clock, after the claim committed: what the in-process case measures too.
            print(f"claimed {claim.job_id} {time.time()}", flush=True)
            jobs.finish(sessions, claim, JobState.DONE)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    listener.ready.wait(30)
    print("ready", flush=True)
    for t in threads:
        t.join()
    listener.join(5)


def latency_across_processes(
    url: str, spool: Path, sessions: sessionmaker[Session], series: list[int]
) -> list[float]:
    """Seconds from commit to claim when the workers run in another process."""
    engine = make_engine(url)
    announcer = Announcer(engine, spool)
    proc = subprocess.Popen(
        [sys.executable, __file__, "--worker-process", url, str(spool)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    committed: dict[int, float] = {}
    try:
        for series_id in series:
            job_id = enqueue_one(sessions, series_id, "lat-proc")
            committed[job_id] = time.time()  # wall clock, as the other process reports
            announcer.announce()
            time.sleep(0.02)
        time.sleep(1)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        announcer.close()
        engine.dispose()
    claimed = {
        int(w[1]): float(w[2]) for w in map(str.split, out.splitlines()) if w[0] == "claimed"
    }
    return [claimed[j] - committed[j] for j in committed if j in claimed]


def p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--latency-jobs", type=int, default=150)
    parser.add_argument("--worker-process", nargs=2, metavar=("URL", "SPOOL"), help="internal")
    args = parser.parse_args()
    if args.worker_process:
        worker_process(args.worker_process[0], Path(args.worker_process[1]), 4)
        return
    with tempfile.TemporaryDirectory() as tmp, databases(Path(tmp)) as found:
        for label, url in found:
            engine = make_engine(url)
            migrate.upgrade(engine)
            sessions = session_factory(engine)
            print(f"\n{label}")
            for workers in (1, 4):
                series = make_series(sessions, args.jobs)
                started = time.perf_counter()
                for sid in series:
                    enqueue_one(sessions, sid, f"w{workers}")
                enq = args.jobs / (time.perf_counter() - started)
                started = time.perf_counter()
                drained = drain(sessions, workers)
                rate = drained / (time.perf_counter() - started)
                assert drained == args.jobs, f"{drained} of {args.jobs} claimed"
                print(f"  {workers} worker(s): enqueue {enq:6.0f} jobs/s, "
                      f"claim+finish {rate:6.0f} jobs/s")  # fmt: skip
            for how in ("doorbell", "other process", "polling 0.5 s"):
                series = make_series(sessions, args.latency_jobs)
                if how == "other process":
                    lat = latency_across_processes(url, Path(tmp), sessions, series)
                else:
                    lat = latency(sessions, series, 4, doorbell=how == "doorbell")
                p50, p99 = 1e3 * statistics.median(lat), 1e3 * p(lat, 0.99)
                print(f"  latency, 4 idle workers, {how:<13}: p50 {p50:6.1f} ms, "
                      f"p99 {p99:6.1f} ms ({len(lat)} jobs)")  # fmt: skip
            engine.dispose()


if __name__ == "__main__":
    main()
