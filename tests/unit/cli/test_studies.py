"""``dicomnode studies list`` and ``studies show`` on SQLite and PostgreSQL.

The database is filled the way a node fills it: instances arrive over C-STORE at a
real listener (which writes the audit trail) or through the Ingestor, the completion
sweep completes the series, jobs go through enqueue / claim / finish / fail, and
retention deletes a series' images. Only outputs and deliveries, which a worker
writes while it runs a model, are added as rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE
from sqlalchemy import event, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.cli.main import main
from dicomnode.config import ListenerSettings, RetentionSettings, parse_settings
from dicomnode.db import (
    Delivery,
    DeliveryState,
    Output,
    Series,
    audit,
    make_engine,
    migrate,
    transaction,
    utcnow,
)
from dicomnode.db import jobs as queue
from dicomnode.db.models import AuditEvent
from dicomnode.db.studies import study_summaries
from dicomnode.listener import Listener
from dicomnode.pipeline import encode
from dicomnode.queue.completion import sweep
from dicomnode.store import Ingestor, Spool, retention
from tests.conftest import free_port, wait_for
from tests.factories import ct_series
from tests.unit.cli.test_main import one_line_error, run, write_config

PID_A, ACC_A = "PID-SECRET-4711", "ACCSECRETA"
PID_B, PID_C, ACC_DUP = "PID-SECRET-0815", "PID-SECRET-0042", "ACCSECRETDUP"
PHI = (PID_A, PID_B, PID_C, ACC_A, ACC_DUP)


@dataclass
class Filled:
    """What the fixture put into the database."""

    config: str
    a: str  # study A: complete, one series from SCANNER1, a done and a failed job
    a_series: str
    b: str  # study B: two series from SCANNER2 (Ingestor), one purged, one receiving
    b_series: tuple[str, str]
    c: str  # study C: one series from SCANNER3, purged
    c_series: str
    done: int
    failed: int


def _datasets(slices: int, patient_id: str, accession: str) -> list[Dataset]:
    datasets = ct_series(np.zeros((slices, 8, 8)), patient_id=patient_id)
    for ds in datasets:
        ds.AccessionNumber = accession
    return datasets


def _send(port: int, calling_ae: str, datasets: list[Dataset]) -> None:
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        for ds in datasets:
            assert assoc.send_c_store(ds).Status == 0
    finally:
        assoc.release()


def _audited(sessions: sessionmaker[Session], series_uid: str) -> bool:
    with sessions() as s:
        query = select(func.count(AuditEvent.id)).where(
            AuditEvent.event == "instances-received", AuditEvent.series_uid == series_uid
        )
        return bool(s.scalar(query))


def _purge(sessions: sessionmaker[Session], spool: Spool, series_uid: str) -> None:
    with sessions() as s:
        found = retention.candidates(s, RetentionSettings())
    candidate = next(c for c in found if c.series_uid == series_uid)
    assert retention.delete_series(sessions, spool, candidate, "scheduled: test", "retention")


@pytest.fixture
def filled(tmp_path: Path, db_url: str, sessions: sessionmaker[Session]) -> Filled:
    spool = Spool(tmp_path / "spool")
    settings = parse_settings(
        {
            "database": {"url": db_url},
            "storage": {"path": str(tmp_path / "spool")},
            "completion": {"quiet_seconds": 0},
        },
        environ={},
    )
    # A and C arrive over the network, so the audit trail names their senders.
    a, c = _datasets(4, PID_A, ACC_A), _datasets(2, PID_C, ACC_DUP)
    listener = Listener(
        ListenerSettings(ae_title="DICOMNODE", host="127.0.0.1", port=free_port()),
        Ingestor(spool, sessions),
    )
    listener.start()
    try:
        _send(listener.port, "SCANNER1", a)
        _send(listener.port, "SCANNER3", c)
        assert wait_for(lambda: _audited(sessions, c[0].SeriesInstanceUID), 10)
        assert _audited(sessions, a[0].SeriesInstanceUID)
    finally:
        listener.stop()
    # B's first series through the Ingestor, as `dicomnode import` stores files.
    b1 = _datasets(3, PID_B, ACC_DUP)
    ingestor = Ingestor(spool, sessions)
    for ds in b1:
        ingestor.store(encode(ds), calling_ae="SCANNER2")
    assert sweep(sessions, settings, {}, spool) == 3

    a_series = str(a[0].SeriesInstanceUID)
    with transaction(sessions) as s:
        series = s.scalars(select(Series).where(Series.series_uid == a_series)).one()
        jobs = [
            queue.enqueue(s, series, route="chest", model=m, version="1", max_attempts=1)
            for m in ("lung", "nodule")
        ]
        done, failed = (j.id for j in jobs if j is not None)
    claim = queue.claim(sessions, "worker-1", 60)
    assert claim is not None and claim.job_id == done
    with transaction(sessions) as s:
        for kind, sop in (("seg", "1.2.826.0.1.77.1"), ("sr", "1.2.826.0.1.77.2")):
            s.add(Output(job_id=done, kind=kind, sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4",
                         sop_instance_uid=sop, series_uid=sop + ".9", path=f"out/{kind}.dcm",
                         size_bytes=2048))  # fmt: skip
        s.add(Delivery(job_id=done, destination="pacs", state=DeliveryState.SENT, attempts=1,
                       sent_at=utcnow(), confirmed_at=utcnow()))  # fmt: skip
    assert queue.finish(sessions, claim)
    claim = queue.claim(sessions, "worker-1", 60)
    assert claim is not None and claim.job_id == failed
    with transaction(sessions) as s:
        s.add(Delivery(job_id=failed, destination="archive", state=DeliveryState.FAILED,
                       attempts=2, last_error="cannot connect to 127.0.0.1:1\nsecond line",
                       warning="1 object(s) stored with warning 0xB000"))  # fmt: skip
    queue.fail(sessions, claim, "model crashed\nTraceback (most recent call last)",
               retryable=False, base_seconds=1)  # fmt: skip

    _purge(sessions, spool, str(b1[0].SeriesInstanceUID))
    _purge(sessions, spool, str(c[0].SeriesInstanceUID))
    # A late second series keeps B receiving; it arrived last, so B is the newest.
    b2 = ct_series(np.zeros((2, 8, 8)), patient_id=PID_B)
    for ds in b2:
        ds.StudyInstanceUID = b1[0].StudyInstanceUID
        ds.AccessionNumber = ACC_DUP
        ingestor.store(encode(ds), calling_ae="SCANNER2")
    # A was received three days ago (the one change no component makes by itself).
    with transaction(sessions) as s:
        old = utcnow() - timedelta(days=3)
        s.execute(
            update(Series)
            .where(Series.series_uid == a_series)
            .values(first_received_at=old, last_received_at=old + timedelta(seconds=5))
        )
    return Filled(
        config=str(write_config(tmp_path, db_url)),
        a=str(a[0].StudyInstanceUID),
        a_series=a_series,
        b=str(b1[0].StudyInstanceUID),
        b_series=(str(b1[0].SeriesInstanceUID), str(b2[0].SeriesInstanceUID)),
        c=str(c[0].StudyInstanceUID),
        c_series=str(c[0].SeriesInstanceUID),
        done=done,
        failed=failed,
    )


def _cli(capsys: pytest.CaptureFixture[str], f: Filled, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()  # whatever the fixture's components logged
    return run(capsys, "--log-level", "WARNING", "--config", f.config, "studies", *args)


def _uids(capsys: pytest.CaptureFixture[str], f: Filled, *args: str) -> list[str]:
    code, out, err = _cli(capsys, f, "list", "--json", *args)
    assert code == 0 and not err, err
    return [r["study_uid"] for r in json.loads(out)]


def _no_phi(text: str) -> None:
    for value in PHI:
        assert value not in text


def test_list(filled: Filled, capsys: pytest.CaptureFixture[str]) -> None:
    f = filled
    code, out, err = _cli(capsys, f, "list", "--json")
    assert code == 0 and not err
    _no_phi(out)
    records = json.loads(out)
    assert [r["study_uid"] for r in records] == [f.b, f.c, f.a]
    b, c, a = records
    assert "patient_id" not in a and "accession_number" not in a
    assert a["state"] == "complete" and a["series"] == 1 and a["instances"] == 4
    assert a["jobs"] == {"done": 1, "failed": 1}
    assert a["deliveries"] == {"sent": 1, "pending": 0, "failed": 1}
    assert a["first_received_at"] < a["last_received_at"] < c["first_received_at"]
    assert b["state"] == "receiving" and b["series"] == 2 and b["instances"] == 5
    assert b["jobs"] == {} and b["deliveries"] == {"sent": 0, "pending": 0, "failed": 0}
    assert c["state"] == "purged" and c["series"] == 1 and c["instances"] == 2

    code, out, err = _cli(capsys, f, "list")
    assert code == 0 and not err
    _no_phi(out)
    header, *rows = out.splitlines()
    assert header.split()[:4] == ["STUDY", "STATE", "SERIES", "INSTANCES"]
    assert "PATIENT" not in header and "ACCESSION" not in header
    assert [r.split()[:4] for r in rows] == [
        [f.b, "receiving", "2", "5"],
        [f.c, "purged", "1", "2"],
        [f.a, "complete", "1", "4"],
    ]
    assert rows[2].endswith("1 done, 1 failed  1 sent, 1 failed")
    assert rows[0].split()[-2:] == ["-", "-"]


def test_list_filters(filled: Filled, capsys: pytest.CaptureFixture[str]) -> None:
    f = filled
    assert _uids(capsys, f, "--state", "receiving") == [f.b]
    assert _uids(capsys, f, "--state", "complete") == [f.a]
    assert _uids(capsys, f, "--state", "purged") == [f.c]
    assert _uids(capsys, f, "--accession", ACC_DUP) == [f.b, f.c]
    assert _uids(capsys, f, "--accession", ACC_A) == [f.a]
    assert _uids(capsys, f, "--accession", "NOSUCH") == []
    assert _uids(capsys, f, "--patient-id", PID_A) == [f.a]
    assert _uids(capsys, f, "--patient-id", PID_B, "--accession", ACC_DUP) == [f.b]
    assert _uids(capsys, f, "--limit", "2") == [f.b, f.c]
    assert _uids(capsys, f, "--since", "1d") == [f.b, f.c]
    assert _uids(capsys, f, "--since", "4d") == [f.b, f.c, f.a]
    assert _uids(capsys, f, "--since", "2000-01-01") == [f.b, f.c, f.a]
    assert _uids(capsys, f, "--since", "2999-01-01T00:00:00+02:00") == []
    assert _uids(capsys, f, "--since", "4d", "--state", "complete", "--limit", "1") == [f.a]

    # The filter values are patient data: they filter, but nothing prints them.
    code, out, _ = _cli(capsys, f, "list", "--accession", ACC_DUP)
    assert code == 0 and len(out.splitlines()) == 3
    _no_phi(out)
    code, out, _ = _cli(capsys, f, "list", "--patient-id", "NOSUCH")
    assert code == 0 and out.strip() == "no studies"


def test_list_show_phi(filled: Filled, capsys: pytest.CaptureFixture[str]) -> None:
    f = filled
    code, out, _ = _cli(capsys, f, "list", "--json", "--show-phi")
    assert code == 0
    records = {r["study_uid"]: r for r in json.loads(out)}
    assert records[f.a]["patient_id"] == PID_A and records[f.a]["accession_number"] == ACC_A
    assert records[f.c]["patient_id"] == PID_C and records[f.c]["accession_number"] == ACC_DUP

    code, out, _ = _cli(capsys, f, "list", "--show-phi", "--patient-id", PID_A)
    assert code == 0
    header, row = out.splitlines()
    assert header.startswith("STUDY") and "PATIENT ID" in header and "ACCESSION" in header
    assert row.split()[:4] == [f.a, PID_A, ACC_A, "complete"]


def test_list_is_three_queries(filled: Filled, engine, sessions: sessionmaker[Session]) -> None:
    """However many studies, series and jobs: one aggregate query each, no N+1."""
    statements: list[str] = []

    def count(conn, cursor, statement, *args) -> None:  # type: ignore[no-untyped-def]
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        with sessions() as s:
            records = study_summaries(s, show_phi=True)
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert len(records) == 3
    selects = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
    assert len(selects) == 3, selects


def test_show_human(filled: Filled, capsys: pytest.CaptureFixture[str]) -> None:
    f = filled
    code, out, err = _cli(capsys, f, "show", f.a)
    assert code == 0 and not err
    _no_phi(out)
    lines = out.splitlines()
    assert lines[0].split() == ["study", f.a]
    assert lines[1].split() == ["state", "complete"]
    assert "patient id" not in out and "accession" not in out

    def section(title: str) -> list[str]:
        start = next(i for i, ln in enumerate(lines) if ln.startswith(f"{title} ("))
        end = next((i for i in range(start + 1, len(lines)) if not lines[i]), len(lines))
        return lines[start:end]

    series = section("series")
    assert series[0] == "series (1)"
    assert series[1].split()[:6] == ["SERIES", "MODALITY", "STATE", "GEN", "INSTANCES", "BYTES"]
    assert series[2].split()[:5] == [f.a_series, "CT", "complete", "0", "4"]
    assert series[2].endswith("SCANNER1") and "KiB" in series[2]

    jobs = section("jobs")
    assert jobs[0] == "jobs (2)"
    assert [r.split()[:5] for r in jobs[2:]] == [
        [str(f.done), "chest", "lung", "1", "done"],
        [str(f.failed), "chest", "nodule", "1", "failed"],
    ]
    assert jobs[3].endswith(f"{f.a_series}  model crashed")
    assert "Traceback" not in "\n".join(jobs)  # the first line of an error only

    outputs = section("outputs")
    assert outputs[0] == "outputs (2)"
    assert [r.split()[:3] for r in outputs[2:]] == [
        [str(f.done), "seg", "1.2.826.0.1.77.1"],
        [str(f.done), "sr", "1.2.826.0.1.77.2"],
    ]
    assert outputs[2].endswith("2.0 KiB")

    deliveries = section("deliveries")
    assert deliveries[0] == "deliveries (2)"
    assert deliveries[2].split()[:4] == [str(f.done), "pacs", "sent", "1"]
    assert deliveries[3].split()[:5] == [str(f.failed), "archive", "failed", "2", "-"]
    assert deliveries[3].endswith(
        "cannot connect to 127.0.0.1:1; warning: 1 object(s) stored with warning 0xB000"
    )
    assert "second line" not in out

    timeline = section("timeline")
    assert timeline[1].split()[:4] == ["TIME", "EVENT", "ACTOR", "PEER"]
    events = [r.split()[2] for r in timeline[2:]]
    assert events == ["instances-received", "job-queued", "job-queued", "job-ended", "job-ended"]
    received = timeline[2].split()
    assert received[3] == "SCANNER1" and received[4].startswith("127.0.0.1")
    assert received[5:7] == ["-", "4"]  # no job; four instances


def test_show_json(filled: Filled, capsys: pytest.CaptureFixture[str]) -> None:
    f = filled
    code, out, err = _cli(capsys, f, "show", f.a, "--json")
    assert code == 0 and not err
    _no_phi(out)
    record = json.loads(out)
    assert "patient_id" not in record and "accession_number" not in record
    assert record["study_uid"] == f.a and record["state"] == "complete"
    (series,) = record["series"]
    assert series["series_uid"] == f.a_series and series["modality"] == "CT"
    assert series["state"] == "complete" and series["generation"] == 0
    assert series["instances"] == 4 and series["stored_instances"] == 4
    assert series["bytes"] > 4 * 8 * 8 * 2
    assert series["completed_at"] and series["purged_at"] is None
    assert series["calling_aes"] == ["SCANNER1"]
    done, failed = record["jobs"]
    assert (done["id"], done["state"], done["model"]) == (f.done, "done", "lung")
    assert done["started_at"] and done["finished_at"] and done["attempts"] == 1
    assert [o["kind"] for o in done["outputs"]] == ["seg", "sr"]
    assert done["outputs"][0]["size_bytes"] == 2048
    (sent,) = done["deliveries"]
    assert sent["state"] == "sent" and sent["sent_at"] and sent["confirmed_at"]
    assert failed["state"] == "failed" and failed["last_error"].startswith("model crashed")
    (broken,) = failed["deliveries"]
    assert broken["destination"] == "archive" and broken["attempts"] == 2
    assert broken["last_error"].startswith("cannot connect") and broken["warning"]
    assert [h["to"] for h in failed["history"]] == ["queued", "running", "failed"]
    timeline = record["timeline"]
    assert [e["event"] for e in timeline] == [
        "instances-received", "job-queued", "job-queued", "job-ended", "job-ended",
    ]  # fmt: skip
    assert timeline[0]["actor"] == "SCANNER1" and timeline[0]["count"] == 4
    assert timeline[-1]["job_id"] == f.failed and timeline[-1]["outcome"] == "failed"
    assert [e["at"] for e in timeline] == sorted(e["at"] for e in timeline)


SUMMARY_KEYS = ["study_uid", "state", "series", "instances", "first_received_at",
                "last_received_at", "jobs", "deliveries"]  # fmt: skip
STORY_KEYS = ["study_uid", "state", "created_at", "first_received_at", "last_received_at",
              "series", "jobs", "timeline", "selections"]  # fmt: skip
SERIES_KEYS = ["series_uid", "modality", "state", "generation", "instances", "stored_instances",
               "bytes", "expected_instances", "first_received_at", "last_received_at",
               "completed_at", "purged_at", "calling_aes"]  # fmt: skip


def test_the_json_keys_and_their_order(filled: Filled, capsys: pytest.CaptureFixture[str]) -> None:
    """``--json`` prints the keys scripts read, in the same order, patient data only asked."""
    f = filled
    phi = ["patient_id", "accession_number"]
    code, out, _ = _cli(capsys, f, "list", "--json")
    assert code == 0 and [list(r) for r in json.loads(out)] == [SUMMARY_KEYS] * 3
    code, out, _ = _cli(capsys, f, "list", "--json", "--show-phi")
    expected = SUMMARY_KEYS[:1] + phi + SUMMARY_KEYS[1:]
    assert code == 0 and [list(r) for r in json.loads(out)] == [expected] * 3
    code, out, _ = _cli(capsys, f, "show", f.a, "--json")
    record = json.loads(out)
    assert code == 0 and list(record) == STORY_KEYS
    assert [list(s) for s in record["series"]] == [SERIES_KEYS]
    assert [list(e) for e in record["timeline"]] == [list(audit.FIELDS)] * len(record["timeline"])
    code, out, _ = _cli(capsys, f, "show", f.a, "--json", "--show-phi")
    assert code == 0 and list(json.loads(out)) == STORY_KEYS[:1] + phi + STORY_KEYS[1:]


def test_show_purged_and_receiving(filled: Filled, capsys: pytest.CaptureFixture[str]) -> None:
    f = filled
    code, out, _ = _cli(capsys, f, "show", f.c, "--json")
    assert code == 0
    record = json.loads(out)
    assert record["state"] == "purged" and record["jobs"] == []
    (series,) = record["series"]
    assert series["purged_at"] and series["instances"] == 2
    assert series["stored_instances"] == 0 and series["bytes"] == 0
    # The instance rows are gone; the audit trail still names the sender.
    assert series["calling_aes"] == ["SCANNER3"]
    assert [e["event"] for e in record["timeline"]] == ["instances-received", "instances-deleted"]
    assert record["timeline"][1]["actor"] == "retention"

    code, out, _ = _cli(capsys, f, "show", f.b)
    assert code == 0
    _no_phi(out)
    assert out.splitlines()[1].split() == ["state", "receiving"]
    assert "series (2)" in out and "jobs (0)" in out and "timeline (1)" in out
    rows = {ln.split()[0]: ln for ln in out.splitlines() if ln.startswith(f.b_series)}
    purged, receiving = (rows[uid].split() for uid in f.b_series)
    # Purged: no bytes left; its sender's instance rows are gone, and no audit entry
    # names it (it came through the Ingestor, not over the network).
    assert purged[2:7] == ["complete", "0", "3", "0", "B"] and purged[-1] == "-"
    assert len(purged) == 16  # completed and purged: both a date and a time
    assert receiving[2:5] == ["receiving", "0", "2"]
    assert receiving[-3:] == ["-", "-", "SCANNER2"]  # not completed, not purged


def test_show_by_accession(filled: Filled, capsys: pytest.CaptureFixture[str]) -> None:
    f = filled
    code, out, _ = _cli(capsys, f, "show", "--accession", ACC_A, "--json")
    assert code == 0 and json.loads(out)["study_uid"] == f.a

    code, out, _ = _cli(capsys, f, "show", "--accession", ACC_A, "--show-phi")
    assert code == 0
    assert f"patient id      {PID_A}" in out.splitlines()
    assert f"accession       {ACC_A}" in out.splitlines()
    code, out, _ = _cli(capsys, f, "show", f.a, "--json", "--show-phi")
    record = json.loads(out)
    assert record["patient_id"] == PID_A and record["accession_number"] == ACC_A

    # Two studies share the number: both are listed, and the command fails.
    code, out, err = _cli(capsys, f, "show", "--accession", ACC_DUP)
    assert code == 1
    assert "matches 2 studies" in one_line_error(err)
    _no_phi(out + err)
    header, *rows = out.splitlines()
    assert header.startswith("STUDY") and [r.split()[0] for r in rows] == [f.b, f.c]
    code, out, err = _cli(capsys, f, "show", "--accession", ACC_DUP, "--json")
    assert code == 1 and "matches 2 studies" in one_line_error(err)
    assert [r["study_uid"] for r in json.loads(out)["matches"]] == [f.b, f.c]

    code, out, err = _cli(capsys, f, "show", "--accession", "NOSUCH")
    assert code == 1 and not out
    assert one_line_error(err) == "dicomnode: no study with accession number"


def test_unknown_study(filled: Filled, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _cli(capsys, filled, "show", "1.2.3.999")
    assert code == 1 and not out
    assert one_line_error(err) == "dicomnode: no study 1.2.3.999"


@pytest.mark.system
def test_database_not_migrated(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'empty.db'}")
    migrate.upgrade(engine, "0004")
    engine.dispose()
    config = str(write_config(tmp_path, f"sqlite:///{tmp_path / 'empty.db'}"))
    for args in (["list"], ["show", "1.2.3"]):
        code, out, err = run(capsys, "--config", config, "studies", *args)
        assert code == 1 and not out
        assert "run `dicomnode db upgrade`" in one_line_error(err)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["list", "--since", "yesterday"], "argument --since: bad date 'yesterday'"),
        (["list", "--since", "2024-13-45"], "argument --since: bad date '2024-13-45'"),
        (["list", "--limit", "0"], "argument --limit: expected a whole number of at least 1"),
        (["list", "--limit", "many"], "argument --limit: expected a whole number of at least 1"),
        (["list", "--state", "done"], "argument --state: unknown study state 'done'"),
        (["show"], "one of the arguments STUDY --accession is required"),
        (["show", "1.2.3", "--accession", "A1"], "argument --accession: not allowed with"),
        (["show", "1.2.3", "4.5.6"], "unrecognized arguments: 4.5.6"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["studies", *args])
    assert info.value.code == 2
    out, err = capsys.readouterr()
    assert not out
    line = one_line_error(err)
    assert line.startswith("dicomnode") and ": error: " in line and message in line
