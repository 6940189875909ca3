"""Time every stage of one real job, and compare inference with plain eager PyTorch.

What it does, all on this machine:

1. starts Debian's Orthanc on loopback ports as the PACS;
2. starts ``dicomnode serve`` (SQLite, a temporary spool) pointing at it;
3. sends a CT series with dcmtk's ``storescu`` and waits for the SEG and SR in Orthanc;
4. prints the job's stage timings as recorded in the job table;
5. runs the reference: the same TorchScript model, eager fp32, batch 8, over the same
   slices read with pydicom, and prints our inference stage against it.

Usage::

    python bench/stages.py [SERIES_DIR] [--model lung-nodule-cnn]
    # default: tests/data/ct/LIDC-IDRI-0001 (restored uncompressed) and lung-unet2d
    python bench/stages.py [SERIES_DIR] --reuse

With a detection model the reference is compared with its mask model's stage.
``--reuse`` runs the lung and nodule routes together (the nodule job reads the lung
job's SEG back as its mask) and, as the reference, the nodule route alone (it runs
the lung model itself), and prints both nodule jobs' stages side by side.

It reuses the test suite's Orthanc and process helpers, so run it from the checkout.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dicomnode.cli.job_output import STAGES  # noqa: E402
from dicomnode.imaging.manifest import load_registry  # noqa: E402
from dicomnode.inference.backends import cpu_has_bf16, openvino_available  # noqa: E402
from dicomnode.inference.device import configure_threads  # noqa: E402
from tests.dcmtk import STORESCU  # noqa: E402
from tests.integration.node_process import (  # noqa: E402
    NODULE_ROUTE,
    NodeProcess,
    listener_port,
    write_config,
)
from tests.integration.orthanc import Orthanc  # noqa: E402
from tests.testdata import restored_case  # noqa: E402


def run_jobs(
    series: list[Path], workdir: Path, model: str, routes_extra: str = "", worker_extra: str = ""
) -> list[dict]:
    """Send the series to a fresh node; return every job's record once all sent an SR."""
    expected = 1 + routes_extra.count("[[routes]]")
    with Orthanc(workdir / "orthanc") as pacs:
        config = write_config(workdir, db_url=f"sqlite:///{workdir / 'node.db'}",
                              pacs_port=pacs.dicom_port, quiet_seconds=2,
                              model=model, routes_extra=routes_extra,
                              worker_extra=worker_extra)  # fmt: skip
        with NodeProcess(config) as node:
            started = time.perf_counter()
            subprocess.run(
                [STORESCU, "-xt", "-aec", "DICOMNODE", "127.0.0.1",
                 str(listener_port(config)), *map(str, series)],
                check=True, capture_output=True, timeout=600,
            )  # fmt: skip
            sent = time.perf_counter() - started
            while True:
                found = pacs.series_by_modality()
                # a detection that finds nothing sends no SEG
                if len(found.get("SR", [])) >= expected:
                    break
                if time.perf_counter() - started > 1200:
                    raise RuntimeError("no results after 20 minutes:\n" + node.log()[-2000:])
                time.sleep(0.5)
            wall = time.perf_counter() - started
            jobs = [
                json.loads(node.cli("jobs", "show", str(n), "--json").stdout)
                for n in range(1, expected + 1)
            ]
    for job in jobs:
        job["storescu_s"] = sent
        job["wall_s"] = wall
    return jobs


def run_job(series: list[Path], workdir: Path, model: str, worker_extra: str = "") -> dict:
    return run_jobs(series, workdir, model, worker_extra=worker_extra)[0]


def print_stages(columns: dict[str, dict[str, float]]) -> None:
    names = [s for s in STAGES if any(s in t for t in columns.values())]
    names += sorted({s for t in columns.values() for s in t if s not in STAGES})
    print(f"{'stage':<18}" + "".join(f"{c:>24}" for c in columns))
    for stage in names:
        cells = [f"{t[stage]:.2f}" if stage in t else "-" for t in columns.values()]
        print(f"{stage.removesuffix('_s'):<18}" + "".join(f"{c:>24}" for c in cells))


