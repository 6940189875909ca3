"""Multi-class (softmax) 2D models: argmax labels on the network grid, resampled back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from dicomnode.cli.main import main
from dicomnode.errors import ModelPackageError, PermanentJobError
from dicomnode.imaging import Volume
from dicomnode.imaging.manifest import load_model_spec
from dicomnode.imaging.volume import volume_from_datasets
from dicomnode.inference import ModelCache, example_shapes
from dicomnode.inference.backends import labels_agree, openvino_available
from dicomnode.inference.segment import predict_slices, segment
from tests.factories import ct_series, lung_phantom
from tests.unit.inference.packages import (
    AirOrTissue,
    Failing,
    LungWindow,
    TissueClasses,
    build_classification_package,
    build_multiclass_package,
)

CPU = torch.device("cpu")
needs_openvino = pytest.mark.skipif(
    not openvino_available(), reason="openvino is a test dependency"
)


def phantom(slices: int = 6) -> np.ndarray:
    return lung_phantom(slices=slices, size=64)


def truth_of(hu: np.ndarray) -> np.ndarray:
    """The analytic labels: 1 lung (-850 HU), 2 soft tissue (40 HU), 0 air."""
    return np.select([hu == -850.0, hu == 40.0], [1, 2], 0).astype(np.uint8)


def volume_of(hu: np.ndarray) -> Volume:
    return volume_from_datasets(ct_series(hu))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def near_an_edge(labels: np.ndarray) -> np.ndarray:
    """Voxels whose in-plane 3x3 neighbourhood holds more than one label."""
    size = (1, 3, 3)
    return ndimage.maximum_filter(labels, size=size) != ndimage.minimum_filter(labels, size=size)


def test_softmax_labels_are_exact_on_the_network_matrix(tmp_path: Path) -> None:
    spec = load_model_spec(build_multiclass_package(tmp_path))
    hu = phantom()
    result = segment(spec, volume_of(hu), ModelCache(CPU))
    assert result.labels.dtype == np.uint8
    assert np.array_equal(result.labels, truth_of(hu))
    assert set(result.timings) == {"inference_s", "postprocess_s"}


@pytest.mark.parametrize("matrix", [(48, 48), (40, 56), (96, 80)])
def test_softmax_labels_resampled_to_another_matrix(
    tmp_path: Path, matrix: tuple[int, int]
) -> None:
    spec = load_model_spec(build_multiclass_package(tmp_path, matrix=matrix))
    hu = phantom()
    truth = truth_of(hu)
    labels = segment(spec, volume_of(hu), ModelCache(CPU)).labels
    assert labels.shape == hu.shape and labels.dtype == np.uint8
    assert set(np.unique(labels)) <= {0, 1, 2}
    # Every difference lies on a boundary of the truth: within a pixel of an edge.
    wrong = labels != truth
    assert not (wrong & ~near_an_edge(truth)).any()
    # The small lungs lose most to the blurred edges the network sees.
    for label, minimum in ((1, 0.85), (2, 0.93)):
        assert dice(labels == label, truth == label) > minimum


def test_labels_are_never_interpolated(tmp_path: Path) -> None:
    # Only 0 and 2 ever win: a 1 anywhere would be a label blended between them.
    spec = load_model_spec(
        build_multiclass_package(tmp_path, module=AirOrTissue(), matrix=(40, 56))
    )
    hu = phantom()
    body = hu > -1000.0
    labels = segment(spec, volume_of(hu), ModelCache(CPU)).labels
    assert set(np.unique(labels)) == {0, 2}
    assert dice(labels == 2, body & (hu > -500)) > 0.95


@pytest.mark.parametrize("matrix", [(64, 150), (64, 100), (64, 48), (64, 40)])
def test_boundaries_stay_within_a_pixel(tmp_path: Path, matrix: tuple[int, int]) -> None:
    """A straight edge at every column: labels come back centred, not shifted.

    PyTorch's plain ``nearest`` samples at pixel corners, so going back from a finer
    network grid it moved edges by a pixel; ``nearest-exact`` matches the bilinear
    (centre-aligned) resampling on the way in.
    """
    spec = load_model_spec(build_multiclass_package(tmp_path, module=AirOrTissue(), matrix=matrix))
    errors = []
    for edge in range(8, 56):
        hu = np.full((1, 64, 64), -1000.0, np.float32)
        hu[:, :, :edge] = 40.0
        labels = predict_slices(AirOrTissue(), spec, hu, CPU)
        widths = (labels[0] == 2).sum(axis=1)
        assert (widths == widths[0]).all()  # a straight edge stays straight
        errors.append(int(widths[0]) - edge)
    assert max(abs(e) for e in errors) <= 1
    assert abs(float(np.mean(errors))) < 0.3  # no systematic shift
    if matrix[1] > 64:  # a finer network grid: the edge comes back exactly
        assert errors == [0] * len(errors)


def test_wrong_channel_count_fails_the_job(tmp_path: Path) -> None:
    spec = load_model_spec(build_multiclass_package(tmp_path, module=LungWindow()))
    with pytest.raises(
        PermanentJobError, match=r"expected output \[N, 3, 64, 64\], got \(4, 1, 64"
    ):
        segment(spec, volume_of(phantom()), ModelCache(CPU))


def test_a_failing_network_fails_the_job(tmp_path: Path) -> None:
    spec = load_model_spec(build_multiclass_package(tmp_path, module=Failing()))
    with pytest.raises(
        PermanentJobError,
        match=r"^model test-tissue: forward pass failed: .*simulated kernel failure$",
    ):
        segment(spec, volume_of(phantom()), ModelCache(CPU))


def test_softmax_with_split_left_right_is_refused(tmp_path: Path) -> None:
    folder = build_multiclass_package(tmp_path, postprocess="split-left-right")
    with pytest.raises(ModelPackageError, match=r"output\.postprocess: must be none for softmax"):
        load_model_spec(folder)


def test_example_shapes_of_softmax_and_classification(tmp_path: Path) -> None:
    spec = load_model_spec(build_multiclass_package(tmp_path, matrix=(48, 40)))
    assert example_shapes(spec, batch=2) == ((2, 1, 48, 40), (2, 3, 48, 40))
    one = load_model_spec(build_classification_package(tmp_path, "one", kind="logits"))
    two = load_model_spec(build_classification_package(tmp_path, "two", kind="softmax"))
    assert example_shapes(one) == ((1, 1, 32, 32), (1, 1))
    assert example_shapes(two) == ((1, 1, 32, 32), (1, 2))


# --- OpenVINO: the same labels, checked with labels_agree ---------------------------


@needs_openvino
def test_openvino_gives_the_same_softmax_labels(tmp_path: Path) -> None:
    spec = load_model_spec(build_multiclass_package(tmp_path, matrix=(48, 48)))
    vol = volume_of(phantom(slices=10))  # batches of 4 do not divide 10
    reference = segment(spec, vol, ModelCache(CPU, backend="torch")).labels
    cache = ModelCache(CPU, backend="openvino", precision="fp32")
    assert cache.fast(spec) is not None and not cache.trusted(spec)
    first = segment(spec, vol, cache).labels
    assert cache.trusted(spec)
    again = segment(spec, vol, cache).labels  # without the PyTorch check
    assert np.array_equal(first, reference) and np.array_equal(again, reference)


class SwappedClasses:
    """A 'faster back-end' that calls lung tissue and tissue lung."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.calls = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.module(x)[:, [0, 2, 1]]


