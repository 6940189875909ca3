"""3D models: a sliding window over the volume, at the network's spacing and axis order."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dicomnode.cli.main import main
from dicomnode.errors import JobInterrupted, PermanentJobError, TransientJobError
from dicomnode.imaging import Volume
from dicomnode.imaging.manifest import load_model_spec
from dicomnode.imaging.volume import volume_from_datasets
from dicomnode.inference import ModelCache, example_shapes
from dicomnode.inference.segment import segment
from dicomnode.inference.sliding import _from_network, _to_network, predict_volume, ras_layout
from dicomnode.inference.transforms import intensity
from tests.factories import AXIAL, ct_series, lung_phantom
from tests.unit.inference.packages import (
    Failing,
    LowHalfOfFirstAxis,
    TissueClasses,
    TissueProbability,
    build_volume_package,
)

CPU = torch.device("cpu")
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)  # rows run to the left, columns down (feet)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)  # rows run backwards, columns down


def phantom(slices: int = 20, size: int = 72) -> np.ndarray:
    return lung_phantom(slices=slices, size=size)


def volume_of(hu: np.ndarray, orientation: tuple[float, ...] = AXIAL) -> Volume:
    return volume_from_datasets(ct_series(hu, orientation=orientation))


def truth_of(hu: np.ndarray) -> np.ndarray:
    return np.select([hu == -850.0, hu == 40.0], [1, 2], 0).astype(np.uint8)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


class Spy:
    """Wraps MONAI's sliding_window_inference: records the grids it is given."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import monai.inferers

        self.shapes: list[tuple[int, ...]] = []
        self.windows = 0
        real = monai.inferers.sliding_window_inference

        def spy(inputs: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self.shapes.append(tuple(inputs.shape[2:]))
            predictor = kwargs["predictor"]

            def counting(window: torch.Tensor) -> torch.Tensor:
                self.windows += window.shape[0]
                return predictor(window)

            kwargs["predictor"] = counting
            return real(inputs, *args, **kwargs)

        monkeypatch.setattr(monai.inferers, "sliding_window_inference", spy)


# --- the sliding window on the stored grid -----------------------------------------


def test_many_windows_blend_into_the_exact_mask(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = load_model_spec(build_volume_package(tmp_path, roi=(8, 32, 32)))
    hu = phantom()
    spy = Spy(monkeypatch)
    labels = segment(spec, volume_of(hu), ModelCache(CPU)).labels
    assert spy.shapes == [(20, 72, 72)]
    assert spy.windows == 27  # 3 x 3 x 3 overlapping windows, Gaussian-blended
    assert labels.dtype == np.uint8 and labels.shape == hu.shape
    assert np.array_equal(labels, (hu == 40.0).astype(np.uint8))


def test_softmax_3d_labels_are_exact(tmp_path: Path) -> None:
    spec = load_model_spec(build_volume_package(tmp_path, kind="softmax", overlap=0.5))
    hu = phantom()
    labels = segment(spec, volume_of(hu), ModelCache(CPU)).labels
    assert np.array_equal(labels, truth_of(hu))


def test_a_volume_smaller_than_the_window_is_padded_and_cropped(tmp_path: Path) -> None:
    spec = load_model_spec(build_volume_package(tmp_path, kind="softmax"))
    hu = phantom(slices=6, size=24)
    labels = segment(spec, volume_of(hu), ModelCache(CPU)).labels
    assert np.array_equal(labels, truth_of(hu))


def test_probabilities_come_back_as_float32(tmp_path: Path) -> None:
    spec = load_model_spec(build_volume_package(tmp_path))
    hu = phantom(slices=10, size=40)
    out = predict_volume(TissueProbability(), spec, volume_of(hu), CPU)
    assert out.dtype == np.float32 and out.shape == hu.shape
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert np.array_equal(out >= 0.5, hu == 40.0)


# --- resampling to the network's spacing ----------------------------------------------


def test_coarser_spacing_resamples_and_comes_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Native spacing is 2.0 mm between slices and 0.8 mm in plane: twice as coarse.
    spec = load_model_spec(build_volume_package(tmp_path, spacing=(4.0, 1.6, 1.6)))
    hu = phantom()
    spy = Spy(monkeypatch)
    labels = segment(spec, volume_of(hu), ModelCache(CPU)).labels
    assert spy.shapes == [(10, 36, 36)]
    assert labels.shape == hu.shape
    assert dice(labels > 0, hu == 40.0) > 0.9


def test_softmax_at_another_spacing_keeps_whole_labels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = load_model_spec(build_volume_package(tmp_path, kind="softmax", spacing=(3.0, 1.2, 1.2)))
    hu = phantom()
    truth = truth_of(hu)
    spy = Spy(monkeypatch)
    labels = segment(spec, volume_of(hu), ModelCache(CPU)).labels
    assert spy.shapes == [(13, 48, 48)]
    assert labels.shape == hu.shape and set(np.unique(labels)) <= {0, 1, 2}
    assert dice(labels == 2, truth == 2) > 0.9
    assert dice(labels == 1, truth == 1) > 0.75  # small lungs, blurred edges


def test_spacing_is_given_in_the_network_axis_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # RAS order for an axial series: (x = columns, y = rows, z = slices). Coarser
    # columns only; slices as acquired (2 mm).
    spec = load_model_spec(
        build_volume_package(tmp_path, axes="ras", roi=(32, 32, 8), spacing=(1.6, 0.8, 2.0))
    )
    hu = phantom(slices=12, size=64)
    spy = Spy(monkeypatch)
    labels = segment(spec, volume_of(hu), ModelCache(CPU)).labels
    assert spy.shapes == [(32, 64, 12)]  # the network's grid: (x, y, z)
    assert labels.shape == hu.shape
    assert dice(labels > 0, hu == 40.0) > 0.9


# --- intensity: clip, then offset and scale ----------------------------------------------


def test_intensity_clips_before_offset_and_scale(tmp_path: Path) -> None:
    # MONAI's ScaleIntensityRanged(a_min=-57, a_max=164, b_min=0, b_max=1, clip=True).
    folder = build_volume_package(tmp_path, clip=(-57.0, 164.0))
    text = (folder / "model.toml").read_text().replace("offset = 1024.0", "offset = 57.0")
    (folder / "model.toml").write_text(
        text.replace("[input]", "[input]\nscale = 0.004524886877828055")
    )
    spec = load_model_spec(folder)
    hu = torch.tensor([-1000.0, -57.0, 53.5, 164.0, 3000.0])
    assert torch.allclose(intensity(hu, spec), torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]), atol=1e-6)

    # Clipped after the offset (wrong), -1000 HU would stay at -1000 + 1024 = 24.
    plain = load_model_spec(build_volume_package(tmp_path, "plain", clip=(-100.0, 100.0)))
    assert intensity(torch.tensor([-1000.0, 40.0, 500.0]), plain).tolist() == [
        924.0,
        1064.0,
        1124.0,
    ]
    unclipped = load_model_spec(build_volume_package(tmp_path, "unclipped"))
    assert intensity(torch.tensor([-1000.0]), unclipped).tolist() == [24.0]


