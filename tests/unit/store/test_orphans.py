from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from dicomnode.pipeline import encode
from dicomnode.store import Ingestor, Spool, remove_orphans
from tests.factories import ct_series


def test_only_old_files_without_a_row_go(tmp_path: Path, sessions) -> None:
    spool = Spool(tmp_path / "spool")
    ingestor = Ingestor(spool, sessions)
    kept = [ingestor.store(encode(ds)) for ds in ct_series(np.zeros((2, 8, 8), np.float32))]
    series_dir = spool.absolute(kept[0].path).parent
    # What a crash between rename and commit leaves: a whole file, no row.
    orphan = series_dir / "1.2.3.4_deadbeef0001.dcm"
    orphan.write_bytes(spool.absolute(kept[0].path).read_bytes())
    stray = spool.root / "incoming" / "1.2.9" / "1.2.9.1" / "1.2.9.1.1_cafe.dcm"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"x")

    # Young: a store may still be on its way to committing them.
    assert remove_orphans(spool, sessions, older_than=600) == 0
    assert orphan.exists() and stray.exists()
    # An hour later they go; the acknowledged files, as old, stay.
    assert remove_orphans(spool, sessions, older_than=600, now=time.time() + 3600) == 2
    assert not orphan.exists() and not stray.exists()
    assert all(spool.absolute(k.path).is_file() for k in kept)
    assert remove_orphans(spool, sessions, older_than=600, now=time.time() + 3600) == 0


def test_result_files_no_output_row_names_go_too(tmp_path: Path, sessions) -> None:
    from dicomnode.db import Output, Series, jobs, transaction

    spool = Spool(tmp_path / "spool")
    ingestor = Ingestor(spool, sessions)
    stored = ingestor.store(encode(ct_series(np.zeros((1, 8, 8), np.float32))[0]))
    with transaction(sessions) as s:
        series = s.get(Series, 1)
        job = jobs.enqueue(s, series, route="r", model="m", version="1", max_attempts=1)
        assert job is not None
        s.add(
            Output(job_id=job.id, kind="seg", sop_class_uid="1.2", sop_instance_uid="1.2.7",
                   series_uid="1.2.7", path="results/1.2/1.2.7/1.2.7.dcm", size_bytes=1)
        )  # fmt: skip
    named = spool.write(Path("results/1.2/1.2.7/1.2.7.dcm"), b"seg")
    left = spool.write(Path("results/1.2/1.2.7/1.2.8.dcm"), b"written, never committed")
    later = time.time() + 3600
    assert remove_orphans(spool, sessions, older_than=600, now=later) == 1
    assert named.exists() and not left.exists() and spool.absolute(stored.path).exists()
