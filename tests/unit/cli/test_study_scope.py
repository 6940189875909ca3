"""``jobs show`` and ``studies show`` say which series a study-scope route chose, and why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from dicomnode.db import Job
from dicomnode.store import Spool
from tests.unit.cli.test_main import run, write_config
from tests.unit.queue.test_study import settled, three_series


def test_the_choice_and_every_series_verdict_are_shown(
    tmp_path: Path, db_url: str, sessions, capsys: pytest.CaptureFixture[str]
) -> None:
    spool = Spool(tmp_path / "spool")
    study_uid = generate_uid()
    parts = three_series(study_uid)
    settled(spool, sessions, [ds for part in parts.values() for ds in part])
    with sessions() as s:
        job_id = s.scalar(select(Job.id).where(Job.route == "lung-study"))
    config = str(write_config(tmp_path, db_url))
    thin = parts["thin lung"][0].SeriesInstanceUID
    thick = parts["thick soft tissue"][0].SeriesInstanceUID

    code, out, _ = run(capsys, "--log-level", "WARNING", "--config", config, "jobs", "show",
                       str(job_id))  # fmt: skip
    assert code == 0
    lines = out.splitlines()
    assert "input series  best of 1 fitting series (3 judged): prefers ConvolutionKernel, " \
        "6 slices, 1 mm" in lines  # fmt: skip
    assert f"  series 2         6 slices     1 mm  chosen  {thin}" in lines
    refused = "refused: 5 mm slices, above 3 mm"
    assert f"  series 3         4 slices     5 mm  {refused}  {thick}" in lines
    assert "study scope: series chosen" in out  # the job's history says how it was queued

    code, out, _ = run(capsys, "--log-level", "WARNING", "--config", config, "jobs", "show",
                       str(job_id), "--json")  # fmt: skip
    assert code == 0 and json.loads(out)["selection"]["chosen"] == thin

    code, out, _ = run(capsys, "--log-level", "WARNING", "--config", config, "studies", "show",
                       study_uid)  # fmt: skip
    assert code == 0
    assert "route lung-study (study scope): best of 1 fitting series (3 judged)" in out
    table = out[out.index("route lung-study") :].splitlines()
    row = next(line for line in table if line.startswith(thin))
    assert row.split()[1:] == ["2", "6", "1", "mm", "chosen"]
    code, out, _ = run(capsys, "--log-level", "WARNING", "--config", config, "studies", "show",
                       study_uid, "--json")  # fmt: skip
    verdicts = [e["verdict"] for e in json.loads(out)["selections"]["lung-study"]["series"]]
    assert code == 0 and verdicts == [
        "not a volume (localizer)", "chosen", "refused: 5 mm slices, above 3 mm"
    ]  # fmt: skip