def test_clip_is_applied_in_3d_inference(tmp_path: Path) -> None:
    # Clipped at -50 HU, air and lung become 974, inside the tissue window (964..1164).
    spec = load_model_spec(build_volume_package(tmp_path, clip=(-50.0, 300.0)))
    hu = phantom(slices=10, size=40)
    labels = segment(spec, volume_of(hu), ModelCache(CPU)).labels
    assert labels.all()


# --- RAS layout ---------------------------------------------------------------------------


def test_ras_layout_of_an_axial_series() -> None:
    # Stored axes: slice along +z (superior), row along +y (posterior), column along
    # +x (the patient's left). RAS x runs to the right: the columns, reversed; y
    # anterior: the rows, reversed; z superior: the slices as they are.
    vol = volume_of(phantom(slices=4, size=16))
    assert ras_layout(vol) == ((2, 1, 0), (True, True, False))


def test_ras_layout_of_coronal_and_sagittal_series() -> None:
    # Coronal: normal = (1,0,0) x (0,0,-1) = (0,1,0), slices run posterior; rows run
    # to the left, columns to the feet. x: columns reversed, y: slices reversed,
    # z: rows reversed.
    coronal = volume_of(phantom(slices=4, size=16), CORONAL)
    assert ras_layout(coronal) == ((2, 0, 1), (True, True, True))
    # Sagittal: normal = (0,1,0) x (0,0,-1) = (-1,0,0), slices run to the right;
    # rows posterior, columns to the feet. x: slices as they are, y: columns
    # reversed, z: rows reversed.
    sagittal = volume_of(phantom(slices=4, size=16), SAGITTAL)
    assert ras_layout(sagittal) == ((0, 2, 1), (False, True, True))


