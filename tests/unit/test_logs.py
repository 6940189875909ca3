from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicomnode.errors import InvalidUID
from dicomnode.logs import setup_logging
from dicomnode.pipeline import encode
from dicomnode.store import Ingestor, Spool
from tests.factories import ct_series

NAME = "DOE^JANE^SECRET"
BIRTH = "1970013"  # invalid DA: pydicom would quote it in a warning


@pytest.fixture
def restore_pydicom():
    mode = pydicom.config.settings.reading_validation_mode
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    pydicom.config.settings.reading_validation_mode = mode
    for name in ("pydicom", "pynetdicom", "apscheduler", "alembic", "highdicom"):
        logging.getLogger(name).setLevel(logging.NOTSET)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def test_received_values_never_reach_the_log(
    tmp_path: Path, sessions, capfd: pytest.CaptureFixture[str], restore_pydicom: None
) -> None:
    setup_logging("INFO")
    ds = ct_series(np.zeros((1, 4, 4), np.float32), patient_name=NAME, patient_id="MRN-SECRET")[0]
    ds.PatientBirthDate = BIRTH
    ds.SeriesInstanceUID = "1.2.3.4/5"  # refused
    ingestor = Ingestor(Spool(tmp_path), sessions)
    with pytest.raises(InvalidUID, match="SeriesInstanceUID"):
        ingestor.store(encode(ds))
    ds.SeriesInstanceUID = "1.2.3.4.5"
    ingestor.store(encode(ds))
    logging.getLogger("dicomnode").info("done")
    out, err = capfd.readouterr()
    assert "done" in err  # the log really is captured here
    for phi in (NAME, "MRN-SECRET", BIRTH):
        assert phi not in out + err


def test_json_lines_carry_the_job_outcome_fields(
    capfd: pytest.CaptureFixture[str], restore_pydicom: None
) -> None:
    import json
    import time

    from dicomnode.db import Claim
    from dicomnode.queue.worker import outcome_fields

    setup_logging("INFO", "json")
    claim = Claim(job_id=42, owner="w1", attempt=2, model="lung-unet2d")
    fields = outcome_fields(claim, "done", time.perf_counter(), timings={"inference_s": 1.23456})
    logging.getLogger("dicomnode.queue.worker").info("job done job_id=42", extra=fields)
    logging.getLogger("dicomnode").debug("not shown at INFO")
    _, err = capfd.readouterr()
    [line] = err.splitlines()
    data = json.loads(line)
    assert data["message"] == "job done job_id=42" and data["level"] == "INFO"
    assert data["logger"] == "dicomnode.queue.worker" and data["time"].endswith("+00:00")
    assert (data["job_id"], data["model"], data["attempt"], data["outcome"]) == (
        42,
        "lung-unet2d",
        2,
        "done",
    )
    assert data["stages"] == {"inference_s": 1.235} and data["seconds"] >= 0


def test_text_lines_are_utc_and_carry_a_journal_priority_under_systemd(
    capfd: pytest.CaptureFixture[str], restore_pydicom: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import re

    setup_logging("INFO")
    logging.getLogger("dicomnode").warning("plain")
    monkeypatch.setenv("JOURNAL_STREAM", "8:12345")  # someone else's stream: no prefix
    setup_logging("INFO")
    logging.getLogger("dicomnode").warning("plain")
    stat = os.fstat(sys.stderr.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{stat.st_dev}:{stat.st_ino}")
    setup_logging("INFO")
    logging.getLogger("dicomnode").warning("journal")
    logging.getLogger("dicomnode").error("bad")
    _, err = capfd.readouterr()
    plain, inherited, journal, bad = err.splitlines()
    assert inherited.endswith("WARNING dicomnode: plain") and not inherited.startswith("<")
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
    assert re.fullmatch(rf"{stamp} WARNING dicomnode: plain", plain)
    assert re.fullmatch(rf"<4>{stamp} WARNING dicomnode: journal", journal)
    assert bad.startswith("<3>")


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_peer_string_cannot_start_a_log_line_of_its_own(
    fmt: str, capfd: pytest.CaptureFixture[str], restore_pydicom: None
) -> None:
    setup_logging("INFO", fmt)
    forged = "CT01\n2026-12-07T00:00:00.000Z INFO dicomnode: stored\r\x1b[2J\u2028x"
    logging.getLogger("pynetdicom.utils").error("Invalid 'calling_ae_title' value '%s'", forged)
    try:
        raise ValueError(forged)
    except ValueError:
        logging.getLogger("dicomnode.net").exception("failed calling_ae=%s", forged)
    _, err = capfd.readouterr()
    lines = err.splitlines()
    events = [line for line in lines if not line.startswith(" ")]
    assert len(events) == 2, err  # one line per event; a traceback is indented below
    assert not any(line.startswith("2026-12-07T00:00:00.000Z") for line in lines)
    assert "\x1b" not in err and "\r" not in err and "\u2028" not in err
    if fmt == "text":
        assert "CT01\\n2026-12-07T00:00:00.000Z INFO dicomnode: stored\\r\\x1b[2J" in events[0]
