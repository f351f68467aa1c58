"""Shared fixtures: a scratch project with the repository's specs, and tiny checkpoints. Shared code: helpers/."""

from __future__ import annotations

import shutil
from datetime import datetime
from pathlib import Path

import pytest
from helpers import REPO

# Every chat template rendered in the tests' own process sees this date (Llama 3.2 Vision's system block prints
# "Today Date: ..."): expectations can hold it, and the two renders of a parity test cannot fall on either side of
# midnight. Not the templates' fallback date (26 Jul 2024), so an expectation holding it shows the pin took effect.
RENDER_DATE = datetime(2026, 1, 15, 12, 0)


@pytest.fixture(autouse=True, scope="session")
def pinned_render_date():
    """transformers' ``strftime_now`` (the template global both renderers use) reads :data:`RENDER_DATE`."""
    from transformers.utils import chat_template_utils

    class Pinned(datetime):
        @classmethod
        def now(cls, tz=None) -> datetime:
            return RENDER_DATE.replace(tzinfo=tz)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(chat_template_utils, "datetime", Pinned)
        yield


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