def test_ras_layout_refuses_a_degenerate_orientation() -> None:
    vol = volume_of(phantom(slices=4, size=16))
    half = np.sqrt(0.5)
    skew = dataclasses.replace(
        vol,
        row_direction=np.array([half, half, 0.0]),
        column_direction=np.array([-half, half, 0.0]),
    )
    with pytest.raises(PermanentJobError, match="two axes share a direction"):
        ras_layout(skew)


def _affine_ras(vol: Volume) -> np.ndarray:
    """The NIfTI (RAS) affine of the stored (slice, row, column) array."""
    lps = np.eye(4)
    lps[:3, 0] = vol.normal * vol.slice_spacing
    lps[:3, 1] = vol.column_direction * vol.pixel_spacing[0]
    lps[:3, 2] = vol.row_direction * vol.pixel_spacing[1]
    lps[:3, 3] = vol.positions[0]
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


@pytest.mark.parametrize(
    "orientation",
    [
        AXIAL,
        CORONAL,
        SAGITTAL,
        (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0),  # axial, rotated 180 degrees
        (0.0, 1.0, 0.0, 1.0, 0.0, 0.0),  # axial, transposed (feet first)
        (np.cos(0.3), np.sin(0.3), 0.0, -np.sin(0.3), np.cos(0.3), 0.0),  # oblique
    ],
)
def test_ras_layout_matches_nibabel(orientation: tuple[float, ...]) -> None:
    """Independent check: nibabel's as_closest_canonical, as MONAI's Orientationd."""
    nib = pytest.importorskip("nibabel")
    rng = np.random.default_rng(0)
    hu = rng.normal(size=(5, 6, 7)).astype(np.float32) * 100
    vol = volume_of(hu, tuple(float(v) for v in orientation))
    canonical = nib.as_closest_canonical(nib.Nifti1Image(vol.pixels, _affine_ras(vol)))
    assert nib.aff2axcodes(canonical.affine) == ("R", "A", "S")
    layout = ras_layout(vol)
    ours = _to_network(torch.from_numpy(vol.pixels)[None, None], layout)[0, 0].numpy()
    assert np.array_equal(ours, np.asarray(canonical.dataobj))
    back = _from_network(torch.from_numpy(ours)[None, None], layout)[0, 0].numpy()
    assert np.array_equal(back, vol.pixels)


@pytest.mark.parametrize(
    ("orientation", "roi"),
    [(AXIAL, (32, 32, 8)), (CORONAL, (32, 8, 32)), (SAGITTAL, (8, 32, 32))],
    ids=["axial", "coronal", "sagittal"],
)
def test_ras_network_labels_land_on_the_right_patient_side(
    tmp_path: Path, orientation: tuple[float, ...], roi: tuple[int, int, int]
) -> None:
    """The network labels the low-x half of its input (one window: the whole volume).

    In RAS, x increases towards the patient's right, so index 0 is the patient's far
    left (as nibabel's as_closest_canonical gives it): the low-x half is the patient's
    LEFT half, where the LPS x coordinate is above the midline.
    """
    spec = load_model_spec(
        build_volume_package(tmp_path, module=LowHalfOfFirstAxis(), axes="ras", roi=roi)
    )
    vol = volume_of(phantom(slices=8, size=32), orientation)
    labels = segment(spec, vol, ModelCache(CPU)).labels
    indices = np.argwhere(np.ones(vol.shape, dtype=bool))
    x = vol.patient_x(indices).reshape(vol.shape)
    midline = (x.min() + x.max()) / 2
    assert labels.sum() == labels.size // 2
    assert np.array_equal(labels == 1, x > midline)


def test_without_ras_the_network_sees_the_stored_order(tmp_path: Path) -> None:
    spec = load_model_spec(
        build_volume_package(tmp_path, module=LowHalfOfFirstAxis(), roi=(8, 32, 32))
    )
    labels = segment(spec, volume_of(phantom(slices=8, size=32)), ModelCache(CPU)).labels
    assert labels[:4].all() and not labels[4:].any()  # the first slices


# --- failures, checkpoints, back-ends -----------------------------------------------------


def test_checkpoint_is_called_during_3d_inference(tmp_path: Path) -> None:
    spec = load_model_spec(build_volume_package(tmp_path, batch_size=1))
    calls: list[int] = []

    def checkpoint() -> None:
        calls.append(1)
        if len(calls) == 4:
            raise JobInterrupted("stop")

    with pytest.raises(JobInterrupted):
        segment(spec, volume_of(phantom()), ModelCache(CPU), checkpoint=checkpoint)
    assert len(calls) == 4  # one before the work, then one per batch of windows


