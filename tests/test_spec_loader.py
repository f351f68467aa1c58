"""The spec loader: valid specs load; every kind of mistake names file:line:col and the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from resonance.cli import app
from resonance.codegen.loader import load_spec
from resonance.codegen.schema import ModelSpec
from resonance.errors import SpecError

REPO = Path(__file__).resolve().parent.parent


def _break(project: Path, old: str, new: str, name: str = "llava") -> Path:
    path = project / "specs" / f"{name}.yaml"
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))
    return path


def _line_of(path: Path, needle: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if needle in line)


def test_repository_specs_load() -> None:
    for path in sorted((REPO / "specs").glob("*.yaml")):
        spec = load_spec(path)
        assert isinstance(spec, ModelSpec) and spec.name == path.stem


@pytest.mark.parametrize(
    ("old", "new", "field", "needle", "col", "message"),
    [
        (
            "flash_attention: true",
            "flash_attention: maybe",
            "flash_attention",
            "flash_attention:",
            18,
            "bool",
        ),
        (
            "  projector: model.multi_modal_projector",
            "  projektor: x",
            "modules.projektor",
            "projektor",
            3,
            "did you mean 'projector'?",
        ),
        ("model_class: LlavaForConditionalGeneration\n", "", "model_class", "name: llava", 1, "missing"),
        ("name: llava", "name: Llava", "name", "name: Llava", 7, "lower case"),
        ("name: llava", "name: os; import sys", "name", "name: os", 7, "not a Python identifier"),
        (
            "  vision_tower: model.vision_tower",
            "  vision_tower: model..vision_tower",
            "modules.vision_tower",
            "vision_tower: model..",
            17,
            "dotted path",
        ),
        ("  targets: [q_proj,", "  targets: [q-proj,", "lora.targets.0", "targets:", 13, "identifier"),
        (
            'transformers: ">=5.20,<6"',
            'transformers: "\\"\\"\\" import os"',
            "transformers",
            "transformers:",
            15,
            "version range",
        ),
    ],
)
def test_invalid_spec_names_file_line_col(project: Path, old, new, field, needle, col, message) -> None:
    path = _break(project, old, new)
    with pytest.raises(SpecError) as info:
        load_spec(path, display="specs/llava.yaml")
    problem = next(p for p in info.value.problems if p.field == field)
    assert problem.line == _line_of(path, needle)
    assert problem.col == col
    assert message in problem.message
    assert str(problem).startswith(f"specs/llava.yaml:{problem.line}:{col}: {field}: ")


def test_all_problems_reported_at_once(project: Path) -> None:
    _break(project, "flash_attention: true", "flash_attention: maybe")
    path = _break(project, "position_ids: 1d", "position_ids: 4d")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert {p.field for p in info.value.problems} == {"flash_attention", "position_ids"}


def test_yaml_syntax_and_duplicate_keys(project: Path) -> None:
    path = _break(project, "flash_attention: true", "flash_attention: true\nflash_attention: false")
    with pytest.raises(SpecError, match=r"llava.yaml:\d+:1: <spec>: invalid YAML: duplicate key 'flash_attention'"):
        load_spec(path)
    path.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="invalid YAML"):
        load_spec(path)


def test_name_must_match_file(project: Path) -> None:
    path = project / "specs" / "llava.yaml"
    renamed = project / "specs" / "llava2.yaml"
    path.rename(renamed)
    with pytest.raises(SpecError, match="must match the file name 'llava2'"):
        load_spec(renamed)


def test_cli_exit_2_on_invalid_spec(project: Path) -> None:
    _break(project, "flash_attention: true", "flash_attention: maybe")
    result = CliRunner().invoke(app, ["check", "--project", str(project)])
    assert result.exit_code == 2
    assert "specs/llava.yaml:" in result.stderr and "flash_attention:" in result.stderr


def test_schema_command_prints_json_schema() -> None:
    result = CliRunner().invoke(app, ["schema"])
    assert result.exit_code == 0
    schema = json.loads(result.stdout)
    assert schema["additionalProperties"] is False
    assert {"name", "modules", "lora", "image", "tiny"} <= set(schema["properties"])
