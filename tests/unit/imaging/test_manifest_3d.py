"""Model packages for 3D and multi-class models: what is read, and what is refused."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dicomnode.errors import ModelPackageError
from dicomnode.imaging.manifest import load_model_spec
from tests.unit.inference.packages import (
    build_detection_package,
    build_multiclass_package,
    build_volume_package,
)


def edit(folder: Path, old: str, new: str) -> None:
    manifest = folder / "model.toml"
    text = manifest.read_text()
    assert old in text, text
    manifest.write_text(text.replace(old, new, 1))


def refused(folder: Path, expected: str) -> str:
    with pytest.raises(ModelPackageError) as info:
        load_model_spec(folder)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(folder / "model.toml"))
    assert re.search(expected, message), message
    return message


def test_a_3d_package_is_read(tmp_path: Path) -> None:
    folder = build_volume_package(
        tmp_path,
        roi=(16, 96, 96),
        spacing=(1.5, 1.5, 2.0),
        axes="ras",
        clip=(-57.0, 164.0),
        overlap=0.5,
        kind="softmax",
    )
    spec = load_model_spec(folder)
    inp = spec.input
    assert inp.dimensions == 3 and inp.roi == [16, 96, 96]
    assert inp.spacing == [1.5, 1.5, 2.0] and all(isinstance(v, float) for v in inp.spacing)
    assert inp.axes == "ras" and inp.clip == [-57.0, 164.0] and inp.overlap == 0.5
    assert spec.output.kind == "softmax" and len(spec.output.segments) == 2


def test_defaults_of_the_new_fields(tmp_path: Path) -> None:
    spec = load_model_spec(build_multiclass_package(tmp_path))
    inp = spec.input
    assert inp.dimensions == 2 and inp.roi == [] and inp.spacing == [] and inp.clip == []
    assert inp.axes == "slice-row-column" and inp.overlap == 0.25
    assert spec.output.kind == "softmax" and spec.output.postprocess == "none"


ROI = "roi = [8, 32, 32]"


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("dimensions = 3", "dimensions = 4", r"input\.dimensions: must be 2 or 3, got 4"),
        ("dimensions = 3", "dimensions = 1", r"input\.dimensions: must be 2 or 3, got 1"),
        ("dimensions = 3", 'dimensions = "3d"', r"input\.dimensions: must be an integer"),
        (ROI, "", r"input\.roi: a 3D model needs its sliding-window patch size"),
        (ROI, "roi = [32, 32]", r"input\.roi: must be three positive integers"),
        (ROI, "roi = [8, 0, 32]", r"input\.roi: must be three positive integers"),
        (ROI, "roi = [8, -32, 32]", r"input\.roi: must be three positive integers"),
        (ROI, "roi = [8.5, 32, 32]", r"input\.roi(\[0\])?: must be an integer"),
        (ROI, "roi = 8", r"input\.roi: must be a list"),
        ("[input]", "[input]\nspacing = [1.0, 1.0]", r"input\.spacing: must be three positive"),
        ("[input]", "[input]\nspacing = [1.0, 0.0, 2.0]", r"input\.spacing: must be three"),
        ("[input]", "[input]\nspacing = [1, -1, 2]", r"input\.spacing: must be three positive"),
        ("[input]", '[input]\nspacing = ["1", 1, 2]', r"input\.spacing(\[0\])?: must be a number"),
        ("[input]", "[input]\nclip = [100.0, -100.0]", r"input\.clip: must be \[low, high\]"),
        (
            "[input]",
            "[input]\nclip = [5, 5]",
            r"input\.clip: must be \[low, high\] with low < high",
        ),
        ("[input]", "[input]\nclip = [-100.0]", r"input\.clip: must be \[low, high\]"),
        ("[input]", "[input]\nclip = [-1, 0, 1]", r"input\.clip: must be \[low, high\]"),
        ("[input]", "[input]\nclip = []", r"input\.clip: must be \[low, high\]"),
        ("overlap = 0.25", "overlap = 0.95", r"input\.overlap: must be between 0 and 0\.9"),
        ("overlap = 0.25", "overlap = -0.1", r"input\.overlap: must be between 0 and 0\.9"),
        ('axes = "slice-row-column"', 'axes = "lps"', r"input\.axes: must be one of"),
        ('axes = "slice-row-column"', 'axes = "RAS"', r"input\.axes: must be one of"),
        ('kind = "probability"', 'kind = "sigmoid"', r"output\.kind: must be one of"),
    ],
)
def test_bad_3d_packages_name_the_key(tmp_path: Path, old: str, new: str, expected: str) -> None:
    folder = build_volume_package(tmp_path)
    edit(folder, old, new)
    refused(folder, expected)


def test_softmax_needs_postprocess_none(tmp_path: Path) -> None:
    refused(
        build_multiclass_package(tmp_path, postprocess="split-left-right"),
        r"output\.postprocess: must be none for softmax",
    )
    folder = build_volume_package(tmp_path, "three-d", kind="softmax")
    edit(folder, 'postprocess = "none"', 'postprocess = "split-left-right"')
    refused(folder, r"output\.postprocess: must be none for softmax")


def test_a_2d_package_ignores_roi_but_still_checks_it(tmp_path: Path) -> None:
    folder = build_multiclass_package(tmp_path)
    edit(folder, "[input]", "[input]\nroi = [8, 32, 32]")
    assert load_model_spec(folder).input.dimensions == 2
    edit(folder, "roi = [8, 32, 32]", "roi = [8, 32]")
    refused(folder, r"input\.roi: must be three positive integers")


def test_detection_models_are_not_3d(tmp_path: Path) -> None:
    folder = build_detection_package(tmp_path)
    edit(folder, "[input]", "[input]\ndimensions = 3\nroi = [8, 32, 32]")
    refused(folder, r"input\.dimensions: detection models see stacks of slices \(2\)")
