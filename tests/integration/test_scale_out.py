"""Scale-out for real: one `dicomnode listen` process and several `dicomnode worker`s.

Every process is real and they share nothing but the database and the spool folder,
as on a listener host with worker hosts. Series arrive by dcmtk's storescu; results go
to counting Storage SCPs (tests/integration/counting_scp.py) or to Orthanc. What
happened is read from the database (jobs, their job_events history, deliveries,
outputs) and from what the receivers got, never from logs.

The models are test-built TorchScript packages on 64x64 synthetic CT: a fast one, and
a slow one (half a second per slice, one slice per batch) for the tests that must
catch a job in the middle of inference.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, selectinload, sessionmaker

from dicomnode.db import DeliveryState, Job, JobState, Series, make_engine, session_factory
from tests.conftest import wait_for
from tests.dcmtk import STORESCU
from tests.factories import ct_series, lung_phantom, write_series
from tests.integration.counting_scp import CountingSCP
from tests.integration.node_process import NodeProcess, listener_port, write_config
from tests.integration.orthanc import Orthanc
from tests.unit.inference.packages import build_package, build_slow_package

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not all(shutil.which(t) for t in (STORESCU, "dciodvfy")),
        reason="dcmtk and dicom3tools are installed by .ci/run",
    ),
]

MODEL = "test-lungs"
QUIET_S = 1.5  # completion quiet period: short, the whole series goes in one storescu run
START_TIMEOUT_S = 120  # every worker imports torch; several at once on two cores
SLOW_SLICE_S = 0.5  # the slow model's time per slice (one slice per batch)
# Twelve slices' time: a machine busy enough to slow a slice several times over must
# not make a live worker look dead (it renews its lease only between batches).
LEASE_S = 6
# The slow-model tests time a job by the slow model's pace in PyTorch. OpenVINO would
# compile its loop of products into something far faster (and take a while doing
# so), so those tests pin the back-end; the exactly-once test runs the default.
TORCH = 'backend = "torch"\n'


# --- inputs -------------------------------------------------------------------------------


def phantom_series(count: int, slices: int, per_study: int = 1) -> list[list[Dataset]]:
    """Return ``count`` small CT series, ``per_study`` of them sharing a study."""
    out = []
    for i in range(count):
        series = ct_series(lung_phantom(slices=slices, size=64))
        if i % per_study:
            for ds in series:  # the same study and frame of reference as the previous one
                ds.StudyInstanceUID = out[-1][0].StudyInstanceUID
                ds.FrameOfReferenceUID = out[-1][0].FrameOfReferenceUID
        out.append(series)
    return out


def write_all(folder: Path, series: Sequence[Sequence[Dataset]]) -> list[list[Path]]:
    """Write each series to its own folder; return the files, series by series."""
    return [write_series(s, folder / f"s{i:03d}") for i, s in enumerate(series)]


def storescu(config: Path, files: Sequence[Path]) -> list[str]:
    return [STORESCU, "-aec", "DICOMNODE", "-to", "30", "-ta", "30", "-td", "30",
            "127.0.0.1", str(listener_port(config)), *map(str, files)]  # fmt: skip


def send(config: Path, files: Sequence[Path]) -> None:
    """Send files to the node's listener with dcmtk's storescu, on one association."""
    sent = subprocess.run(
        storescu(config, files), capture_output=True, text=True, timeout=300, check=False
    )
    assert sent.returncode == 0, sent.stderr[-2000:]


def send_from_scanners(config: Path, series: Sequence[Sequence[Path]], scanners: int) -> None:
    """Send whole series from several storescu processes at once, as several scanners.

    The listener commits every instance durably (fsync) before it answers, so one
    association is bound by the disk's sync latency; several run those in parallel.
    """
    procs = [
        subprocess.Popen(
            storescu(config, [f for s in series[i::scanners] for f in s]),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(scanners)
    ]
    errors = []
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        if proc.returncode != 0:
            errors.append(err[-1000:])
    assert errors == [], errors


# --- the database, as an operator would query it -----------------------------------------


def worker_pid(worker: str | None) -> int | None:
    """Return the process id in a worker id ("host:pid:index:random")."""
    return int(worker.split(":")[1]) if worker else None


@dataclass(frozen=True)
class Event:
    """One row of a job's history (job_events)."""

    from_state: str | None
    to_state: str
    attempt: int
    worker: str | None
    note: str | None


