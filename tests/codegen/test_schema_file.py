"""The spec's JSON Schema ships as specs/resonance-spec.schema.json: described, identified, named by every spec's
yaml-language-server header, drift-checked by ``resonance check``; and ``.pre-commit-hooks.yaml`` runs that check."""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import FAMILIES
from helpers.cli import run_resonance
from helpers.repo import REPO

from resonance.cli import main
from resonance.codegen.schema import SCHEMA_DIALECT, SCHEMA_ID, ModelSpec
from resonance.codegen.schema_file import (
    SCHEMA_FILE,
    SCHEMA_PATH,
    WRITE_COMMAND,
    YAML_HEADER,
    schema_json,
    write_schema,
)
from resonance.errors import EXIT_FAILED, EXIT_INPUT, ConfigError

SHIPPED = REPO / SCHEMA_PATH
SPECS = sorted((REPO / "specs").glob("*.yaml"))


def _properties(node: Any, where: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every property of every object anywhere in the schema, as (dotted place, its schema)."""
    if isinstance(node, dict):
        for name, prop in (node.get("properties") or {}).items():
            yield f"{where}.{name}", prop
        for key, value in node.items():
            yield from _properties(value, f"{where}.{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _properties(value, f"{where}.{index}")


def test_every_property_has_a_description() -> None:
    properties = list(_properties(ModelSpec.model_json_schema(), "spec"))
    assert len(properties) > 50  # the walk reaches the nested models ($defs), not only the top level
    assert [where for where, prop in properties if not prop.get("description", "").strip()] == []


def test_schema_names_its_id_and_dialect() -> None:
    schema = ModelSpec.model_json_schema()
    assert (schema["$id"], schema["$schema"]) == (SCHEMA_ID, SCHEMA_DIALECT)


def test_shipped_file_is_what_the_schema_command_prints(capsys: pytest.CaptureFixture[str]) -> None:
    assert SHIPPED.read_text(encoding="utf-8") == schema_json()
    capsys.readouterr()
    assert main(["schema"]) == 0
    assert capsys.readouterr().out == SHIPPED.read_text(encoding="utf-8")


@pytest.mark.parametrize("spec", SPECS, ids=[p.stem for p in SPECS])
def test_every_spec_points_its_editor_at_the_shipped_file(spec: Path) -> None:
    first = spec.read_text(encoding="utf-8").splitlines()[0]
    assert first == YAML_HEADER
    target = re.fullmatch(r"# yaml-language-server: \$schema=(\S+)", first).group(1)  # type: ignore[union-attr]
    assert (spec.parent / target).resolve() == SHIPPED.resolve() and SHIPPED.is_file()


def _check(project: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``resonance check`` on ``project``: the exit code, stdout (the diff) and stderr."""
    capsys.readouterr()
    code = main(["check", "--project", str(project)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    ("damage", "says", "diff"),
    [
        (
            lambda path: path.write_text(SHIPPED.read_text().replace('"description"', '"title"', 1)),
            "out of date",
            f"--- a/{SCHEMA_PATH}\n+++ b/{SCHEMA_PATH}\n",
        ),
        (
            Path.unlink,
            "missing; the yaml-language-server header of " + ", ".join(f"specs/{f}.yaml" for f in FAMILIES[:2]),
            "",
        ),
    ],
    ids=["stale", "missing"],
)
def test_check_fails_on_the_schema_file_and_names_the_fix(
    project: Path, capsys: pytest.CaptureFixture[str], damage: Any, says: str, diff: str
) -> None:
    damage(project / SCHEMA_PATH)
    code, out, err = _check(project, capsys)
    assert code == EXIT_FAILED
    assert f"{SCHEMA_PATH}: {says}" in err
    assert f"To fix, run: {WRITE_COMMAND} --project {project.resolve()}\n" in err  # run from elsewhere: it says where
    assert (
        out.startswith(diff)
        and ('-      "title"' in out) == bool(diff)
        and ('+      "description"' in out) == bool(diff)
    )
    assert main(["schema", "--write", "--project", str(project)]) == 0
    assert (project / SCHEMA_PATH).read_text(encoding="utf-8") == schema_json()
    assert _check(project, capsys)[:2] == (0, "")


def test_scaffold_names_the_schema_fix_but_writes_only_generated(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (project / SCHEMA_PATH).write_text("{}\n")
    capsys.readouterr()
    assert main(["scaffold", "--project", str(project)]) == 0
    assert f"{SCHEMA_PATH}: out of date" in capsys.readouterr().err
    assert (project / SCHEMA_PATH).read_text() == "{}\n"


def test_a_project_that_neither_ships_nor_names_the_file_passes(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (project / SCHEMA_PATH).unlink()
    for spec in (project / "specs").glob("*.yaml"):
        spec.write_text(spec.read_text(encoding="utf-8").replace(YAML_HEADER + "\n", ""), encoding="utf-8")
    assert _check(project, capsys) == (0, "", f"generated/ is up to date with {len(FAMILIES)} spec(s).\n")


def test_write_goes_to_the_project_found_from_a_subfolder(project: Path) -> None:
    (project / SCHEMA_PATH).unlink()
    written = run_resonance("schema", "--write", cwd=project / "generated")
    assert (written.returncode, written.stderr) == (0, f"wrote {SCHEMA_PATH}\n")
    assert (project / SCHEMA_PATH).read_text(encoding="utf-8") == schema_json()


def test_write_needs_a_specs_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema", "--write", "--project", str(tmp_path)]) == EXIT_INPUT
    assert f"--project {tmp_path}: has no specs/ folder" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=f"has no specs/ folder to write {SCHEMA_FILE} into"):
        write_schema(tmp_path)
    assert list(tmp_path.iterdir()) == []


# -- .pre-commit-hooks.yaml -------------------------------------------------------------------------------------


def _hook() -> dict[str, Any]:
    hooks = yaml.safe_load((REPO / ".pre-commit-hooks.yaml").read_text(encoding="utf-8"))
    assert isinstance(hooks, list) and [h["id"] for h in hooks] == ["resonance-check"]
    return hooks[0]


def test_pre_commit_hook_declares_a_whole_project_check_on_specs_and_generated() -> None:
    hook = _hook()
    assert {"id", "name", "entry", "language"} <= set(hook)  # what pre-commit's manifest requires
    assert (hook["language"], hook["pass_filenames"]) == ("python", False)
    files = re.compile(hook["files"])
    touched = ["specs/llava.yaml", SCHEMA_PATH, "generated/llava/__init__.py", "generated/registry.py"]
    assert [path for path in touched if not files.search(path)] == []
    assert [path for path in ["resonance/cli.py", "README.md", "tests/specs/x.yaml"] if files.search(path)] == []


def test_pre_commit_hook_entry_is_the_installed_check(project: Path) -> None:
    program, *args = shlex.split(_hook()["entry"])
    assert [script.value for script in entry_points(group="console_scripts", name=program)] == ["resonance.cli:entry"]
    assert args == ["check"]
    assert run_resonance(*args, cwd=project).returncode == 0
    (project / SCHEMA_PATH).write_text("{}\n")
    failed = run_resonance(*args, cwd=project)
    assert failed.returncode == EXIT_FAILED and f"To fix, run: {WRITE_COMMAND}\n" in failed.stderr
