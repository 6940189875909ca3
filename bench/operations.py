"""Operating costs at hospital scale: retention planning and deleting, audit export.

On a fresh database (SQLite by default, ``--database URL`` for PostgreSQL) filled
with ``--series`` complete series of ``--instances`` instance rows each (a year of a
busy CT department is about 50,000 series), each with one job in a mix of states,
it measures, each against a reference measured in the same run:

1. **Planning** (``retention.candidates``: one aggregate query) against the obvious
   way, one query per series for its jobs and instances (the ORM's N+1).
2. **Deleting** ``--delete`` due series with their files (``retention.run``: per series
   a locked transaction, the re-check, the rows, the audit entry, then the files)
   against ``os.unlink`` of the same number of files alone.
3. **Audit export** of every entry as CSV (``dicomnode audit export``'s writer over
   ``audit.entries``, batched) against fetching the same rows with one raw cursor.

Usage::

    python bench/operations.py [--series 20000] [--instances 50] [--delete 1000]
                               [--database URL]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sqlalchemy import func, insert, select, text  # noqa: E402

from dicomnode.cli.audit import write  # noqa: E402
from dicomnode.config import RetentionSettings, StorageSettings  # noqa: E402
from dicomnode.db import audit, migrate  # noqa: E402
from dicomnode.db.engine import make_engine, session_factory  # noqa: E402
from dicomnode.db.models import (  # noqa: E402
    AuditEvent,
    Instance,
    Job,
    JobState,
    Series,
    SeriesState,
    Study,
    utcnow,
)
from dicomnode.store import retention  # noqa: E402
from dicomnode.store.spool import Spool  # noqa: E402
from tests.conftest import fresh_pg_database  # noqa: E402

# Job states of the series, in turn: most are done (some due), a few failed or active.
MIX = [JobState.DONE] * 16 + [JobState.FAILED, JobState.CANCELLED, JobState.QUEUED]


def fill(engine, root: Path, series: int, instances: int, delete: int) -> int:
    """Insert the rows (and, for the first ``delete`` due series, real files)."""
    now = utcnow()
    with engine.begin() as conn:
        conn.execute(
            insert(Study),
            [{"study_uid": f"1.2.826.0.1.{i}", "created_at": now} for i in range(series)],
        )
        study_ids = list(conn.scalars(select(Study.id).order_by(Study.id)))
        rows = []
        for i, study_id in enumerate(study_ids):
            # The first `delete` series are due (done 30 days ago); the rest are younger.
            age = timedelta(days=30 if i < delete else 1 + i % 5)
            rows.append(
                {"study_id": study_id, "series_uid": f"1.2.826.0.2.{i}", "modality": "CT",
                 "state": SeriesState.COMPLETE.value, "generation": 0, "instance_count": instances,
                 "first_received_at": now - age, "last_received_at": now - age,
                 "completed_at": now - age}
            )  # fmt: skip
        conn.execute(insert(Series), rows)
        series_ids = list(conn.scalars(select(Series.id).order_by(Series.id)))
        conn.execute(
            insert(Job),
            [
                {"series_id": sid, "route": "r", "model": "m", "model_version": "1",
                 "generation": 0, "idempotency_key": f"k{sid}",
                 "state": (JobState.DONE if i < delete else MIX[i % len(MIX)]).value,
                 "priority": 0, "attempts": 1, "max_attempts": 3, "run_after": now,
                 "created_at": now, "updated_at": now, "timings": {}, "summary": {},
                 "finished_at": now - timedelta(days=29 if i < delete else 1)}
                for i, sid in enumerate(series_ids)
            ],
        )  # fmt: skip
        batch = []
        for i, sid in enumerate(series_ids):
            for k in range(instances):
                path = f"incoming/1.2.826.0.1.{i}/1.2.826.0.2.{i}/{k}.dcm"
                if i < delete:
                    file = root / path
                    file.parent.mkdir(parents=True, exist_ok=True)
                    file.write_bytes(b"\0" * 512)
                batch.append(
                    {"series_id": sid, "sop_instance_uid": f"1.2.826.0.3.{i}.{k}",
                     "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
                     "transfer_syntax_uid": "1.2.840.10008.1.2.1", "path": path,
                     "size_bytes": 512, "sha256": "0" * 64, "received_at": now}
                )  # fmt: skip
            if len(batch) >= 50_000:
                conn.execute(insert(Instance), batch)
                batch = []
        if batch:
            conn.execute(insert(Instance), batch)
        conn.execute(
            insert(AuditEvent),
            [
                {"at": now, "event": "instances-received", "actor": "CT01", "peer": "10.0.0.7",
                 "study_uid": f"1.2.826.0.1.{i}", "series_uid": f"1.2.826.0.2.{i}",
                 "count": instances, "size_bytes": 512 * instances, "outcome": "success"}
                for i in range(series)
            ],
        )  # fmt: skip
    return len(series_ids)


def naive_plan(sessions) -> int:
    """The N+1 way: look at each complete series' jobs and instances one by one."""
    found = 0
    with sessions() as s:
        for series in s.scalars(select(Series).where(Series.state == SeriesState.COMPLETE)):
            states = list(s.scalars(select(Job.state).where(Job.series_id == series.id)))
            s.scalar(select(func.count()).where(Instance.series_id == series.id))
            if not any(st in retention.ACTIVE for st in states):
                found += 1
    return found