class TwoChannelConv(torch.nn.Module):
    """A network built for two input channels: its convolution fails on one."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(2, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


@pytest.mark.parametrize(
    ("module", "reason"),
    [
        # The network's own raise: torch.jit.Error, which is no RuntimeError.
        (Failing(), "RuntimeError: simulated kernel failure"),
        # A kernel's error: the message's last line, not TorchScript's preamble.
        (TwoChannelConv(), "RuntimeError: Given groups=1, weight of size [1, 2, 3, 3, 3]"),
    ],
    ids=["raise", "kernel"],
)
def test_a_failing_3d_network_fails_the_job(
    tmp_path: Path, module: torch.nn.Module, reason: str
) -> None:
    spec = load_model_spec(build_volume_package(tmp_path, module=module))
    with pytest.raises(PermanentJobError) as info:
        segment(spec, volume_of(phantom(slices=10, size=40)), ModelCache(CPU))
    message = str(info.value)
    assert message.startswith("model test-3d: forward pass failed: ")
    assert reason in message and "\n" not in message


def test_wrong_channel_count_in_3d(tmp_path: Path) -> None:
    spec = load_model_spec(build_volume_package(tmp_path, module=TissueClasses()))
    with pytest.raises(
        PermanentJobError, match=r"expected 1 output channel\(s\), got \(2, 3, 8, 32, 32\)"
    ):
        segment(spec, volume_of(phantom()), ModelCache(CPU))


def test_out_of_memory_in_3d_is_transient(tmp_path: Path) -> None:
    spec = load_model_spec(build_volume_package(tmp_path))

    def full(window: torch.Tensor) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    with pytest.raises(TransientJobError, match="out of device memory"):
        predict_volume(full, spec, volume_of(phantom(slices=10, size=40)), CPU)


def test_3d_models_stay_on_pytorch(tmp_path: Path) -> None:
    spec = load_model_spec(build_volume_package(tmp_path))
    cache = ModelCache(CPU, backend="openvino")
    assert cache.fast(spec) is None
    hu = phantom(slices=10, size=40)
    assert np.array_equal(segment(spec, volume_of(hu), cache).labels, hu == 40.0)


def test_example_shapes_of_3d_packages(tmp_path: Path) -> None:
    one = load_model_spec(build_volume_package(tmp_path, roi=(16, 24, 32)))
    assert example_shapes(one, batch=2) == ((2, 1, 16, 24, 32), (2, 1, 16, 24, 32))
    multi = load_model_spec(build_volume_package(tmp_path, "multi", kind="softmax"))
    assert example_shapes(multi) == ((1, 1, 8, 32, 32), (1, 3, 8, 32, 32))


# --- the CLI on 3D packages ------------------------------------------------------------------


def test_models_show_and_check_3d_packages(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    models = tmp_path / "models"
    build_volume_package(
        models, "ct-3d", axes="ras", roi=(32, 32, 8), spacing=(1.5, 1.5, 2.0), clip=(-50, 300)
    )
    build_volume_package(models, "multi-3d", kind="softmax")
    build_volume_package(models, "wrong-3d", module=TissueClasses())
    config = tmp_path / "node.toml"
    config.write_text(f'[models]\npath = "{models}"\n')

    assert main(["--config", str(config), "models", "show", "ct-3d"]) == 0
    out = capsys.readouterr().out
    assert "dimensions    3" in out
    assert "window        32x32x8 (ras), overlap 0.25" in out
    assert "spacing       1.5x1.5x2 mm" in out
    assert "intensity     clip -50..300, then (value + 1024) x 1" in out
    assert "matrix" not in out
    assert main(["--config", str(config), "models", "show", "multi-3d"]) == 0
    out = capsys.readouterr().out
    assert "spacing       as acquired" in out
    assert "output        softmax, argmax of 3 channels (background first)" in out

    assert main(["--config", str(config), "models", "check"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("ok     ct-3d 0.1")
    assert lines[1].startswith("ok     multi-3d 0.1")
    assert lines[2] == (
        "FAILED model wrong-3d: for input [1, 1, 8, 32, 32] expected output "
        "[1, 1, 8, 32, 32], got (1, 3, 8, 32, 32)"
    )
