"""Loading model weights, checked against the package's digest."""

from __future__ import annotations

import hashlib
import warnings

import torch

from dicomnode.errors import ModelPackageError
from dicomnode.inference.registry import ModelSpec


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
    digest = hashlib.sha256()
    with spec.weights_path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
    if not path.is_file():
        raise ModelPackageError(f"model {spec.name}: weights file {path.name} is missing")
    if spec.weights.sha256 and file_sha256(spec) != spec.weights.sha256:
        raise ModelPackageError(
            f"model {spec.name}: weights file {path.name} does not match weights.sha256"
        )
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
