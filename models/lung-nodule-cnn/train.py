"""Train the lung-nodule candidate classifier and measure it on a held-out scan.

Reproducible: fixed seeds, deterministic kernels, one thread, and the data named
below. From the repository root::

    python models/lung-nodule-cnn/train.py --train LIDC-IDRI-0003 --test LIDC-IDRI-0001 --save
    python models/lung-nodule-cnn/train.py --train LIDC-IDRI-0001 --test LIDC-IDRI-0003

The first run writes the shipped weights (``nodule_cnn.pt``) and ``results.json``; the
second is the other fold, reported in the model card and written to ``results-*.json``.

Data: the LIDC-IDRI scans under ``tests/data/ct/<case>/`` (CT images, JPEG-LS lossless,
plus the readers' XML, ``0*.xml``; CC BY 3.0, see ``tests/data/ATTRIBUTION.md``).

- Candidates come from :func:`dicomnode.inference.nodules.detect_candidates` inside the
  lung mask of the shipped ``lung-unet2d``, exactly as in the worker.
- Positives: candidates within a nodule of 3 mm or more that at least one reader
  outlined (distance below max(diameter / 2, 5 mm)), plus the centre of every reader's
  outline on every slice it covers, each jittered by up to 3 mm.
- Candidates near a reader's small-nodule (< 3 mm) or non-nodule mark, or just outside
  a nodule, are left out: neither clearly positive nor clearly negative.
- Negatives: every other candidate, vessels seen end-on for the most part.
- Augmentation: the 8 in-plane flips and rotations, reversed slice order, and
  intensity noise.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import monai.networks.nets
import numpy as np
import torch

from dicomnode.evaluate.lidc import (
    ReferenceNodule,
    consensus_nodules,
    geometries_of,
    mark_center,
    read_marks,
)
from dicomnode.evaluate.scores import roc_auc
from dicomnode.imaging.manifest import load_model_spec, shipped_models_path
from dicomnode.imaging.volume import Volume, load_series
from dicomnode.inference.nodules import (
    Candidates,
    detect_candidates,
    extract_patches,
    score_patches,
    suppress,
)
from dicomnode.inference.segment import ModelCache, segment

HERE = Path(__file__).resolve().parent
SEED = 20261122
FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)  # the LUNA16 FROC points


@dataclass
class Case:
    """One scan, its candidates and their labels."""

    name: str
    volume: Volume
    spacing: tuple[float, float, float]
    candidates: Candidates
    labels: np.ndarray  # 1 nodule, 0 not, -1 left out
    outline_centers: np.ndarray  # (m, 3) voxel indices of reader outlines
    nodules: list[ReferenceNodule]  # contoured (>= 3 mm)


def _nodule_radius(nodule: ReferenceNodule) -> float:
    return max(nodule.diameter_mm / 2, 5.0)


def prepare(folder: Path, limit: int = 300) -> Case:
    """Load a case, segment its lungs, detect candidates and label them."""
    volume = load_series(sorted(folder.glob("*.dcm")))
    lung_spec = load_model_spec(shipped_models_path() / "lung-unet2d")
    lungs = segment(lung_spec, volume, ModelCache(torch.device("cpu"), backend="torch")).labels
    spacing = (volume.slice_spacing, *volume.pixel_spacing)
    candidates = detect_candidates(volume.pixels, lungs > 0, spacing, limit=limit)
    points = volume.to_patient(candidates.centers)

    xml = next(folder.glob("0*.xml"))
    _, marks = read_marks(xml)
    geometries = geometries_of(volume.datasets)
    everything = consensus_nodules(marks, geometries)
    nodules = [n for n in everything if n.contoured]
    labels = np.zeros(len(candidates), dtype=np.int64)
    for nodule in nodules:
        distance = np.linalg.norm(points - nodule.center, axis=1)
        labels[(distance < _nodule_radius(nodule) + 5.0) & (labels == 0)] = -1
        labels[distance < _nodule_radius(nodule)] = 1
    others = [mark_center(m, geometries) for m in marks if m.kind != "nodule"]
    for center in others:
        near = np.linalg.norm(points - center, axis=1) < 5.0
        labels[near & (labels == 0)] = -1

    index = {str(ds.SOPInstanceUID): k for k, ds in enumerate(volume.datasets)}
    outline: set[tuple[int, int, int]] = set()
    for nodule in nodules:
        for mark in nodule.marks:
            for roi in mark.rois:
                if roi.inclusion and len(roi.points) > 1 and roi.sop_uid in index:
                    col, row = roi.points.mean(axis=0)
                    outline.add((index[roi.sop_uid], int(np.rint(row)), int(np.rint(col))))
    return Case(
        name=folder.name,
        volume=volume,
        spacing=spacing,
        candidates=candidates,
        labels=labels,
        outline_centers=np.asarray(sorted(outline), dtype=np.float64).reshape(-1, 3),
        nodules=nodules,
    )


def training_set(case: Case, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Return patches and labels: jittered positives and every clear negative."""
    positives = np.concatenate(
        [case.candidates.centers[case.labels == 1], case.outline_centers], axis=0
    )
    jitter_mm = rng.uniform(-3.0, 3.0, size=(8, *positives.shape))
    jittered = (positives[None] + jitter_mm / np.asarray(case.spacing)).reshape(-1, 3)
    positives = np.concatenate([positives, jittered], axis=0)
    negatives = case.candidates.centers[case.labels == 0]
    pixels = case.volume.pixels
    x = np.concatenate(
        [
            extract_patches(pixels, case.spacing, positives),
            extract_patches(pixels, case.spacing, negatives),
        ]
    )
    y = np.concatenate([np.ones(len(positives)), np.zeros(len(negatives))]).astype(np.float32)
    return x, y


def augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random in-plane flips and rotations, slice order, and intensity noise."""
    k = int(torch.randint(0, 4, (1,), generator=generator))
    batch = torch.rot90(batch, k, dims=(2, 3))
    if bool(torch.randint(0, 2, (1,), generator=generator)):
        batch = torch.flip(batch, dims=(3,))
    if bool(torch.randint(0, 2, (1,), generator=generator)):
        batch = torch.flip(batch, dims=(1,))
    return batch + 0.02 * torch.randn(batch.shape, generator=generator)


def train(x: np.ndarray, y: np.ndarray, epochs: int, spec_path: Path) -> torch.nn.Module:
    """Train the package's network on ``x, y`` with balanced batches."""
    # The network is the one model.toml names, built as the worker builds it.
    with (spec_path / "model.toml").open("rb") as fh:
        network_spec = tomllib.load(fh)["network"]
    network = getattr(monai.networks.nets, network_spec["name"])(**network_spec["args"])
    optimiser = torch.optim.AdamW(network.parameters(), lr=1e-3, weight_decay=1e-4)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    generator = torch.Generator().manual_seed(SEED)
    positives = np.flatnonzero(y == 1)
    negatives = np.flatnonzero(y == 0)
    inputs, targets = torch.from_numpy(x), torch.from_numpy(y)
    half = 32
    steps = max(len(negatives), len(positives)) // half
    network.train()
    for epoch in range(epochs):
        total = 0.0
        for _ in range(steps):
            pick = np.concatenate(
                [
                    positives[torch.randint(0, len(positives), (half,), generator=generator)],
                    negatives[torch.randint(0, len(negatives), (half,), generator=generator)],
                ]
            )
            batch = augment(inputs[pick], generator)
            loss = loss_fn(network(batch).reshape(-1), targets[pick])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += float(loss)
        print(f"epoch {epoch + 1}/{epochs} loss {total / steps:.4f}", file=sys.stderr)
    return network.eval()


