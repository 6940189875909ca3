from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from dicomnode.pipeline import encode
from dicomnode.store.ingest import Ingestor
from dicomnode.store.orphans import remove_orphans
from dicomnode.store.spool import Spool
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
