"""Shared fixtures: a scratch project with the repository's specs, and tiny checkpoints. Shared code: helpers/."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers import REPO


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the repository's specs/ and generated/ to scaffold and break freely."""
    shutil.copytree(REPO / "specs", tmp_path / "specs")
    shutil.copytree(REPO / "generated", tmp_path / "generated", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """``tiny_checkpoint(name)`` -> folder of that family's tiny model and processor (built once)."""
    from resonance.codegen.project import load_specs
    from resonance.tiny import build_tiny, tiny_from_spec

    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            ((_, spec),) = load_specs([REPO / "specs" / f"{name}.yaml"], REPO)
            built[name] = build_tiny(tiny_from_spec(spec), tmp_path_factory.mktemp(name) / "ckpt")
        return built[name]

    return get