def evaluate(network: torch.nn.Module, case: Case) -> dict[str, object]:
    """Score a held-out case's candidates: per-candidate AUC and FROC points."""
    patches = extract_patches(case.volume.pixels, case.spacing, case.candidates.centers)
    probs = score_patches(network, patches, torch.device("cpu"))
    clear = case.labels >= 0
    auc = roc_auc(case.labels[clear] == 1, probs[clear])

    # Detection as the worker reports it: one finding per 10 mm, then every finding
    # counts once, a true positive when it lies within a nodule.
    points = case.volume.to_patient(case.candidates.centers)
    kept = suppress(points, probs, 10.0)
    kept = kept[case.labels[kept] >= 0]  # findings on ignored marks are neither
    order = kept[np.argsort(-probs[kept], kind="stable")]
    hits: list[int | None] = []
    for i in order:
        inside = [
            j
            for j, n in enumerate(case.nodules)
            if np.linalg.norm(points[i] - n.center) < _nodule_radius(n)
        ]
        hits.append(inside[0] if inside else None)
    froc: list[dict[str, float]] = []
    for rate in FP_RATES:
        found: set[int] = set()
        false = 0
        for hit in hits:
            if hit is None:
                false += 1
                if false > rate:
                    break
            else:
                found.add(hit)
        froc.append({"fp_per_scan": rate, "sensitivity": len(found) / len(case.nodules)})
    at_half = [(probs[i] >= 0.5, hit) for i, hit in zip(order, hits, strict=True)]
    return {
        "case": case.name,
        "candidates": len(case.candidates),
        "candidates_positive": int((case.labels == 1).sum()),
        "candidates_left_out": int((case.labels == -1).sum()),
        "nodules": len(case.nodules),
        "nodules_with_candidate": sum(
            any(np.linalg.norm(p - n.center) < _nodule_radius(n) for p in points[case.labels == 1])
            for n in case.nodules
        ),
        "auc": round(float(auc), 4),
        "froc": froc,
        "cpm": round(float(np.mean([f["sensitivity"] for f in froc])), 4),
        "at_threshold_0.5": {
            "true_positive_nodules": len({h for ok, h in at_half if ok and h is not None}),
            "false_positives": sum(1 for ok, h in at_half if ok and h is None),
        },
    }


def main() -> int:
    """Train on one case, test on another, and report (optionally save the weights)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=HERE.parents[1] / "tests/data/ct")
    parser.add_argument("--train", default="LIDC-IDRI-0003")
    parser.add_argument("--test", default="LIDC-IDRI-0001")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument(
        "--train-candidates",
        type=int,
        default=1500,
        help="candidates taken from the training scan (more negatives than the worker's 300)",
    )
    parser.add_argument("--save", action="store_true", help="write the shipped weights")
    args = parser.parse_args()

    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    rng = np.random.default_rng(SEED)

    started = time.perf_counter()
    train_case = prepare(args.data / args.train, args.train_candidates)
    test_case = prepare(args.data / args.test)
    x, y = training_set(train_case, rng)
    print(f"training patches: {int(y.sum())} positive, {int((1 - y).sum())} negative")
    network = train(x, y, args.epochs, HERE)
    results = {
        "train": args.train,
        "test": args.test,
        "seed": SEED,
        "epochs": args.epochs,
        "training_patches": {"positive": int(y.sum()), "negative": int((1 - y).sum())},
        "held_out": evaluate(network, test_case),
        "training_case": evaluate(network, prepare(args.data / args.train)),
        "seconds": round(time.perf_counter() - started, 1),
        "torch": torch.__version__,
    }
    print(json.dumps(results, indent=2))
    name = "results.json" if args.save else f"results-{args.train}.json"
    (HERE / name).write_text(json.dumps(results, indent=2) + "\n")
    if args.save:
        torch.save(network.state_dict(), HERE / "nodule_cnn.pt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
