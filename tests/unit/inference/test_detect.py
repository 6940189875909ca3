"""Detection jobs end to end on a phantom: mask model, candidates, CNN, findings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dicomnode.errors import ModelPackageError, PermanentJobError
from dicomnode.imaging import Volume, load_registry
from dicomnode.imaging.volume import volume_from_datasets
from dicomnode.inference import ModelCache
from dicomnode.inference.detect import detect
from tests.factories import ct_series
from tests.unit.inference.packages import (
    Failing,
    TwoScores,
    build_detection_package,
    build_package,
)

NODULE_MM = 12.0


def nodule_volume(slices: int = 30, modality: str = "CT") -> tuple[Volume, np.ndarray]:
    """A chest phantom (1 mm pixels, 2.5 mm slices) with one 12 mm solid nodule."""
    size = 96
    z, y, x = np.mgrid[0:slices, 0:size, 0:size].astype(np.float64)
    hu = np.full((slices, size, size), 40.0, np.float32)
    lung = (np.abs(x - 48) < 38) & (np.abs(y - 48) < 38) & (z > 1) & (z < slices - 2)
    hu[lung] = -850.0
    center = np.array([slices // 2, 40.0, 35.0])
    mm = np.stack([z * 2.5, y, x], axis=-1)
    sphere = np.linalg.norm(mm - center * np.array([2.5, 1, 1]), axis=-1) <= NODULE_MM / 2
    hu[sphere] = 30.0
    datasets = ct_series(hu, spacing=(1.0, 1.0), slice_spacing=2.5, modality=modality)
    return volume_from_datasets(datasets), center


@pytest.fixture
def models(tmp_path: Path) -> dict:
    build_package(tmp_path, "test-lungs")
    build_detection_package(tmp_path, "test-nodules")
    return load_registry(tmp_path)


def test_finds_the_nodule_with_its_size_and_probability(models: dict) -> None:
    volume, center = nodule_volume()
    result = detect(
        models["test-nodules"], models["test-lungs"], volume, ModelCache(torch.device("cpu"))
    )
    assert len(result.findings) == 1
    finding = result.findings[0]
    offset_mm = (finding.center_index - center) * np.array([2.5, 1.0, 1.0])
    assert np.linalg.norm(offset_mm) < 3.0
    assert finding.diameter_mm == pytest.approx(NODULE_MM, abs=2.0)
    assert finding.probability > 0.9
    assert result.best_probability == pytest.approx(finding.probability)
    np.testing.assert_allclose(finding.center, volume.to_patient(finding.center_index)[0])
    labels = result.labels(volume.shape)
    assert set(np.unique(labels)) == {0, 1}
    assert labels[tuple(np.round(center).astype(int))] == 1
    assert result.candidates >= 1
    assert {"mask_inference_s", "candidates_s", "inference_s", "postprocess_s"} <= set(
        result.timings
    )


def test_no_nodule_means_no_findings(models: dict) -> None:
    volume, _ = nodule_volume()
    volume.pixels[volume.pixels > -500] = -850.0  # the nodule removed, the body too
    result = detect(
        models["test-nodules"], models["test-lungs"], volume, ModelCache(torch.device("cpu"))
    )
    assert result.findings == []
    assert result.labels(volume.shape).max() == 0


def test_mr_series_is_refused_by_a_ct_model(models: dict) -> None:
    volume, _ = nodule_volume(modality="MR")
    with pytest.raises(PermanentJobError, match=r"takes CT, not MR"):
        detect(
            models["test-nodules"], models["test-lungs"], volume, ModelCache(torch.device("cpu"))
        )


def test_too_few_slices_are_refused(models: dict) -> None:
    volume, _ = nodule_volume(slices=2)
    with pytest.raises(PermanentJobError, match=r"needs at least 3 slices, the series has 2"):
        detect(
            models["test-nodules"], models["test-lungs"], volume, ModelCache(torch.device("cpu"))
        )


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        (TwoScores(), r"scoring failed: expected one score per patch"),
        # TorchScript's torch.jit.Error is no RuntimeError: it must not escape as a crash.
        (Failing(), r"scoring failed: .*simulated kernel failure$"),
    ],
    ids=["wrong-output", "raises"],
)
def test_a_cnn_that_fails_fails_the_job_with_its_own_error(
    tmp_path: Path, module: torch.nn.Module, expected: str
) -> None:
    build_package(tmp_path, "test-lungs")
    build_detection_package(tmp_path, "test-nodules", module=module)
    models = load_registry(tmp_path)
    volume, _ = nodule_volume()
    with pytest.raises(PermanentJobError, match=expected):
        detect(
            models["test-nodules"], models["test-lungs"], volume, ModelCache(torch.device("cpu"))
        )


def test_mask_model_must_be_an_installed_segmentation_model(tmp_path: Path) -> None:
    build_detection_package(tmp_path, "test-nodules", lung_model="absent")
    with pytest.raises(
        ModelPackageError, match=r"detection.lung_model: 'absent' is not an installed"
    ):
        load_registry(tmp_path)


def test_mask_model_cannot_be_itself(tmp_path: Path) -> None:
    build_detection_package(tmp_path, "test-nodules", lung_model="test-nodules")
    with pytest.raises(ModelPackageError, match=r"detection.lung_model: must name another model"):
        load_registry(tmp_path)


def test_shipped_nodule_model_loads_with_its_mask_model() -> None:
    models = load_registry(None)
    spec = models["lung-nodule-cnn"]
    assert spec.task == "detection"
    assert models[spec.detection.lung_model].task == "segmentation"
    assert spec.weights.format == "state_dict" and spec.network.name == "Classifier"
