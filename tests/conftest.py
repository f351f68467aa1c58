"""Shared fixtures: a scratch project with the repository's specs, and tiny checkpoints."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
FAMILIES = sorted(p.stem for p in (REPO / "specs").glob("*.yaml"))


def _answer(family: str) -> str:
    chat_template = yaml.safe_load((REPO / "specs" / f"{family}.yaml").read_text()).get("chat_template") or {}
    return chat_template.get("answer", "template")


# How each family's processor gets the answer (spec chat_template.answer). The references of test_parity,
# test_labels and TRL's DPO collator render whole conversations with the chat template: they describe the
# `template` families. `suffix` families (PaliGemma: processor(text=prompt, suffix=answer)) are checked
# against that call in test_suffix_answer.py.
TEMPLATE_FAMILIES = [family for family in FAMILIES if _answer(family) == "template"]
SUFFIX_FAMILIES = [family for family in FAMILIES if _answer(family) == "suffix"]


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
