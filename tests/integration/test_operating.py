"""Operating the node as a PACS admin would: every CLI command against a real node.

One real `dicomnode serve` process per database (SQLite, then a fresh PostgreSQL)
receives a CT series from dcmtk's storescu, runs the test lung model and sends SEG
and SR to a real Orthanc. Then each admin command runs against the database and
spool that run filled, and its human and ``--json`` output are checked; bad input
gets one line and a non-zero exit. Last, every line the node logged at INFO and
every line the commands printed without ``--show-phi`` is searched for the patient's
name, ID, birth date and accession number.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage
from sqlalchemy import select

from dicomnode.cli.main import main
from dicomnode.db import Job, make_engine, session_factory
from tests.conftest import free_port, wait_for
from tests.dcmtk import ECHOSCU, STORESCU
from tests.factories import ct_series, lung_phantom, write_series
from tests.integration.node_process import NodeProcess, listener_port, write_config
from tests.integration.orthanc import Orthanc
from tests.unit.inference.packages import build_package

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not all(shutil.which(t) for t in (STORESCU, ECHOSCU, "Orthanc", "dciodvfy")),
        reason="dcmtk, orthanc and dicom3tools are installed by .ci/run",
    ),
]

NAME, PATIENT_ID, BIRTH, ACCESSION = "Secretperson^Hildegard", "MRN-4471-PHI", "19470312", "ACC9931"
PHI = (NAME, "Secretperson", "Hildegard", PATIENT_ID, BIRTH, ACCESSION)


def phi_series(folder: Path) -> list[Path]:
    datasets = ct_series(lung_phantom(), patient_name=NAME, patient_id=PATIENT_ID)
    for ds in datasets:
        ds.PatientBirthDate = BIRTH
        ds.AccessionNumber = ACCESSION
    return write_series(datasets, folder)


@dataclass
class Site:
    """A node that has run a job, and what its admin printed since."""

    config: Path
    node: NodeProcess
    pacs: Orthanc
    capsys: pytest.CaptureFixture[str]
    study_uid: str
    series_uid: str
    metrics_port: int
    printed: list[str] = field(default_factory=list)  # stdout + stderr, no --show-phi

    def cli(self, *args: str) -> tuple[int, str, str]:
        try:
            code = main(["--config", str(self.config), *args])
        except SystemExit as exc:  # argparse's usage errors
            code = int(exc.code or 0)
        out, err = self.capsys.readouterr()
        if "--show-phi" not in args:
            self.printed.append(out + err)
        return code, out, err

    def json(self, *args: str) -> object:
        code, out, err = self.cli(*args, "--json")
        assert code == 0, err
        return json.loads(out)

    def jobs(self) -> list[Job]:
        engine = make_engine(_db_url(self.config))
        try:
            with session_factory(engine)() as s:
                return list(s.scalars(select(Job).order_by(Job.id)))
        finally:
            engine.dispose()


def _db_url(config: Path) -> str:
    import tomllib

    return str(tomllib.loads(config.read_text())["database"]["url"])


def one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def site(tmp_path: Path, db_url: str, capsys: pytest.CaptureFixture[str]) -> Iterator[Site]:
    build_package(tmp_path / "models")
    metrics_port = free_port()
    with Orthanc(tmp_path / "orthanc") as pacs:
        config = write_config(
            tmp_path,
            db_url=db_url,
            pacs_port=pacs.dicom_port,
            quiet_seconds=1,
            models_path=tmp_path / "models",
            model="test-lungs",
            worker_extra='device = "cpu"\nbackend = "torch"',
        )
        config.write_text(
            config.read_text()
            + f'\n[metrics]\nenabled = true\nhost = "127.0.0.1"\nport = {metrics_port}\n'
        )
        node = NodeProcess(config)
        if db_url.startswith("postgresql"):
            upgrade = node.cli("db", "upgrade")
            assert upgrade.returncode == 0, upgrade.stderr
        files = phi_series(tmp_path / "study")
        with node:
            sent = subprocess.run(
                [STORESCU, "-aet", "CT01", "-aec", "DICOMNODE", "-to", "30", "127.0.0.1",
                 str(listener_port(config)), *map(str, files)],
                capture_output=True, text=True, timeout=120, check=False,
            )  # fmt: skip
            assert sent.returncode == 0, sent.stderr
            import pydicom

            first = pydicom.dcmread(files[0], stop_before_pixels=True)
            s = Site(
                config, node, pacs, capsys, first.StudyInstanceUID, first.SeriesInstanceUID,
                metrics_port,
            )  # fmt: skip
            assert wait_for(lambda: [j.state for j in s.jobs()] == ["done"], 180), node.log()
            yield s


def _refuse_and_reject(site: Site) -> None:
    port = listener_port(site.config)
    wrong = subprocess.run(
        [ECHOSCU, "-aet", "INTRUDER", "-aec", "NOT-US", "127.0.0.1", str(port)],
        capture_output=True, timeout=30, check=False,
    )  # fmt: skip
    assert wrong.returncode != 0
    bad = ct_series(lung_phantom(slices=1), patient_name=NAME, patient_id=PATIENT_ID)[0]
    bad.SeriesInstanceUID = "1.2.3/evil"
    ae = AE(ae_title="MR02")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        assert int(assoc.send_c_store(bad).Status) == 0xC212
    finally:
        assoc.release()


def test_every_admin_command_against_a_real_run(site: Site, tmp_path: Path) -> None:
    _refuse_and_reject(site)
    [job] = site.jobs()

    # --- status: healthy, one job done, the listener answers
    code, out, _ = site.cli("status")
    assert code == 0 and "listener" in out and "done" in out
    status = site.json("status")
    assert isinstance(status, dict) and status["listener"]["state"] == "up"

    # --- jobs: list with filters, show, human and JSON
    code, out, _ = site.cli("jobs", "list")
    assert code == 0 and f"{job.id}" in out and "test-lungs" in out and site.series_uid in out
    listed = site.json("jobs", "list", "--state", "done", "--since", "1h")
    assert [j["id"] for j in listed] == [job.id]  # type: ignore[index]
    assert site.json("jobs", "list", "--accession", ACCESSION) == listed
    assert site.json("jobs", "list", "--study", site.study_uid, "--model", "test-lungs") == listed
    assert site.json("jobs", "list", "--route", "no-such-route") == []
    code, out, _ = site.cli("jobs", "show", str(job.id))
    assert code == 0 and "timings (s)" in out and "delivery      pacs: sent" in out
    shown = site.json("jobs", "show", str(job.id))
    assert isinstance(shown, dict) and sorted(o["kind"] for o in shown["outputs"]) == ["seg", "sr"]
    assert "patient_id" not in shown
    code, out, _ = site.cli("jobs", "show", str(job.id), "--show-phi")
    assert code == 0 and PATIENT_ID in out and ACCESSION in out

    # --- studies: the whole story; patient data only on request
    code, out, _ = site.cli("studies", "list")
    assert code == 0 and site.study_uid in out
    code, out, _ = site.cli("studies", "list", "--show-phi")
    assert code == 0 and PATIENT_ID in out
    code, out, _ = site.cli("studies", "show", site.study_uid)
    assert code == 0 and site.series_uid in out and "results-sent" in out
    story = site.json("studies", "show", site.study_uid)
    assert isinstance(story, dict) and site.series_uid in json.dumps(story)

    # --- destinations and models
    code, out, _ = site.cli("destinations", "list")
    assert code == 0 and "pacs" in out and f"{site.pacs.dicom_port}" in out
    code, out, _ = site.cli("destinations", "echo", "pacs")
    assert code == 0 and "pacs ok" in out
    code, out, _ = site.cli("models", "list")
    assert code == 0 and "test-lungs" in out
    model = site.json("models", "show", "test-lungs")
    assert isinstance(model, dict) and model["name"] == "test-lungs"

    # --- the audit trail: who sent what, which job ran, where it went
    code, out, _ = site.cli("audit", "export", "--format", "json")
    trail = json.loads(out)
    events = {(e["event"], e["actor"]) for e in trail}
    assert ("instances-received", "CT01") in events
    assert ("association-rejected", "INTRUDER") in events
    assert ("instances-refused", "MR02") in events
    received = [e for e in trail if e["event"] == "instances-received"]
    assert sum(e["count"] for e in received) == 12 and received[0]["series_uid"] == site.series_uid
    ended = [e for e in trail if e["event"] == "job-ended"]
    assert [(e["job_id"], e["outcome"]) for e in ended] == [(job.id, "done")]
    sent = [e for e in trail if e["event"] == "results-sent"]
    assert [(e["destination"], e["count"], e["outcome"]) for e in sent] == [("pacs", 2, "success")]
    code, out, _ = site.cli("audit", "export", "--since", "1h", "--event", "job-queued")
    assert code == 0 and len(list(csv.DictReader(io.StringIO(out)))) == 1

    # --- send a job's results again by hand, and import a second series
    code, out, _ = site.cli("send", f"job:{job.id}", "pacs", "--no-progress")
    assert code == 0 and "sent 2 object(s) to pacs" in out
    more = phi_series(tmp_path / "more")
    code, out, _ = site.cli("import", str(tmp_path / "more"), "--no-progress")
    assert code == 0 and f"imported {len(more)} instance(s) in 1 series" in out
    assert wait_for(lambda: [j.state for j in site.jobs()] == ["done", "done"], 180)

    # --- retry a done job (re-sends the stored results), cancel refuses an ended one
    finished = site.jobs()[0].finished_at
    code, out, _ = site.cli("jobs", "retry", str(job.id))
    assert code == 0 and f"job {job.id} queued again" in out

    def done_again() -> bool:
        again = site.jobs()[0]
        return (
            again.state == "done" and again.finished_at is not None and again.finished_at > finished
        )

    assert wait_for(done_again, 120), (site.jobs()[0].state, site.jobs()[0].last_error)
    code, _, err = site.cli("jobs", "cancel", str(job.id))
    assert code == 1 and "already done" in one_line(err)

    # --- purges: nothing is due yet, and they say so
    code, out, _ = site.cli("purge", "--dry-run")
    assert code == 0 and "would delete 0 series" in out
    code, out, _ = site.cli("jobs", "purge", "--state", "done", "--older-than", "1d", "--dry-run")
    assert code == 0 and "would purge 0 done job(s)" in out

    # --- the metrics endpoint counted the run
    with urllib.request.urlopen(f"http://127.0.0.1:{site.metrics_port}/metrics", timeout=10) as r:
        body = r.read().decode()
    assert 'dicomnode_jobs{state="done"} 2.0' in body
    assert "dicomnode_instances_received_total 12.0" in body  # the import ran elsewhere

    # --- bad input: one line, non-zero, never a traceback
    for args, expected, message in (
        (["jobs", "show", "999999"], 1, "no job with id 999999"),
        (["jobs", "list", "--since", "last tuesday"], 2, "bad date"),
        (["jobs", "list", "--state", "stuck"], 2, "unknown job state"),
        (["jobs", "retry", "999999"], 1, "no job with id 999999"),
        (["studies", "show", "1.2.3.999"], 1, "1.2.3.999"),
        (["destinations", "echo", "nowhere"], 2, "unknown destination"),
        (["send", str(tmp_path / "missing"), "pacs"], 2, "no such file"),
        (["audit", "export", "--event", "nonsense"], 2, "unknown audit event"),
        (["models", "show", "no-such-model"], 1, "no-such-model"),
    ):
        code, _, err = site.cli(*args)
        assert code == expected and message in one_line(err), (args, code, err)

    # --- no patient data in the node's log or in anything printed without --show-phi
    code = site.node.stop()
    log = site.node.log()
    assert code == 0 and "job done job_id=" in log
    for text in (log, *site.printed):
        for value in PHI:
            assert value not in text, (value, text[:2000])