@contextmanager
def timed(label: str, out: dict[str, float]) -> Iterator[None]:
    started = time.perf_counter()
    yield
    out[label] = time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=20_000)
    parser.add_argument("--instances", type=int, default=50)
    parser.add_argument("--delete", type=int, default=1000)
    parser.add_argument("--database", help="a PostgreSQL admin URL (default: SQLite)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-ops-") as tmp:
        root = Path(tmp) / "spool"
        pg = fresh_pg_database(args.database) if args.database else nullcontext(None)
        with pg as pg_url:
            url = pg_url or f"sqlite:///{tmp}/bench.db"
            engine = make_engine(url)
            migrate.upgrade(engine)
            sessions = session_factory(engine)
            t: dict[str, float] = {}
            with timed("fill", t):
                n = fill(engine, root, args.series, args.instances, args.delete)
            if engine.dialect.name == "postgresql":
                with engine.connect() as conn:
                    conn.execute(text("ANALYZE"))
                    conn.commit()
            rules = RetentionSettings(done_days=7, failed_days=30, emergency=False)
            with timed("plan", t), sessions() as s:
                planned = retention.candidates(s, rules)
            with timed("naive", t):
                naive = naive_plan(sessions)
            assert naive == len(planned), (naive, len(planned))

            # Reference for deleting: unlinking as many files, nothing else.
            ref = Path(tmp) / "ref"
            ref.mkdir()
            count = args.delete * args.instances
            for k in range(count):
                (ref / f"{k}.dcm").write_bytes(b"\0" * 512)
            with timed("unlink", t):
                for k in range(count):
                    os.unlink(ref / f"{k}.dcm")
            with timed("delete", t):
                report = retention.run(sessions, Spool(root), rules, StorageSettings(min_free_mb=0))
            assert len(report.deleted) == args.delete, len(report.deleted)
            assert not any(root.joinpath("incoming").iterdir())

            with timed("export", t), sessions() as s:
                buffer = io.StringIO()
                exported = write(audit.entries(s), "csv", buffer)
            with timed("raw", t), engine.connect() as conn:
                raw = len(conn.exec_driver_sql("SELECT * FROM audit_events").fetchall())
            assert exported == raw
            engine.dispose()

    db = "PostgreSQL" if args.database else "SQLite"
    rows = n * args.instances
    print(f"{db}: {n} series, {rows} instance rows (filled in {t['fill']:.1f} s)")
    print(f"plan: {len(planned)} deletable series in {t['plan']:.3f} s; one query per series "
          f"{t['naive']:.2f} s; ratio {t['naive'] / t['plan']:.1f}x faster")  # fmt: skip
    print(f"delete: {args.delete} series, {count} files + rows in {t['delete']:.2f} s "
          f"({args.delete / t['delete']:.0f} series/s, {count / t['delete']:.0f} files/s); "
          f"unlink alone {t['unlink']:.2f} s; ratio {t['unlink'] / t['delete']:.2f}")  # fmt: skip
    print(f"audit export: {exported} entries as CSV in {t['export']:.2f} s "
          f"({exported / t['export']:.0f}/s); raw fetch {t['raw']:.2f} s; "
          f"ratio {t['raw'] / t['export']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
