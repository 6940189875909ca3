from __future__ import annotations

import re
from pathlib import Path

import pytest

from dicomnode.errors import ModelPackageError
from dicomnode.imaging import load_registry
from dicomnode.imaging.manifest import load_model_spec, shipped_models_path
from tests.unit.inference.packages import build_package


def test_shipped_lung_model_is_valid() -> None:
    models = load_registry(None)
    spec = models["lung-unet2d"]
    assert spec.task == "segmentation"
    assert spec.input.offset == 1024.0 and spec.input.matrix == [512, 512]
    assert [s.type.value for s in spec.output.segments] == ["44029006", "3341006"]
    assert spec.weights_path.is_file()
    assert (shipped_models_path() / "lung-unet2d" / "LICENSE.txt").is_file()
    assert not spec.clinical_use


def edit(folder: Path, old: str, new: str) -> None:
    manifest = folder / "model.toml"
    text = manifest.read_text()
    assert old in text
    manifest.write_text(text.replace(old, new, 1))


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ('task = "segmentation"', 'task = "dreaming"', r"task: must be one of segmentation"),
        ('version = "0.1"', "", r"version: required key is missing"),
        ('kind = "probability"', 'kind = "maybe"', r"output\.kind: must be one of"),
        ("matrix = [64, 64]", "matrix = [64]", r"input\.matrix: must be \[rows, columns\]"),
        ("batch_size = 3", "batch_size = 0", r"input\.batch_size: must be greater than 0"),
        ("threshold = 0.5", "threshold = 1.5", r"output\.threshold: must be between 0 and 1"),
        ("color = [0, 255, 0]", "color = [0, 256, 0]", r"output\.segments\[0\]\.color"),
        ('side = "left"', 'side = "right"', r"split-left-right needs exactly one 'left'"),
        ('file = "model.ts.pt"', 'file = "gone.pt"', r"weights\.file: gone\.pt not found"),
        ('modality = ["CT"]', "modality = []", r"input\.modality: at least one"),
        ("[input]", "[input]\nwindow = 3", r"input\.window: unknown key"),
        ('name = "test-lungs"', 'name = "other"', r"name: 'other' differs from its folder"),
        ("sha256 = ", "sha256 = 'XYZ' #", r"weights\.sha256: must be 64 lowercase hex"),
    ],
)
def test_bad_packages_name_file_and_field(
    tmp_path: Path, old: str, new: str, expected: str
) -> None:
    folder = build_package(tmp_path)
    edit(folder, old, new)
    with pytest.raises(ModelPackageError) as info:
        load_model_spec(folder)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(folder / "model.toml"))
    assert re.search(expected, message), message


def test_invalid_toml_and_missing_manifest(tmp_path: Path) -> None:
    folder = build_package(tmp_path)
    (folder / "model.toml").write_text("name = ")
    with pytest.raises(ModelPackageError, match="not valid TOML"):
        load_model_spec(folder)
    with pytest.raises(ModelPackageError, match="not found"):
        load_model_spec(tmp_path / "nothing")
    with pytest.raises(ModelPackageError, match="models folder not found"):
        load_registry(tmp_path / "nowhere")
