"""Loading the three weight formats, and every way a package's weights can be wrong."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dicomnode.errors import ModelPackageError
from dicomnode.imaging.manifest import load_model_spec
from dicomnode.imaging.volume import volume_from_datasets
from dicomnode.inference import ModelCache, load_model
from dicomnode.inference.segment import segment
from tests.factories import ct_series, lung_phantom
from tests.unit.inference.packages import (
    UNET_TOML,
    build_bundle_package,
    build_state_dict_package,
    monai_unet,
)

CPU = torch.device("cpu")


def same_outputs(loaded: torch.nn.Module, seed: int = 0) -> bool:
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        return torch.equal(loaded(x), monai_unet(seed)(x))


def test_state_dict_with_a_named_monai_network(tmp_path: Path) -> None:
    loaded = load_model(load_model_spec(build_state_dict_package(tmp_path, seed=3)), CPU)
    assert not loaded.training
    assert same_outputs(loaded, seed=3)
    assert not same_outputs(loaded, seed=4)  # the comparison can tell weights apart


def test_monai_bundle_folder(tmp_path: Path) -> None:
    spec = load_model_spec(build_bundle_package(tmp_path, seed=5))
    assert spec.weights_path == spec.path / "bundle" / "models" / "model.pt"
    assert same_outputs(load_model(spec, CPU), seed=5)


@pytest.mark.parametrize("build", [build_state_dict_package, build_bundle_package])
def test_monai_packages_run_through_segmentation(tmp_path: Path, build) -> None:
    spec = load_model_spec(build(tmp_path))
    volume = volume_from_datasets(ct_series(lung_phantom(slices=6, size=48)))
    result = segment(spec, volume, ModelCache(CPU))
    assert result.labels.shape == (6, 48, 48) and result.labels.dtype == np.uint8
    assert set(np.unique(result.labels)) <= {0, 1}


def test_a_checkpoint_with_the_weights_inside_loads(tmp_path: Path) -> None:
    folder = build_state_dict_package(tmp_path)
    torch.save({"epoch": 3, "state_dict": monai_unet().state_dict()}, folder / "weights.pt")
    assert same_outputs(load_model(load_model_spec(folder), CPU))


def rewrite_toml(folder: Path, old: str, new: str) -> None:
    path = folder / "model.toml"
    path.write_text(path.read_text().replace(old, new))


@pytest.mark.parametrize(
    ("network", "message"),
    [
        ('[network]\nname = "NoSuchNet"\n', "'NoSuchNet' is not a network of monai.networks.nets"),
        ('[network]\nname = "os.system"\n', "'os.system' is not a network of monai.networks.nets"),
        ('[network]\nname = "UNet"\nargs = { spatial_dims = 2 }\n',
         "network.args do not fit UNet: TypeError"),
        (UNET_TOML.replace("[4, 8, 16]", "[8, 16, 32]"), "weights do not fit network UNet"),
    ],
)  # fmt: skip
def test_bad_networks_are_one_line_errors(tmp_path: Path, network: str, message: str) -> None:
    folder = build_state_dict_package(tmp_path, network_toml=network)
    with pytest.raises(ModelPackageError, match=message) as info:
        load_model(load_model_spec(folder), CPU)
    assert "\n" not in str(info.value) and "test-unet" in str(info.value)


def test_state_dict_without_a_network_is_refused_on_load(tmp_path: Path) -> None:
    folder = build_state_dict_package(tmp_path, network_toml="")
    with pytest.raises(ModelPackageError, match=r"network.name: state_dict weights need"):
        load_model_spec(folder)


def test_corrupt_or_wrong_weights_files(tmp_path: Path) -> None:
    folder = build_state_dict_package(tmp_path)
    (folder / "weights.pt").write_bytes(b"not a pickle at all")
    with pytest.raises(ModelPackageError, match=r"cannot read weights.pt as a state dict"):
        load_model(load_model_spec(folder), CPU)
    torch.save([1, 2, 3], folder / "weights.pt")
    with pytest.raises(ModelPackageError, match=r"holds a list, not a state dict"):
        load_model(load_model_spec(folder), CPU)
    rewrite_toml(
        folder, 'format = "state_dict"', 'format = "state_dict"\nsha256 = "' + "0" * 64 + '"'
    )
    with pytest.raises(ModelPackageError, match=r"does not match weights.sha256"):
        load_model(load_model_spec(folder), CPU)
    (folder / "weights.pt").unlink()
    with pytest.raises(ModelPackageError, match=r"weights.file: weights.pt not found"):
        load_model_spec(folder)


def test_bundle_problems(tmp_path: Path) -> None:
    expression = {"_target_": "UNet", "spatial_dims": "$__import__('os').getpid()"}
    folder = build_bundle_package(tmp_path / "a", network_def=expression)
    with pytest.raises(ModelPackageError, match=r"uses an expression"):
        load_model(load_model_spec(folder), CPU)

    folder = build_bundle_package(tmp_path / "b", network_def={"_target_": "UNet", "x": "@nope"})
    with pytest.raises(ModelPackageError, match=r"reference '@nope' is undefined"):
        load_model(load_model_spec(folder), CPU)

    folder = build_bundle_package(tmp_path / "c")
    config = folder / "bundle" / "configs" / "inference.json"
    config.write_text(json.dumps({"inferer": {}}))
    with pytest.raises(ModelPackageError, match=r"has no network_def with a _target_"):
        load_model(load_model_spec(folder), CPU)
    config.write_text("{ not json")
    with pytest.raises(ModelPackageError, match=r"not readable JSON"):
        load_model(load_model_spec(folder), CPU)
    (folder / "bundle" / "models" / "model.pt").unlink()
    with pytest.raises(ModelPackageError, match=r"bundle bundle has no models/model.pt"):
        load_model_spec(folder)