def test_a_softmax_back_end_that_disagrees_is_dropped(tmp_path: Path) -> None:
    spec = load_model_spec(build_multiclass_package(tmp_path))
    vol = volume_of(phantom())
    reference = segment(spec, vol, ModelCache(CPU, backend="torch")).labels
    cache = ModelCache(CPU, backend="openvino")
    bad = SwappedClasses(cache.get(spec))
    cache._fast[(spec.name, spec.version)] = bad  # type: ignore[assignment]
    labels = segment(spec, vol, cache).labels
    assert np.array_equal(labels, reference)
    assert bad.calls == 1
    assert cache.fast(spec) is None and not cache.trusted(spec)


def test_labels_agree_within_one_percent_of_the_union() -> None:
    a = torch.zeros(2, 1, 100, 100, dtype=torch.uint8)
    a[:, :, 20:80, 20:50] = 1
    a[:, :, 20:80, 50:80] = 2  # 7200 foreground voxels
    b = a.clone()
    b[0, 0, 20, 20:80] = 2  # 30 voxels change class (1 -> 2): 0.4% of the union
    assert labels_agree(a, b)
    b[0, 0, 10, 0:40] = 1  # 40 background voxels become foreground: 70 of 7240
    assert labels_agree(a, b)
    b[0, 0, 21:23, 20:80] = 2  # 120 more swapped: 190 of 7240, 2.6%
    assert not labels_agree(a, b)
    swapped = torch.where(a == 1, 2, torch.where(a == 2, 1, a)).to(torch.uint8)
    assert not labels_agree(a, swapped)  # same foreground, every class wrong


def test_labels_agree_on_nearly_empty_batches_and_shapes() -> None:
    empty = torch.zeros(2, 1, 100, 100, dtype=torch.uint8)
    speck = empty.clone()
    speck[0, 0, 0, 0] = 2  # one voxel in 20000: tolerated
    assert labels_agree(empty, speck)
    speck[0, 0, 0, 1:5] = 1
    assert not labels_agree(empty, speck)
    assert not labels_agree(empty, empty[:1])
    assert not labels_agree(empty, empty[:, :, :50])


# --- the CLI on a softmax package ----------------------------------------------------


def test_models_show_and_check_a_softmax_package(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    models = tmp_path / "models"
    build_multiclass_package(models, "tissue", matrix=(48, 48))
    build_multiclass_package(models, "wrong-channels", module=LungWindow())
    build_classification_package(models, "classes", kind="softmax")
    config = tmp_path / "node.toml"
    config.write_text(f'[models]\npath = "{models}"\n')

    assert main(["--config", str(config), "models", "show", "tissue"]) == 0
    out = capsys.readouterr().out
    assert "dimensions    2" in out
    assert "matrix        48x48" in out
    assert "output        softmax, argmax of 3 channels (background first)" in out
    assert "segment 2     Soft tissue: SCT 87784001 'Soft tissue'" in out
    assert main(["--config", str(config), "models", "show", "classes"]) == 0
    assert "output        softmax, argmax of 2 classes" in capsys.readouterr().out

    assert main(["--config", str(config), "models", "check"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("ok     classes 0.1")
    assert lines[1].startswith("ok     tissue 0.1")
    assert lines[2] == (
        "FAILED model wrong-channels: for input [1, 1, 64, 64] expected output "
        "[1, 3, 64, 64], got (1, 1, 64, 64)"
    )


def test_tissue_classes_is_exact_on_phantom_values() -> None:
    hu = torch.tensor([-1000.0, -850.0, 40.0]).reshape(1, 1, 1, 3)
    assert TissueClasses()(hu + 1024.0).argmax(dim=1).flatten().tolist() == [0, 1, 2]
