"""``dicomnode jobs show ID --preview out.png`` on real jobs, and the overlay of a detection job.

The jobs run through the real pipeline and worker (a lung route with ``overlay = true``,
and a detection route), then the CLI reads their SEG and source images back from the
spool and draws the montage.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sqlalchemy import select

from dicomnode.cli.main import main
from dicomnode.config import Settings
from dicomnode.db import Job, JobState
from dicomnode.imaging import load_registry
from dicomnode.inference import ModelCache
from dicomnode.outputs.preview import COLUMNS, TILE_WIDTH
from dicomnode.pipeline import Pipeline, encode
from dicomnode.queue import Worker
from dicomnode.queue.completion import sweep
from dicomnode.store import Ingestor, Spool
from tests.factories import ct_series, lung_phantom
from tests.integration.test_pipeline import (  # noqa: F401 - scp is a fixture
    CountingSCP,
    make_settings,
    scp,
)
from tests.unit.inference.packages import build_detection_package, build_package
from tests.unit.inference.test_detect import nodule_volume

SC = "1.2.840.10008.5.1.4.1.1.7.4"


def write_config(tmp_path: Path, settings: Settings) -> str:
    config = tmp_path / "node.toml"
    config.write_text(
        f"""
[database]
url = "{settings.database.url}"
[storage]
path = "{settings.storage.path}"
[models]
path = "{settings.models.path}"
[logging]
level = "WARNING"
"""
    )
    return str(config)


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """main() installs its own stderr handler; give the root logger back to pytest after."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def run_job(settings: Settings, sessions, datasets) -> int:
    models = load_registry(settings.models.path)
    spool = Spool(settings.storage.path)
    pipeline = Pipeline(settings, sessions, spool, models, ModelCache(torch.device("cpu")))
    worker = Worker(sessions, pipeline, settings.worker, threading.Event())
    ingestor = Ingestor(spool, sessions)
    for ds in datasets:
        ingestor.store(encode(ds))
    assert sweep(sessions, settings, models, spool) == 1
    assert worker.run_once()
    with sessions() as s:
        job = s.scalars(select(Job).order_by(Job.id.desc())).first()
        assert job is not None and job.state == JobState.DONE, job and job.last_error
        return job.id


@pytest.fixture
def lung_job(tmp_path: Path, db_url: str, sessions, scp: CountingSCP):  # noqa: F811
    settings = make_settings(tmp_path, db_url, scp.port, overlay=True)
    scp.start()
    job_id = run_job(settings, sessions, ct_series(lung_phantom(slices=12, size=64)))
    return {"settings": settings, "config": write_config(tmp_path, settings), "id": job_id}


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_preview_writes_a_montage_of_the_seg(
    lung_job: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "out.png"
    code, out, err = cli(
        capsys, "--config", lung_job["config"], "jobs", "show", str(lung_job["id"]),
        "--preview", str(target),
    )  # fmt: skip
    assert code == 0, err
    assert f"preview       {target}" in out
    assert "output        sc" in out  # the overlay series is one of the job's outputs
    with Image.open(target) as image:
        assert image.format == "PNG" and image.mode == "RGB"
        # 10 slices of the 12-slice phantom hold lungs: 4 across, 3 rows of 256 px tiles.
        assert image.width == COLUMNS * TILE_WIDTH
        assert image.height > 3 * TILE_WIDTH
        pixels = np.asarray(image).reshape(-1, 3)
    spec = load_registry(lung_job["settings"].models.path)["test-lungs"]
    for segment in spec.output.segments:  # legend swatches and outlines
        assert (pixels == segment.color).all(axis=1).sum() > 50
    assert (pixels == (255, 60, 60)).all(axis=1).any()  # NOT FOR CLINICAL USE in the header


def test_preview_with_json_keeps_stdout_json(
    lung_job: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "j.png"
    code, out, err = cli(
        capsys, "--config", lung_job["config"], "jobs", "show", str(lung_job["id"]), "--json",
        "--preview", str(target),
    )  # fmt: skip
    assert code == 0 and json.loads(out)["id"] == lung_job["id"]
    assert str(target) in err and target.is_file()


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("missing/out.png", "no directory"),
        (".", "it is a directory"),
    ],
)
def test_preview_to_an_unwritable_path_is_one_line_and_exit_1(
    lung_job: dict,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    where: str,
    message: str,
) -> None:
    code, out, err = cli(
        capsys, "--config", lung_job["config"], "jobs", "show", str(lung_job["id"]),
        "--preview", str(tmp_path / where),
    )  # fmt: skip
    assert code == 1 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith("dicomnode: cannot write the preview") and message in lines[0]


def test_preview_of_an_unknown_job_or_one_without_a_seg(
    lung_job: dict, tmp_path: Path, sessions, capsys: pytest.CaptureFixture[str]
) -> None:
    target = str(tmp_path / "x.png")
    code, _, err = cli(
        capsys, "--config", lung_job["config"], "jobs", "show", "4242", "--preview", target
    )
    assert code == 1 and err.strip() == "dicomnode: no job with id 4242"
    # A second series: its job is queued, not run, so it has no SEG yet.
    settings = lung_job["settings"]
    models = load_registry(settings.models.path)
    spool = Spool(settings.storage.path)
    for ds in ct_series(lung_phantom(slices=12, size=64)):
        Ingestor(spool, sessions).store(encode(ds))
    assert sweep(sessions, settings, models, spool) == 1
    queued = str(lung_job["id"] + 1)
    code, out, err = cli(
        capsys, "--config", lung_job["config"], "jobs", "show", queued, "--preview", target
    )
    assert code == 1 and out == ""
    assert err.strip() == (
        f"dicomnode: job {queued} has no SEG output yet (state queued); nothing to preview"
    )
    assert not Path(target).exists()


def test_detection_job_overlay_and_preview_show_the_finding(
    tmp_path: Path,
    db_url: str,
    sessions,
    scp: CountingSCP,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    models = tmp_path / "models"
    build_package(models, "test-lungs")
    build_detection_package(models, "test-nodules")
    settings = make_settings(
        tmp_path, db_url, scp.port, models=models, model="test-nodules", overlay=True
    )
    volume, _center = nodule_volume()
    datasets = []
    for k, ds in enumerate(volume.datasets):
        ds.PixelData = (volume.pixels[k] + 1024).astype(np.int16).tobytes()
        datasets.append(ds)
    scp.start()
    job_id = run_job(settings, sessions, datasets)
    received = {str(ds.SOPClassUID): ds for ds in scp.received}
    sc = received[SC]
    assert sc.SeriesDescription.startswith("AI test-nodules overlay")
    assert dicom_frames_with(sc, (255, 200, 0))  # "Nodule 1" in the first finding colour

    target = tmp_path / "nodules.png"
    code, _, err = cli(
        capsys, "--config", write_config(tmp_path, settings), "jobs", "show", str(job_id),
        "--preview", str(target),
    )  # fmt: skip
    assert code == 0, err
    with Image.open(target) as image:
        pixels = np.asarray(image).reshape(-1, 3)
    assert (pixels == (255, 200, 0)).all(axis=1).sum() > 20


def dicom_frames_with(ds, color: tuple[int, int, int]) -> int:
    frames = ds.pixel_array.reshape(int(ds.NumberOfFrames), -1, 3)
    return int((frames == color).all(axis=2).any(axis=1).sum())
