"""A package's optional INT8 OpenVINO weights: what the manifest accepts and refuses."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from dicomnode.errors import ModelPackageError
from dicomnode.imaging.manifest import load_model_spec, shipped_models_path
from tests.unit.imaging.test_manifest import edit

SHIPPED = shipped_models_path() / "lung-unet2d"


def test_the_shipped_lung_model_has_int8_weights() -> None:
    spec = load_model_spec(SHIPPED)
    assert spec.int8_path == SHIPPED / "lung_unet2d.int8.xml"
    assert spec.int8_path.with_suffix(".bin").is_file()
    assert re.fullmatch(r"[0-9a-f]{64}", spec.weights.openvino_int8_sha256)


def copy(tmp_path: Path) -> Path:
    folder = tmp_path / "lung-unet2d"
    shutil.copytree(SHIPPED, folder, ignore=shutil.ignore_patterns("*.py"))
    return folder


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ('openvino_int8 = "lung_unet2d.int8.xml"', "", r"openvino_int8_sha256: set without"),
        ('openvino_int8_sha256 = "', 'openvino_int8_sha256 = "X', r"int8_sha256: must be 64"),
        ('int8 = "lung_unet2d.int8.xml"', 'int8 = "lung_unet2d.int8.bin"', r"the IR's \.xml"),
        ('int8 = "lung_unet2d.int8.xml"', 'int8 = "gone.xml"', r"gone\.xml not found"),
        ("dimensions = 2", "dimensions = 3\nroi = [8, 8, 8]", r"only for 2D models"),
    ],
)
def test_bad_int8_entries_name_the_field(tmp_path: Path, old: str, new: str, expected: str) -> None:
    folder = copy(tmp_path)
    edit(folder, old, new)
    with pytest.raises(ModelPackageError) as info:
        load_model_spec(folder)
    assert re.search(expected, str(info.value)), str(info.value)


def test_an_int8_ir_without_its_bin_is_refused(tmp_path: Path) -> None:
    folder = copy(tmp_path)
    (folder / "lung_unet2d.int8.bin").unlink()
    with pytest.raises(ModelPackageError, match=r"lung_unet2d\.int8\.bin not found"):
        load_model_spec(folder)