@dataclass(frozen=True)
class JobRow:
    """A job with what the tests check, read in one session."""

    id: int
    series_uid: str
    generation: int
    state: JobState
    attempts: int
    last_error: str | None
    lease_owner: str | None
    claimed_by: str | None
    started_at: datetime | None
    events: list[Event]  # the job's history, oldest first
    deliveries: dict[str, tuple[DeliveryState, int]]  # destination -> (state, attempts)
    outputs: dict[str, str]  # kind -> SOP Instance UID

    @property
    def lease_pid(self) -> int | None:
        """The process holding the job's lease now."""
        return worker_pid(self.lease_owner)

    @property
    def claimed_pid(self) -> int | None:
        """The process of the latest claim (it stays after the job ends)."""
        return worker_pid(self.claimed_by)

    def transitions(self, to_state: JobState) -> list[Event]:
        return [e for e in self.events if e.to_state == to_state.value]


class Database:
    """Read-only view of a node's database from the test process."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine: Engine = make_engine(url)
        self.sessions: sessionmaker[Session] = session_factory(self.engine)

    def jobs(self) -> list[JobRow]:
        with self.sessions() as session:
            rows = session.scalars(
                select(Job)
                .options(
                    selectinload(Job.series), selectinload(Job.deliveries),
                    selectinload(Job.outputs), selectinload(Job.events),
                )
                .order_by(Job.id)
            ).all()  # fmt: skip
            return [
                JobRow(
                    id=j.id,
                    series_uid=j.series.series_uid,
                    generation=j.generation,
                    state=j.state,
                    attempts=j.attempts,
                    last_error=j.last_error,
                    lease_owner=j.lease_owner,
                    claimed_by=j.claimed_by,
                    started_at=j.started_at,
                    events=[
                        Event(e.from_state, e.to_state, e.attempt, e.worker, e.note)
                        for e in j.events
                    ],
                    deliveries={d.destination: (d.state, d.attempts) for d in j.deliveries},
                    outputs={o.kind: o.sop_instance_uid for o in j.outputs},
                )
                for j in rows
            ]

    def series_generation(self, series_uid: str) -> int | None:
        with self.sessions() as session:
            return session.scalar(select(Series.generation).where(Series.series_uid == series_uid))

    def states(self) -> Counter[str]:
        return Counter(str(j.state) for j in self.jobs())

    def dispose(self) -> None:
        self.engine.dispose()


# --- processes ----------------------------------------------------------------------------


def configure(
    folder: Path, db_url: str, pacs: int, models: Path, *, pacs_aet: str = "COUNTER", **kw: object
) -> Path:
    """Write the node's configuration and migrate its database, as an operator would.

    Every database is migrated up front, SQLite too: the processes then start in
    parallel without racing to migrate an empty file.
    """
    config = write_config(
        folder, db_url=db_url, pacs_port=pacs, pacs_aet=pacs_aet, quiet_seconds=QUIET_S,
        models_path=models, model=MODEL, **kw,  # type: ignore[arg-type]
    )  # fmt: skip
    upgrade = NodeProcess(config).cli("db", "upgrade")
    assert upgrade.returncode == 0, upgrade.stderr
    return config


def start(config: Path, *, listen: bool, workers: int, first: int = 0) -> list[NodeProcess]:
    """Start a listener and/or worker processes at once; return them once all serve."""
    nodes = [NodeProcess(config, "listen.log", "listen")] if listen else []
    nodes += [
        NodeProcess(config, f"worker{i}.log", "worker") for i in range(first, first + workers)
    ]
    for node in nodes:
        node.start()
    try:
        for node in nodes:
            node.wait_serving(START_TIMEOUT_S)
    except BaseException:
        stop_all(nodes)
        raise
    return nodes


def stop_all(nodes: Sequence[NodeProcess], timeout: float = 60) -> dict[NodeProcess, int]:
    """SIGTERM every node at once, then wait for each; return their exit codes."""
    live = [n for n in nodes if n.proc is not None and n.proc.poll() is None]
    for node in live:
        assert node.proc is not None
        node.proc.send_signal(signal.SIGTERM)
    for node in live:
        # One SIGTERM only: a second one can land after the node restored the default
        # handler on its way out, and would read as a crash (-15).
        assert node.proc is not None
        try:
            node.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            # Every thread's stack into its log first (the node dumps them on SIGUSR1),
            # so that a failure shows what the node was still waiting on.
            node.proc.send_signal(signal.SIGUSR1)
            time.sleep(1)
            node.kill()
    return {n: int(n.proc.returncode) for n in nodes if n.proc is not None}


@contextmanager
def running(nodes: list[NodeProcess]) -> Iterator[list[NodeProcess]]:
    try:
        yield nodes
    finally:
        stop_all(nodes)


def tails(nodes: Sequence[NodeProcess], chars: int = 1500) -> str:
    return "\n".join(f"--- {n.log_path.name}:\n{n.log()[-chars:]}" for n in nodes)


def poll(
    what: str,
    condition: Callable[[], bool],
    timeout: float,
    nodes: Sequence[NodeProcess] = (),
    state: Callable[[], object] | None = None,
) -> None:
    """Wait for ``condition``; fail naming ``what``, with the state and the logs, if not."""
    if not wait_for(condition, timeout):
        shown = f"\nstate: {state()}" if state is not None else ""
        pytest.fail(f"not within {timeout} s: {what}{shown}\n{tails(nodes)}", pytrace=False)


def running_for(db: Database, seconds: float) -> Callable[[], JobRow | None]:
    """A condition: the only job has been running for ``seconds`` (in the middle of it)."""

    def check() -> JobRow | None:
        jobs = db.jobs()
        if len(jobs) == 1 and jobs[0].state == JobState.RUNNING:
            started = jobs[0].started_at
            assert started is not None
            if time.time() - started.timestamp() >= seconds:
                return jobs[0]
        return None

    return check


@pytest.fixture
def database(db_url: str) -> Iterator[Database]:
    db = Database(db_url)
    yield db
    db.dispose()


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Iterator[Database]:
    db = Database(f"sqlite:///{tmp_path / 'dicomnode.db'}")
    yield db
    db.dispose()


# --- 1. many workers, each job exactly once -----------------------------------------------

SERIES_COUNT = 40
WORKERS = 4


def test_exactly_once(tmp_path: Path, database: Database) -> None:
    """40 series, 4 worker processes: each job runs once and each result arrives once."""
    models = tmp_path / "models"
    build_package(models, MODEL)
    inputs = phantom_series(SERIES_COUNT, slices=8, per_study=4)
    files = write_all(tmp_path / "in", inputs)
    input_series = {s[0].SeriesInstanceUID for s in inputs}

    with CountingSCP() as pacs:
        config = configure(tmp_path, database.url, pacs.port, models)
        with running(start(config, listen=True, workers=WORKERS)) as nodes:
            send_from_scanners(config, files, scanners=4)
            poll(
                f"{SERIES_COUNT} jobs done",
                lambda: database.states()["done"] == SERIES_COUNT,
                timeout=300, nodes=nodes, state=database.states,
            )  # fmt: skip
            codes = stop_all(nodes)
        received = pacs.received

    # --- the job table: every job done at the first attempt, delivered once
    jobs = database.jobs()
    assert len(jobs) == SERIES_COUNT
    assert {j.series_uid for j in jobs} == input_series
    assert [j for j in jobs if j.state != JobState.DONE or j.attempts != 1] == []
    assert all(j.deliveries == {"pacs": (DeliveryState.SENT, 1)} for j in jobs), jobs
    assert all(sorted(j.outputs) == ["seg", "sr"] for j in jobs)

    # --- the work was shared: more than one worker process ran jobs, each job one claim
    assert all(len(j.transitions(JobState.RUNNING)) == 1 for j in jobs), jobs
    assert all(j.transitions(JobState.RUNNING)[0].worker == j.claimed_by for j in jobs)
    pids = Counter(j.claimed_pid for j in jobs)
    assert len(pids) > 1, pids
    assert set(pids) <= {w.proc.pid for w in nodes[1:] if w.proc is not None}

    # --- the PACS got one SEG and one SR per series, nothing twice
    segs = [r for r in received if r.is_seg]
    srs = [r for r in received if r.is_sr]
    assert len(segs) == SERIES_COUNT and len(srs) == SERIES_COUNT
    assert len(received) == 2 * SERIES_COUNT
    assert pacs.duplicates() == {}
    assert Counter(r.source_series for r in segs) == Counter(dict.fromkeys(input_series, 1))
    assert {r.source_series for r in srs} == input_series
    assert {r.sop_instance_uid for r in received} == {
        uid for j in jobs for uid in j.outputs.values()
    }
    assert set(codes.values()) == {0}, tails(nodes)


# --- 2. a worker dies: its job moves to another -------------------------------------------


def test_worker_killed_mid_inference(tmp_path: Path, database: Database) -> None:
    """kill -9 the worker holding a job: the lease lapses and the other worker finishes it."""
    models = tmp_path / "models"
    build_slow_package(models, MODEL, seconds_per_slice=SLOW_SLICE_S)
    series = phantom_series(1, slices=10)[0]
    files = write_series(series, tmp_path / "in")

    with CountingSCP() as pacs:
        config = configure(
            tmp_path, database.url, pacs.port, models,
            worker_extra=f"lease_seconds = {LEASE_S}\nreap_seconds = 1\n{TORCH}",
        )  # fmt: skip
        with running(start(config, listen=True, workers=2)) as nodes:
            workers = {n.proc.pid: n for n in nodes[1:] if n.proc is not None}
            send(config, files)
            in_inference = running_for(database, 1.5 * SLOW_SLICE_S)
            poll("the job in the middle of inference", lambda: in_inference() is not None,
                 timeout=60, nodes=nodes, state=database.jobs)  # fmt: skip
            job = in_inference()
            assert job is not None and job.attempts == 1 and job.lease_pid in workers
            holder = workers.pop(job.lease_pid)
            survivor = next(iter(workers.values()))

            assert holder.kill() == -signal.SIGKILL
            poll("the job done on the surviving worker",
                 lambda: [j.state for j in database.jobs()] == [JobState.DONE],
                 timeout=120, nodes=nodes, state=database.jobs)  # fmt: skip
            time.sleep(1)  # room for a stray second delivery to show up
        received = pacs.received

    done = database.jobs()
    assert len(done) == 1 and done[0].id == job.id
    assert done[0].state == JobState.DONE and done[0].attempts == 2
    assert done[0].deliveries == {"pacs": (DeliveryState.SENT, 1)}
    assert survivor.proc is not None and done[0].claimed_pid == survivor.proc.pid
    # The history: claimed by the killed worker, re-queued by a reaper because that
    # worker's lease expired (the job row's last_error is cleared by the next claim),
    # then claimed by the survivor, which finished it.
    history = [(e.from_state, e.to_state, e.attempt) for e in done[0].events]
    assert history == [
        (None, "queued", 0),
        ("queued", "running", 1),
        ("running", "queued", 1),
        ("queued", "running", 2),
        ("running", "sending", 2),
        ("sending", "done", 2),
    ], done[0].events
    claims = done[0].transitions(JobState.RUNNING)
    assert [worker_pid(e.worker) for e in claims] == [job.lease_pid, survivor.proc.pid]
    reaped = done[0].events[2]
    assert reaped.worker is not None and reaped.worker.startswith("reaper ")
    assert reaped.note == f"lease of worker {job.lease_owner} expired"
    assert sorted(r.sop_class_uid for r in received) == sorted(
        ["1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.88.34"]
    )
    assert {r.sop_instance_uid for r in received} == set(done[0].outputs.values())


# --- 3. SIGTERM: the worker gives its job back and exits ----------------------------------

SIGTERM_SLICES = 20
STOP_BOUND_S = 5  # SIGTERM to exit; the job alone needs twice that in inference


def test_sigterm_releases_the_job(tmp_path: Path, database: Database) -> None:
    """SIGTERM mid-inference: the worker exits at once and the job is queued, unspent."""
    models = tmp_path / "models"
    build_slow_package(models, MODEL, seconds_per_slice=SLOW_SLICE_S)
    series = phantom_series(1, slices=SIGTERM_SLICES)[0]
    files = write_series(series, tmp_path / "in")
    assert SIGTERM_SLICES * SLOW_SLICE_S >= 2 * STOP_BOUND_S  # stopping is not finishing

    with CountingSCP() as pacs:
        config = configure(tmp_path, database.url, pacs.port, models, worker_extra=TORCH)
        with running(start(config, listen=True, workers=1)) as nodes:
            worker = nodes[1]
            send(config, files)
            in_inference = running_for(database, 1.5 * SLOW_SLICE_S)
            poll("the job in the middle of inference", lambda: in_inference() is not None,
                 timeout=60, nodes=nodes, state=database.jobs)  # fmt: skip
            assert worker.proc is not None
            started = time.monotonic()
            worker.proc.send_signal(signal.SIGTERM)
            try:
                code = worker.proc.wait(STOP_BOUND_S)
            except subprocess.TimeoutExpired:
                pytest.fail(f"worker still running {STOP_BOUND_S} s after SIGTERM\n"
                            f"{tails([worker])}")  # fmt: skip
            stop_seconds = time.monotonic() - started

            released = database.jobs()
            assert code == 0, tails([worker])
            assert len(released) == 1
            assert released[0].state == JobState.QUEUED
            assert released[0].attempts == 0  # given back, not failed
            assert released[0].lease_owner is None and released[0].last_error is None
            assert released[0].outputs == {} and released[0].deliveries == {}
            given_back = released[0].events[-1]
            assert (given_back.from_state, given_back.to_state) == ("running", "queued")
            assert worker_pid(given_back.worker) == worker.proc.pid
            assert given_back.note == "released: worker stopping"

            # --- another worker takes it and finishes it, at its first counted attempt
            nodes += start(config, listen=False, workers=1, first=1)
            poll("the job done by the second worker",
                 lambda: [j.state for j in database.jobs()] == [JobState.DONE],
                 timeout=120, nodes=nodes, state=database.jobs)  # fmt: skip
        received = pacs.received

    assert stop_seconds < STOP_BOUND_S
    done = database.jobs()[0]
    assert done.attempts == 1 and done.deliveries == {"pacs": (DeliveryState.SENT, 1)}
    assert nodes[2].proc is not None and done.claimed_pid == nodes[2].proc.pid
    assert [e.attempt for e in done.transitions(JobState.RUNNING)] == [1, 1]
    assert sorted(r.sop_class_uid for r in received) == sorted(
        ["1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.88.34"]
    )


# --- 4. one of two destinations is down ---------------------------------------------------

PACS_DOWN_SERIES = 3
MAX_ATTEMPTS = 3


def test_pacs_down(tmp_path: Path, sqlite_db: Database) -> None:
    """A down while B is up: B gets everything at once, A everything once it is back.

    A stays down for more delivery attempts than worker.max_attempts: retries of a
    delivery must not use up the job's attempts (worker.delivery_retry_hours bounds
    them instead), so no job may fail.
    """
    db = sqlite_db
    models = tmp_path / "models"
    build_package(models, MODEL)
    inputs = phantom_series(PACS_DOWN_SERIES, slices=6)
    files = [f for s in write_all(tmp_path / "in", inputs) for f in s]

    with CountingSCP("PACSA") as a, CountingSCP("PACSB") as b:
        a.stop()  # down before anything is sent; it comes back on the same port
        config = configure(
            tmp_path, db.url, a.port, models, pacs_aet="PACSA",
            worker_extra=(
                f"max_attempts = {MAX_ATTEMPTS}\nretry_base_seconds = 0.5\n"
                "delivery_retry_max_seconds = 2\n"
            ),
            destinations_extra=(
                '[[destinations]]\nname = "archive"\nae_title = "PACSB"\n'
                f'host = "127.0.0.1"\nport = {b.port}\ntimeout_seconds = 5\n'
            ),
            send_to=("pacs", "archive"),
        )  # fmt: skip
        with running(start(config, listen=True, workers=1)) as nodes:
            send(config, files)
            poll("B has every SEG and SR while A is down",
                 lambda: len(b.segs()) == len(b.srs()) == PACS_DOWN_SERIES,
                 timeout=120, nodes=nodes, state=db.jobs)  # fmt: skip

            def a_retried_enough() -> bool:
                jobs = db.jobs()
                failed = any(j.state == JobState.FAILED for j in jobs)
                tries = [j.deliveries.get("pacs", (None, 0))[1] for j in jobs]
                return failed or (len(jobs) == PACS_DOWN_SERIES and min(tries) > MAX_ATTEMPTS)

            poll(f"more than {MAX_ATTEMPTS} delivery attempts to A", a_retried_enough,
                 timeout=60, nodes=nodes, state=db.jobs)  # fmt: skip
            down = db.jobs()
            b_while_a_down = b.received

            a.start()
            poll("A has every SEG and SR, every job done",
                 lambda: len(a.received) >= 2 * PACS_DOWN_SERIES
                 and db.states()["done"] == PACS_DOWN_SERIES,
                 timeout=60, nodes=nodes, state=db.jobs)  # fmt: skip
            time.sleep(2)  # a retry period: room for a stray resend to show up
        a_got, b_got = a.received, b.received

    # --- while A was down: B had its results, A's waited, no job failed
    assert len(down) == PACS_DOWN_SERIES
    assert [j for j in down if j.state in (JobState.FAILED, JobState.DONE)] == [], down
    for job in down:
        assert job.deliveries["archive"] == (DeliveryState.SENT, 1), job
        assert job.deliveries["pacs"][0] == DeliveryState.PENDING, job
    assert len(b_while_a_down) == 2 * PACS_DOWN_SERIES

    # --- once A was back: each result there exactly once, nothing twice at B
    done = db.jobs()
    assert all(j.state == JobState.DONE for j in done)
    for job in done:
        assert job.deliveries["pacs"][0] == DeliveryState.SENT
        assert job.deliveries["archive"] == (DeliveryState.SENT, 1)
        assert sorted(job.outputs) == ["seg", "sr"]  # made once, re-sent from the spool
    results = {uid for j in done for uid in j.outputs.values()}
    assert len(results) == 2 * PACS_DOWN_SERIES
    assert a.duplicates() == {} and b.duplicates() == {}
    assert {r.sop_instance_uid for r in a_got} == results
    assert {r.sop_instance_uid for r in b_got} == results
    assert b_got == b_while_a_down


# --- 5. a late image: the results are made again and replace the first ones ---------------

LATE_SLICES = 8


@pytest.mark.skipif(shutil.which("Orthanc") is None, reason="orthanc is installed by .ci/run")
def test_late_image_replaces_results(tmp_path: Path, sqlite_db: Database) -> None:
    """One more slice after the results went out: new results in the same result series."""
    db = sqlite_db
    models = tmp_path / "models"
    build_package(models, MODEL)
    # One slice more than is sent at first, and one beyond that so that the late slice
    # has lung in it (the phantom's first and last slices have none): the new SEG
    # then has a frame derived from the late image.
    whole = ct_series(lung_phantom(slices=LATE_SLICES + 2, size=64))[: LATE_SLICES + 1]
    first, late = whole[:LATE_SLICES], whole[LATE_SLICES]
    series_uid = first[0].SeriesInstanceUID
    source = {str(ds.SOPInstanceUID) for ds in whole}

    with Orthanc(tmp_path / "orthanc") as pacs:
        config = configure(tmp_path, db.url, pacs.dicom_port, models, pacs_aet=pacs.aet)
        with running(start(config, listen=True, workers=1)) as nodes:
            send(config, write_series(first, tmp_path / "first"))
            poll("the first job done",
                 lambda: [j.state for j in db.jobs()] == [JobState.DONE],
                 timeout=120, nodes=nodes, state=db.jobs)  # fmt: skip
            before = pacs.series_by_modality()
            assert len(before.get("SEG", [])) == 1 and len(before.get("SR", [])) == 1

            send(config, write_series([late], tmp_path / "late"))
            poll("a second job, done",
                 lambda: [(j.generation, j.state) for j in db.jobs()]
                 == [(0, JobState.DONE), (1, JobState.DONE)],
                 timeout=120, nodes=nodes, state=db.jobs)  # fmt: skip
            after = pacs.series_by_modality()
            seg_series, sr_series = after.get("SEG", []), after.get("SR", [])
            notes = [
                pydicom.dcmread(BytesIO(pacs.download(i)))
                for series in after.get("KO", [])
                for i in series["Instances"]
            ]
            segs = {
                str(ds.SOPInstanceUID): ds
                for ds in (
                    pydicom.dcmread(BytesIO(pacs.download(i)))
                    for series in seg_series
                    for i in series["Instances"]
                )
            }
        old_job, new_job = db.jobs()

    # --- the database: the series re-opened once and its newer job ran
    assert db.series_generation(series_uid) == 1
    assert old_job.series_uid == new_job.series_uid == series_uid
    assert new_job.state == JobState.DONE and new_job.deliveries["pacs"][0] == DeliveryState.SENT
    assert new_job.outputs["seg"] != old_job.outputs["seg"]  # other input, other object

    # --- the PACS: still one SEG series and one SR series (stable series UIDs)
    assert len(seg_series) == 1 and len(sr_series) == 1
    assert seg_series[0]["ParentStudy"] == sr_series[0]["ParentStudy"]
    assert new_job.outputs["seg"] in segs
    # --- and the old SEG and SR are rejected by an IOCM note sent with the new results
    (note,) = notes
    assert note.ConceptNameCodeSequence[0].CodeValue == "113001"
    assert {
        str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        for item in note.ContentSequence
        if "ReferencedSOPSequence" in item
    } == {old_job.outputs["seg"], old_job.outputs["sr"]}
    newest = segs[new_job.outputs["seg"]]
    assert newest.SeriesInstanceUID == before["SEG"][0]["MainDicomTags"]["SeriesInstanceUID"]

    # --- the newest SEG refers to all N+1 source images, the late one included
    referenced = newest.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == series_uid
    assert {str(i.ReferencedSOPInstanceUID) for i in referenced.ReferencedInstanceSequence} == (
        source
    )
    per_frame = {
        str(src.ReferencedSOPInstanceUID)
        for frame in newest.PerFrameFunctionalGroupsSequence
        for derivation in frame.DerivationImageSequence
        for src in derivation.SourceImageSequence
    }
    assert per_frame <= source and str(late.SOPInstanceUID) in per_frame
