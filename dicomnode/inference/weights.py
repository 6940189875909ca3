"""Loading model weights, checked against the package's digest.

Three formats, so that a site can bring what it has without writing Python:

* ``torchscript``: a TorchScript file, the network and its weights in one;
* ``state_dict``: a PyTorch state dict plus a MONAI network named in the package
  (``[network] name = "UNet"`` and its constructor arguments);
* ``monai_bundle``: a MONAI bundle folder, its ``network_def`` read from
  ``configs/inference.json`` and its weights from ``models/model.pt``.

Weights are read with ``torch.load(weights_only=True)``, and a bundle's network
definition is resolved here rather than by MONAI's config parser, which would
evaluate ``$`` expressions (arbitrary Python) from the package. Only classes of
``monai.networks.nets`` can be built.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from dicomnode.errors import ModelPackageError, first_line
from dicomnode.imaging import ModelSpec


def file_sha256(spec: ModelSpec) -> str:
    """Return the SHA-256 of a package's weights file.

    Parameters
    ----------
    spec : ModelSpec
        The package.

    Returns
    -------
    str
        Lowercase hex digest.
    """
    return _sha256(spec.weights_path)


def openvino_ir_sha256(xml: Path) -> str:
    """Return the SHA-256 over an OpenVINO IR's .xml then its .bin (``openvino_int8_sha256``).

    Parameters
    ----------
    xml : Path
        The IR's .xml file; its .bin lies beside it.

    Returns
    -------
    str
        Lowercase hex digest.
    """
    return _sha256(xml, xml.with_suffix(".bin"))


def _sha256(*paths: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:  # in chunks: weights may be hundreds of MB
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def load_model(spec: ModelSpec, device: torch.device) -> torch.nn.Module:
    """Load a package's model in eval mode, whatever its weights format.

    Parameters
    ----------
    spec : ModelSpec
        The package; its ``weights.sha256``, when set, must match the weights file.
    device : torch.device
        Where to load it.

    Returns
    -------
    torch.nn.Module
        The model.

    Raises
    ------
    ModelPackageError
        One line naming the package and what is wrong with its weights or network.
    """
    if spec.weights.format == "torchscript":
        return load_torchscript(spec, device)
    _check_file(spec)
    if spec.weights.format == "monai_bundle":
        bundle = spec.path / spec.weights.file
        name, args = _bundle_network(spec, bundle / "configs" / "inference.json")
    else:
        name, args = spec.network.name, dict(spec.network.args)
    network = build_network(spec, name, args)
    try:
        state = torch.load(str(spec.weights_path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelPackageError(
            f"model {spec.name}: cannot read {spec.weights_path.name} as a state dict "
            f"({type(exc).__name__})"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a training checkpoint with the weights inside
    if not isinstance(state, dict):
        raise ModelPackageError(
            f"model {spec.name}: {spec.weights_path.name} holds a {type(state).__name__}, "
            "not a state dict"
        )
    try:
        network.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if "\n" in str(exc) else str(exc)[:200]
        raise ModelPackageError(
            f"model {spec.name}: weights do not fit network {name}: {first}"
        ) from None
    return network.to(device).eval()


def build_network(spec: ModelSpec, name: str, args: dict[str, Any]) -> torch.nn.Module:
    """Build a ``monai.networks.nets`` network by class name.

    Parameters
    ----------
    spec : ModelSpec
        The package (for error messages).
    name : str
        The class, e.g. ``UNet`` or ``monai.networks.nets.UNet``.
    args : dict[str, Any]
        Constructor arguments.

    Returns
    -------
    torch.nn.Module
        The network, with random weights.

    Raises
    ------
    ModelPackageError
        If MONAI is missing, the class is unknown, or the arguments do not fit it.
    """
    try:
        import monai.networks.nets as nets
    except ImportError:
        raise ModelPackageError(
            f"model {spec.name}: network {name} needs MONAI (pip install monai)"
        ) from None
    short = name.removeprefix("monai.networks.nets.")
    cls = getattr(nets, short, None) if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", short) else None
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise ModelPackageError(
            f"model {spec.name}: network.name: {name!r} is not a network of monai.networks.nets"
        )
    try:
        return cls(**args)
    except Exception as exc:
        raise ModelPackageError(
            f"model {spec.name}: network.args do not fit {short}: {type(exc).__name__}: "
            f"{first_line(exc)[:200]}"
        ) from None


def _bundle_network(spec: ModelSpec, config: Path) -> tuple[str, dict[str, Any]]:
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError) as exc:
        raise ModelPackageError(
            f"model {spec.name}: bundle configs/inference.json is not readable JSON "
            f"({type(exc).__name__})"
        ) from None
    definition = data.get("network_def") if isinstance(data, dict) else None
    if not isinstance(definition, dict) or not isinstance(definition.get("_target_"), str):
        raise ModelPackageError(
            f"model {spec.name}: bundle configs/inference.json has no network_def with a _target_"
        )
    resolved = _resolve(spec, definition, data, depth=0)
    target = resolved.pop("_target_")
    for key in [k for k in resolved if k.startswith("_")]:
        resolved.pop(key)  # _requires_, _disabled_, _desc_: bundle metadata, not arguments
    return str(target), resolved


def _resolve(spec: ModelSpec, value: Any, config: dict[str, Any], depth: int) -> Any:
    """Replace ``@key`` references by the config's values; refuse ``$`` expressions."""
    if depth > 20:
        raise ModelPackageError(f"model {spec.name}: bundle references nest too deeply")
    if isinstance(value, dict):
        return {k: _resolve(spec, v, config, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(spec, v, config, depth + 1) for v in value]
    if isinstance(value, str) and value.startswith("$"):
        raise ModelPackageError(
            f"model {spec.name}: bundle network_def uses an expression ({value[:40]!r}); "
            "only literal values and @references are supported"
        )
    if isinstance(value, str) and value.startswith("@"):
        key = value[1:]
        if key not in config:
            raise ModelPackageError(f"model {spec.name}: bundle reference {value!r} is undefined")
        return _resolve(spec, config[key], config, depth + 1)
    return value


def _check_file(spec: ModelSpec) -> None:
    path = spec.weights_path
    if not path.is_file():
        raise ModelPackageError(f"model {spec.name}: weights file {path.name} is missing")
    if spec.weights.sha256 and file_sha256(spec) != spec.weights.sha256:
        raise ModelPackageError(
            f"model {spec.name}: weights file {path.name} does not match weights.sha256"
        )


def load_torchscript(spec: ModelSpec, device: torch.device) -> torch.jit.ScriptModule:
    """Load a TorchScript model in eval mode.

    Parameters
    ----------
    spec : ModelSpec
        The package; its ``weights.sha256``, when set, must match the file.
    device : torch.device
        Where to load it.

    Returns
    -------
    torch.jit.ScriptModule
        The model.

    Raises
    ------
    ModelPackageError
        If the file is missing, differs from its digest, or is not TorchScript.
    """
    path = spec.weights_path
    _check_file(spec)
    try:
        with warnings.catch_warnings():
            # torch 2.10+ deprecates TorchScript in favour of torch.export; TorchScript
            # packages remain the most portable format sites have, so keep loading them.
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(path), map_location=device)
    except Exception as exc:
        raise ModelPackageError(
            f"model {spec.name}: cannot load {path.name} as TorchScript ({type(exc).__name__})"
        ) from None
    module.eval()
    return module
