from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dicomnode.errors import (
    JobInterrupted,
    ModelPackageError,
    PermanentJobError,
    TransientJobError,
)
from dicomnode.imaging.manifest import load_model_spec
from dicomnode.imaging.volume import volume_from_datasets
from dicomnode.inference import ModelCache
from dicomnode.inference.segment import segment
from tests.factories import ct_series, lung_phantom
from tests.unit.inference.packages import WrongShape, build_package

CPU = torch.device("cpu")


def phantom_volume(modality: str = "CT"):
    return volume_from_datasets(ct_series(lung_phantom(), modality=modality))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def test_segments_both_lungs_on_the_right_sides(tmp_path: Path) -> None:
    spec = load_model_spec(build_package(tmp_path))
    result = segment(spec, phantom_volume(), ModelCache(CPU))
    hu = lung_phantom()
    truth = hu == -850.0
    labels = result.labels
    assert labels.dtype == np.uint8 and labels.shape == hu.shape
    assert dice(labels > 0, truth) > 0.99
    # Segment 1 is the left lung: patient's left is +x, i.e. high column indices here.
    cols_left = np.argwhere(labels == 1)[:, 2]
    cols_right = np.argwhere(labels == 2)[:, 2]
    assert cols_left.min() > cols_right.max()
    assert set(result.timings) == {"inference_s", "postprocess_s"}


def test_other_matrix_sizes_are_resampled_and_back(tmp_path: Path) -> None:
    spec = load_model_spec(build_package(tmp_path, matrix=(48, 48)))
    labels = segment(spec, phantom_volume(), ModelCache(CPU)).labels
    assert labels.shape == lung_phantom().shape
    assert dice(labels > 0, lung_phantom() == -850.0) > 0.9


def test_wrong_output_shape_fails_the_job(tmp_path: Path) -> None:
    spec = load_model_spec(build_package(tmp_path, module=WrongShape()))
    with pytest.raises(PermanentJobError, match=r"expected output \[N, 1, 64, 64\]"):
        segment(spec, phantom_volume(), ModelCache(CPU))


def test_modality_mismatch(tmp_path: Path) -> None:
    spec = load_model_spec(build_package(tmp_path))
    with pytest.raises(PermanentJobError, match="takes CT, not MR"):
        segment(spec, phantom_volume("MR"), ModelCache(CPU))


def test_tampered_and_corrupt_weights(tmp_path: Path) -> None:
    folder = build_package(tmp_path)
    spec = load_model_spec(folder)
    with (folder / "model.ts.pt").open("ab") as fh:
        fh.write(b"tampered")
    with pytest.raises(PermanentJobError, match=r"does not match weights\.sha256"):
        segment(spec, phantom_volume(), ModelCache(CPU))
    (folder / "model.ts.pt").write_bytes(b"not a model")
    text = (folder / "model.toml").read_text()
    (folder / "model.toml").write_text(text.replace('sha256 = "', 'sha256_was = "'))
    with pytest.raises(ModelPackageError, match="unknown key"):
        load_model_spec(folder)
    (folder / "model.toml").write_text(
        "\n".join(line for line in text.splitlines() if not line.startswith("sha256"))
    )
    spec = load_model_spec(folder)
    with pytest.raises(PermanentJobError, match=r"cannot load model\.ts\.pt as TorchScript"):
        segment(spec, phantom_volume(), ModelCache(CPU))


def test_model_is_loaded_once_and_kept(tmp_path: Path) -> None:
    spec = load_model_spec(build_package(tmp_path))
    cache = ModelCache(CPU)
    assert cache.get(spec) is cache.get(spec)


def test_checkpoint_interrupts_between_batches(tmp_path: Path) -> None:
    spec = load_model_spec(build_package(tmp_path))
    calls = []

    def checkpoint() -> None:
        calls.append(1)
        if len(calls) == 2:
            raise JobInterrupted("stop")

    with pytest.raises(JobInterrupted):
        segment(spec, phantom_volume(), ModelCache(CPU), checkpoint=checkpoint)
    assert len(calls) == 2


class MemoryLimited(torch.nn.Module):
    """Runs out of 'device memory' above ``limit`` slices per batch, as a full GPU would."""

    def __init__(self, inner: torch.nn.Module, limit: int) -> None:
        super().__init__()
        self.inner = inner
        self.limit = limit
        self.batches: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        self.batches.append(x.shape[0])
        return self.inner(x)


def test_out_of_memory_retries_in_smaller_batches(tmp_path: Path) -> None:
    from dicomnode.inference.segment import predict_slices
    from tests.unit.inference.packages import LungWindow

    spec = load_model_spec(build_package(tmp_path, batch_size=8))
    pixels = lung_phantom(slices=12).astype(np.float32)
    expected = predict_slices(LungWindow(), spec, pixels, CPU)
    limited = MemoryLimited(LungWindow(), limit=3)
    got = predict_slices(limited, spec, pixels, CPU)
    assert np.array_equal(got, expected)
    assert max(limited.batches) <= 3 and sum(limited.batches) == 12
    with pytest.raises(TransientJobError, match="out of device memory even for one slice"):
        predict_slices(MemoryLimited(LungWindow(), limit=0), spec, pixels, CPU)
