"""Size and build time of every output type for one real CT (LIDC-IDRI-0001 by default).

For the lung U-Net's masks and the nodule model's findings on the same series, it
builds each object the node can send (SEG in each encoding, SR, Secondary Capture
overlay, IOCM rejection note), encodes it, runs the validation the node runs before
sending (our checks and dciodvfy where it applies), and prints bytes and seconds.
The reference, in the same run, is the size of the source series itself.

Usage::

    python bench/outputs.py [SERIES_DIR]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dicomnode.config import SegOptions  # noqa: E402
from dicomnode.imaging.manifest import load_registry  # noqa: E402
from dicomnode.imaging.measurements import segment_stats  # noqa: E402
from dicomnode.imaging.volume import load_series  # noqa: E402
from dicomnode.inference.detect import detect  # noqa: E402
from dicomnode.inference.segment import ModelCache, segment  # noqa: E402
from dicomnode.outputs.findings import (  # noqa: E402
    finding_segments,
    reported_findings,
    study_finding,
)
from dicomnode.outputs.provenance import Provenance  # noqa: E402
from dicomnode.outputs.rejection import build_rejection_note  # noqa: E402
from dicomnode.outputs.sc import build_overlay_capture  # noqa: E402
from dicomnode.outputs.seg import build_segmentation  # noqa: E402
from dicomnode.outputs.sr import build_measurement_report  # noqa: E402
from dicomnode.outputs.validate import validate_file  # noqa: E402
from dicomnode.pipeline import encode  # noqa: E402
from tests.testdata import restored_case  # noqa: E402


def timed(build, folder: Path, name: str) -> tuple[object, float, int, float, Path]:
    started = time.perf_counter()
    ds = build()
    built = time.perf_counter() - started
    started = time.perf_counter()
    data = encode(ds)
    path = folder / f"{name}.dcm"
    path.write_bytes(data)
    validate_file(path, "auto")
    checked = time.perf_counter() - started
    return ds, built, len(data), checked, path


def main() -> None:
    # default: tests/data/ct/LIDC-IDRI-0001, restored to the uncompressed originals
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else restored_case("LIDC-IDRI-0001")
    files = sorted(p for p in folder.glob("*.dcm"))
    source_bytes = sum(p.stat().st_size for p in files)
    models = load_registry(None)
    lungs, nodules = models["lung-unet2d"], models["lung-nodule-cnn"]
    cache = ModelCache(torch.device("cpu"), backend="auto")
    volume = load_series(files)
    labels = segment(lungs, volume, cache).labels
    found = detect(nodules, lungs, volume, cache)
    print(f"series: {folder.name}, {volume.shape[0]} slices, {source_bytes / 1e6:.1f} MB")
    print(f"{'object':<34}{'build s':>8}{'encode+check s':>15}{'bytes':>13}{'vs source':>10}")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        lung_p = Provenance(lungs.name, lungs.version)
        segs = {}
        for name, options in (
            ("SEG binary", SegOptions()),
            ("SEG binary, JPEG 2000", SegOptions(compression="jpeg2000")),
            ("SEG binary, empty frames kept", SegOptions(empty_frames=True)),
            ("SEG labelmap, JPEG-LS", SegOptions(type="labelmap", compression="jpeg-ls")),
        ):
            segs[name] = timed(
                lambda o=options, n=name: build_segmentation(
                    volume.datasets,
                    labels,
                    lungs.output.segments,
                    lung_p,
                    series_uid=lung_p.uid("seg"),
                    sop_uid=lung_p.uid("seg", n),
                    series_number=9901,
                    frames=volume.frames,
                    options=o,
                ),
                out,
                name.replace(" ", "_").replace(",", ""),
            )
            rows.append((name, *segs[name][1:4]))
        seg = segs["SEG binary"][0]
        stats = segment_stats(
            labels, volume.pixels, volume.voxel_volume_ml, [s.label for s in lungs.output.segments]
        )
        sr = timed(
            lambda: build_measurement_report(
                seg,
                volume.datasets,
                stats,
                lungs.output.segments,
                lung_p,
                series_uid=lung_p.uid("sr"),
                sop_uid=lung_p.uid("sr", "1"),
                series_number=9902,
            ),
            out,
            "sr",
        )
        rows.append(("SR TID 1500 (2 lungs)", *sr[1:4]))
        sc = timed(
            lambda: build_overlay_capture(
                volume,
                labels,
                lungs.output.segments,
                lung_p,
                series_uid=lung_p.uid("sc"),
                sop_uid=lung_p.uid("sc", "1"),
                series_number=9903,
            ),
            out,
            "sc",
        )
        rows.append((f"SC overlay ({sc[0].NumberOfFrames} frames, RGB)", *sc[1:4]))

        nod_p = Provenance(nodules.name, nodules.version)
        nod_segments = finding_segments(nodules, len(found.findings))
        nod_labels = found.labels(volume.shape)
        nod_seg = timed(
            lambda: build_segmentation(
                volume.datasets,
                nod_labels,
                nod_segments,
                nod_p,
                series_uid=nod_p.uid("seg"),
                sop_uid=nod_p.uid("seg", "1"),
                series_number=9911,
                frames=volume.frames,
            ),
            out,
            "nodule_seg",
        )
        rows.append((f"SEG nodules ({len(found.findings)} segments)", *nod_seg[1:4]))
        nod_stats = segment_stats(
            nod_labels, volume.pixels, volume.voxel_volume_ml, [s.label for s in nod_segments]
        )
        nod_sr = timed(
            lambda: build_measurement_report(
                nod_seg[0],
                volume.datasets,
                nod_stats,
                nod_segments,
                nod_p,
                series_uid=nod_p.uid("sr"),
                sop_uid=nod_p.uid("sr", "1"),
                series_number=9912,
                findings=reported_findings(found, volume),
                study=study_finding(nodules, found),
            ),
            out,
            "nodule_sr",
        )
        rows.append(("SR TID 1500 (nodules + study)", *nod_sr[1:4]))
        kos = timed(
            lambda: build_rejection_note(
                [segs["SEG binary"][4], sr[4]],
                lung_p,
                series_uid=lung_p.uid("ko"),
                sop_uid=lung_p.uid("ko", "1"),
                series_number=9909,
            ),
            out,
            "kos",
        )
        rows.append(("KOS rejection note (2 objects)", *kos[1:4]))

    for name, built, size, checked in rows:
        print(f"{name:<34}{built:>8.2f}{checked:>15.2f}{size:>13,}{size / source_bytes:>9.1%}")


if __name__ == "__main__":
    main()