def reuse(series: list[Path], worker_extra: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        alone = run_jobs(series, Path(tmp), "lung-nodule-cnn", worker_extra=worker_extra)[0]
    with tempfile.TemporaryDirectory() as tmp:
        both = run_jobs(series, Path(tmp), "lung-unet2d", NODULE_ROUTE, worker_extra)
    lung = next(j for j in both if j["model"].startswith("lung-unet2d"))
    nodule = next(j for j in both if j["model"].startswith("lung-nodule-cnn"))
    print_stages({
        "lung job": lung["timings"],
        "nodule job (reused)": nodule["timings"],
        "nodule alone (computed)": alone["timings"],
    })  # fmt: skip
    computed = sum(v for k, v in alone["timings"].items() if k.startswith("mask_"))
    loaded = nodule["timings"].get("mask_load_s")
    if loaded is None:
        raise RuntimeError("the nodule job did not reuse the lung mask")
    print(f"\nnodule job's mask: {loaded:.2f} s reused vs {computed:.2f} s computed "
          f"({computed / loaded:.0f}x less); mask from job "
          f"{nodule['summary']['detection']['mask_from_job']}")  # fmt: skip
    same = [f["center_mm"] for f in nodule["summary"]["detection"]["findings"]] == [
        f["center_mm"] for f in alone["summary"]["detection"]["findings"]
    ]
    print(f"findings identical: {same}")


def eager_reference(series: list[Path]) -> tuple[float, int]:
    spec = load_registry(None)["lung-unet2d"]
    datasets = [pydicom.dcmread(p) for p in series]
    normal = np.cross(*np.array(datasets[0].ImageOrientationPatient, float).reshape(2, 3))
    datasets.sort(key=lambda d: float(np.dot(normal, np.array(d.ImagePositionPatient, float))))
    hu = np.stack(
        [d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in datasets]
    ).astype(np.float32)
    model = torch.jit.load(str(spec.weights_path), map_location="cpu").eval()
    started = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(hu), 8):
            model(torch.from_numpy(hu[i : i + 8] + 1024.0)[:, None])
    return time.perf_counter() - started, len(hu)


def main() -> None:
    parser = argparse.ArgumentParser(description="Time every stage of one real job.")
    parser.add_argument(
        "folder", nargs="?", type=Path, help="default: tests/data/ct/LIDC-IDRI-0001"
    )
    parser.add_argument("--model", default="lung-unet2d")
    parser.add_argument("--reuse", action="store_true", help="the lung-mask reuse's saving")
    parser.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16", "int8"],
        default="auto",
        help="worker.precision; fp32 or int8 measure here what a CPU without bf16 runs",
    )
    args = parser.parse_args()
    folder = args.folder or restored_case("LIDC-IDRI-0001")
    series = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in ("", ".dcm"))
    threads = configure_threads(0)
    print(f"series: {folder} ({len(series)} files); torch {torch.__version__}, {threads} threads")
    worker_extra = f'precision = "{args.precision}"'
    # As the node decides it (OpenVINO's view: AMX or AVX-512 BF16); it needs OpenVINO.
    bf16 = cpu_has_bf16() if openvino_available() else False
    print(f"worker.precision = {args.precision}; OpenVINO computes in bf16 here: {bf16}")
    if args.reuse:
        reuse(series, worker_extra)
        return
    with tempfile.TemporaryDirectory() as tmp:
        job = run_job(series, Path(tmp), args.model, worker_extra)
    timings = job["timings"]
    print(f"\njob {job['id']}: {job['state']}, {job['summary'].get('slices')} slices")
    print(f"{'stage':<18}{'seconds':>9}")
    for stage in [s for s in STAGES if s in timings] + [s for s in timings if s not in STAGES]:
        print(f"{stage.removesuffix('_s'):<18}{timings[stage]:>9.2f}")
    print(f"{'storescu (client)':<18}{job['storescu_s']:>9.2f}")
    print(f"{'send to results':<18}{job['wall_s']:>9.2f}   (first byte sent -> SEG+SR in the PACS)")
    for seg in job["summary"]["segments"]:
        print(f"  {seg['label']}: {seg['volume_ml']:.0f} mL, mean {seg['mean']:.0f} HU")
    for finding in job["summary"].get("detection", {}).get("findings", []):
        print(f"  finding {finding['number']}: centre {finding['center_mm']} mm, "
              f"{finding['diameter_mm']} mm, p {finding['probability']:.3f}")  # fmt: skip

    eager_s, slices = eager_reference(series)
    ours = timings.get("mask_inference_s", timings["inference_s"])
    print("\ninference, same slices, same model")
    print(f"  plain eager fp32 TorchScript : {eager_s:7.2f} s  {slices / eager_s:6.2f} slices/s")
    print(f"  dicomnode inference stage    : {ours:7.2f} s  {slices / ours:6.2f} slices/s")
    print(f"  ratio (eager / dicomnode)    : {eager_s / ours:7.2f}x")


if __name__ == "__main__":
    main()
