"""Where things are, and the families the tests run over (one tiny checkpoint per spec in specs/)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

TESTS = Path(__file__).resolve().parent.parent
REPO = TESTS.parent
EXAMPLES = REPO / "examples" / "data"
EXPECTED = TESTS / "expected"  # per family, what the real chat template renders (tests/tiny/test_tiny.py)
FIXTURES = TESTS / "fixtures"


def read_spec(family: str) -> dict[str, Any]:
    """The family's spec (specs/FAMILY.yaml) as plain YAML data."""
    return yaml.safe_load((REPO / "specs" / f"{family}.yaml").read_text())


FAMILIES = sorted(p.stem for p in (REPO / "specs").glob("*.yaml"))


def _answer(family: str) -> str:
    return (read_spec(family).get("chat_template") or {}).get("answer", "template")


# How each family's processor gets the answer (spec chat_template.answer). The references of test_parity,
# test_labels and TRL's DPO collator render whole conversations with the chat template: they describe the
# `template` families. `suffix` families (PaliGemma: processor(text=prompt, suffix=answer)) are checked
# against that call in tests/base/test_suffix_answer.py.
TEMPLATE_FAMILIES = [family for family in FAMILIES if _answer(family) == "template"]
SUFFIX_FAMILIES = [family for family in FAMILIES if _answer(family) == "suffix"]
