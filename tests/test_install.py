"""What ``pip install resonance`` asks for: torch as a minimum beside the user's own build, torchvision with it."""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import sys

import tomllib
from helpers import REPO
from packaging.requirements import Requirement

import resonance


def _dependencies() -> dict[str, Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(line) for line in project["dependencies"]]
    return {requirement.name: requirement for requirement in requirements}


def test_torch_is_a_minimum_not_a_pin() -> None:
    """A pin would make pip replace the torch a user has (a CUDA build) with another one."""
    torch = _dependencies()["torch"]
    assert torch.specifier, "torch needs a minimum version"
    assert {spec.operator for spec in torch.specifier} == {">="}, f"torch{torch.specifier}: a minimum only"


def test_torchvision_is_a_dependency() -> None:
    """transformers 5's default (fast) image processors and every video processor need torchvision."""
    torchvision = _dependencies()["torchvision"]
    assert {spec.operator for spec in torchvision.specifier} == {">="}


def test_imports_without_the_processor_patch() -> None:
    """Every module of the package imports (``python -m resonance`` runs the CLI: left out), and none needs the
    removed video-processor patch."""
    for module in pkgutil.walk_packages(resonance.__path__, "resonance."):
        if not module.name.endswith(".__main__"):
            importlib.import_module(module.name)
    assert importlib.util.find_spec("resonance.patches.video_processor") is None
    assert "resonance.patches.video_processor" not in sys.modules
