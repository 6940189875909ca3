"""Routes checked against the installed model packages at start-up."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicomnode.config import parse_settings
from dicomnode.errors import ConfigError
from dicomnode.inference.registry import load_registry
from dicomnode.node import check_routes
from tests.unit.inference.packages import build_classification_package, build_package


def test_requires_model_must_be_a_segmentation_model(tmp_path: Path) -> None:
    build_package(tmp_path, "test-lungs")
    build_classification_package(tmp_path, "test-classes")
    models = load_registry(tmp_path)
    settings = parse_settings(
        {
            "routes": [
                {"name": "classes", "match": {}, "models": ["test-classes"]},
                {"name": "lungs", "match": {}, "models": ["test-lungs"],
                 "requires": {"model": "test-classes"}},
            ]
        },
        environ={},
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"routes\[1\].requires.model: 'test-classes' is a "):
        check_routes(settings, models)
