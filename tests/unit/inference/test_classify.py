"""Classification packages: slice scores, their mean or maximum, the chosen class."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dicomnode.errors import ModelPackageError, PermanentJobError
from dicomnode.imaging.manifest import load_model_spec
from dicomnode.imaging.volume import volume_from_datasets
from dicomnode.inference import ModelCache
from dicomnode.inference.classify import classify
from tests.factories import ct_series, lung_phantom
from tests.unit.inference.packages import Failing, WrongShape, build_classification_package

CPU = torch.device("cpu")


def phantom(slices: int = 10, modality: str = "CT"):
    # lung_phantom has lungs on every slice but the first and the last.
    return volume_from_datasets(ct_series(lung_phantom(slices=slices), modality=modality))


def test_one_class_by_the_mean_of_its_slices(tmp_path: Path) -> None:
    spec = load_model_spec(build_classification_package(tmp_path, kind="logits"))
    result = classify(spec, phantom(10), ModelCache(CPU))
    assert result.per_slice.shape == (10, 1)
    np.testing.assert_allclose(result.per_slice[[0, -1], 0], 0.0, atol=1e-3)
    np.testing.assert_allclose(result.per_slice[1:-1, 0], 1.0, atol=1e-3)
    assert result.probabilities["Lungs visible"] == pytest.approx(0.8, abs=1e-3)
    assert result.chosen is not None and result.chosen.label == "Lungs visible"
    assert result.probability == pytest.approx(0.8, abs=1e-3)


def test_below_the_threshold_no_class_is_chosen(tmp_path: Path) -> None:
    spec = load_model_spec(build_classification_package(tmp_path, kind="logits"))
    volume = phantom(10)
    volume.pixels[2:] = 40.0  # lungs left on one slice of ten: mean 0.1
    result = classify(spec, volume, ModelCache(CPU))
    assert result.chosen is None
    assert result.probability == pytest.approx(0.1, abs=1e-3)


def test_max_counts_a_finding_on_any_slice(tmp_path: Path) -> None:
    spec = load_model_spec(build_classification_package(tmp_path, aggregate="max"))
    volume = phantom(10)
    volume.pixels[2:] = 40.0
    result = classify(spec, volume, ModelCache(CPU))
    assert result.chosen is not None and result.probability == pytest.approx(1.0, abs=1e-3)


def test_softmax_chooses_the_most_probable_class(tmp_path: Path) -> None:
    spec = load_model_spec(build_classification_package(tmp_path, kind="softmax"))
    result = classify(spec, phantom(10), ModelCache(CPU))
    assert result.per_slice.shape == (10, 2)
    np.testing.assert_allclose(result.per_slice.sum(axis=1), 1.0, atol=1e-5)
    assert result.chosen is not None and result.chosen.label == "Lungs visible"
    assert result.probabilities["No lungs"] == pytest.approx(0.2, abs=1e-3)


def test_wrong_output_shape_and_modality_fail_the_job(tmp_path: Path) -> None:
    spec = load_model_spec(build_classification_package(tmp_path, module=WrongShape()))
    with pytest.raises(PermanentJobError, match=r"expected output \[N, 1\], got \(4, 1, 16, 16\)"):
        classify(spec, phantom(10), ModelCache(CPU))
    good = load_model_spec(build_classification_package(tmp_path, name="good"))
    with pytest.raises(PermanentJobError, match=r"takes CT, not MR"):
        classify(good, phantom(10, modality="MR"), ModelCache(CPU))


def test_a_network_that_raises_fails_the_job_with_its_own_error(tmp_path: Path) -> None:
    # A TorchScript network's own raise comes out as torch.jit.Error (no RuntimeError),
    # with the interpreter's traceback first and the error on its last line.
    spec = load_model_spec(build_classification_package(tmp_path, module=Failing()))
    with pytest.raises(
        PermanentJobError,
        match=r"^model test-classes: forward pass failed: .*simulated kernel failure$",
    ):
        classify(spec, phantom(10), ModelCache(CPU))


def test_packages_without_classes_or_with_too_many_for_one_channel(tmp_path: Path) -> None:
    folder = build_classification_package(tmp_path)
    manifest = folder / "model.toml"
    text = manifest.read_text()
    manifest.write_text(text[: text.index("[[output.classes]]")])
    with pytest.raises(ModelPackageError, match=r"output.classes: a classification model needs"):
        load_model_spec(folder)
    manifest.write_text(text + text[text.index("[[output.classes]]") :])
    with pytest.raises(ModelPackageError, match=r"output.classes: one-channel outputs"):
        load_model_spec(folder)
    manifest.write_text(text.replace('aggregate = "mean"', 'aggregate = "median"'))
    with pytest.raises(ModelPackageError, match=r"output.aggregate: must be one of mean, max"):
        load_model_spec(folder)
