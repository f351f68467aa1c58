"""Every command works from any folder: the packaged specs by default, a project's own specs/ when there is one,
``--project DIR`` to say which; a Hub id where a checkpoint folder belongs says how to get the checkpoint.

Each test runs the installed ``resonance`` console script, as a user does, from a folder of ``tmp_path``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.cli import generate_argv, run_resonance, train_argv
from helpers.repo import REPO
from helpers.rows import write_data

from resonance import codegen
from resonance.base.registry import checkpoint_architecture
from resonance.errors import EXIT_FAILED, EXIT_INPUT, CheckpointError

PACKAGED = sorted(path.stem for path in (REPO / "specs").glob("*.yaml"))
HUB_ID = "llava-hf/llava-1.5-7b-hf"


def _own_project(root: Path) -> Path:
    """A project whose only spec is ``mini``: the packaged llava spec under another name (without the editor header
    that names a schema file this project does not have)."""
    (root / "specs").mkdir(parents=True)
    lines = (REPO / "specs" / "llava.yaml").read_text().splitlines(keepends=True)
    text = "".join(line for line in lines if "yaml-language-server" not in line)
    text = text.replace("\nname: llava\n", "\nname: mini\n")
    assert "\nname: mini\n" in text
    (root / "specs" / "mini.yaml").write_text(text)
    return root


def _empty(tmp_path: Path) -> Path:
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    return folder


def test_models_from_an_empty_folder_lists_the_packaged_specs_and_says_where_they_come_from(tmp_path: Path) -> None:
    result = run_resonance("models", cwd=_empty(tmp_path))
    assert result.returncode == 0, result.stderr
    for name in PACKAGED:
        assert f" {name} " in result.stdout
    assert f"{len(PACKAGED)} spec(s) from the specs packaged with resonance ({REPO / 'specs'})" in result.stdout


def test_tiny_from_an_empty_folder_builds_a_packaged_family(tmp_path: Path) -> None:
    result = run_resonance("tiny", "llava", "tiny-llava", cwd=_empty(tmp_path))
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "elsewhere" / "tiny-llava" / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]


def test_verify_by_name_from_an_empty_folder_checks_the_packaged_spec(tmp_path: Path) -> None:
    result = run_resonance("verify", "llava", cwd=_empty(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "specs/llava.yaml: every check passed" in result.stderr


@pytest.mark.parametrize("command", [["check"], ["scaffold"], ["scaffold", "--check"]])
def test_check_and_scaffold_outside_a_project_say_there_is_none_and_write_nothing(
    tmp_path: Path, command: list[str]
) -> None:
    folder = _empty(tmp_path)
    result = run_resonance(*command, cwd=folder)
    assert result.returncode == EXIT_INPUT, result.stderr
    assert result.stderr.startswith(f"error: no Resonance project in {folder} or the folders above it")
    assert "pass --project DIR" in result.stderr and "Traceback" not in result.stderr
    assert list(folder.iterdir()) == []


def test_a_project_s_own_specs_win_in_its_folder_and_below_it(tmp_path: Path) -> None:
    project = _own_project(tmp_path / "proj")
    models = run_resonance("models", cwd=project)
    assert models.returncode == 0, models.stderr
    assert " mini " in models.stdout and " llava " not in models.stdout
    assert f"1 spec(s) from the project {project} (specs/)" in models.stdout

    tiny = run_resonance("tiny", "llava", "out", cwd=project)
    assert tiny.returncode == EXIT_INPUT
    assert f"no spec 'llava' in the project {project} (specs/) (known: mini)" in tiny.stderr
    assert f"--project {REPO}" in tiny.stderr  # how to reach the packaged ones instead

    assert run_resonance("scaffold", cwd=project).returncode == 0
    assert (project / "generated" / "mini" / "__init__.py").is_file()
    below = project / "data" / "images"
    below.mkdir(parents=True)
    check = run_resonance("check", cwd=below)  # found upward: the nearest folder with specs/ and generated/
    assert check.returncode == 0, check.stderr
    assert "up to date with 1 spec(s)" in check.stderr


def test_project_names_the_project_from_anywhere_and_the_fix_names_it_too(tmp_path: Path) -> None:
    project = _own_project(tmp_path / "proj")
    elsewhere = _empty(tmp_path)
    models = run_resonance("models", "--project", str(project), cwd=elsewhere)
    assert models.returncode == 0, models.stderr
    assert " mini " in models.stdout and " llava " not in models.stdout

    check = run_resonance("check", "--project", str(project), cwd=elsewhere)
    assert check.returncode == EXIT_FAILED
    assert f"To fix, run: resonance scaffold --project {project}" in check.stderr
    assert run_resonance("scaffold", "--project", str(project), cwd=elsewhere).returncode == 0
    assert run_resonance("check", "--project", str(project), cwd=elsewhere).returncode == 0
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize(("given", "why"), [("missing", "no such folder"), ("empty", "has no specs/ folder")])
def test_a_project_without_specs_is_refused_naming_the_flag(tmp_path: Path, given: str, why: str) -> None:
    target = tmp_path / given
    if given == "empty":
        target.mkdir()
    result = run_resonance("models", "--project", str(target), cwd=_empty(tmp_path))
    assert result.returncode == EXIT_INPUT
    assert result.stderr.strip() == (
        f"error: --project {target}: {why}; name the folder that holds specs/ (and generated/)"
    )


def test_find_project_takes_specs_here_but_above_only_with_generated(tmp_path: Path) -> None:
    (tmp_path / "specs").mkdir()
    assert codegen.find_project(tmp_path) == tmp_path.resolve()  # a project before its first scaffold
    assert codegen.find_project(tmp_path / "sub") is None  # a specs/ folder above is not enough (not ours?)
    (tmp_path / "generated").mkdir()
    assert codegen.find_project(tmp_path / "sub" / "deeper") == tmp_path.resolve()


def _hub_id_line(checkpoint: str) -> str:
    return (
        f"{checkpoint}: no such folder; it looks like a Hugging Face Hub id, and checkpoints are read from folders: "
        f"download it where the Hub is reachable (`hf download {HUB_ID} --local-dir llava-1.5-7b-hf`), then pass "
        "that folder"
    )


@pytest.mark.parametrize("command", ["train", "generate", "verify"])
def test_a_hub_id_as_the_checkpoint_says_in_one_line_how_to_get_it(tmp_path: Path, command: str) -> None:
    folder = _empty(tmp_path)
    argv = {
        "train": ["train", "sft", *train_argv("sft", HUB_ID, write_data(folder, "sft"), folder / "out")],
        "generate": ["generate", *generate_argv(HUB_ID, write_data(folder, "prompt"), folder / "answers.jsonl")],
        "verify": ["verify", "llava", "--checkpoint", HUB_ID],
    }[command]
    result = run_resonance(*argv, cwd=folder)
    assert result.returncode == EXIT_INPUT, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    named = "--checkpoint " + HUB_ID if command == "verify" else HUB_ID
    assert errors == ["error: " + _hub_id_line(named)]
    assert "Traceback" not in result.stderr


def test_a_missing_folder_that_is_no_hub_id_is_just_missing(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such"
    with pytest.raises(CheckpointError) as raised:
        checkpoint_architecture(missing)
    assert str(raised.value) == f"{missing}: no such folder; give a checkpoint folder (as save_pretrained writes it)"


def test_a_lora_folder_whose_base_is_a_hub_id_names_the_field_it_came_from(tmp_path: Path) -> None:
    adapter = tmp_path / "lora"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": HUB_ID}))
    with pytest.raises(CheckpointError) as raised:
        checkpoint_architecture(adapter)
    assert str(raised.value) == _hub_id_line(f"{adapter / 'adapter_config.json'}: base_model_name_or_path {HUB_ID}")


def test_the_project_flag_s_help_says_what_it_defaults_to(tmp_path: Path) -> None:
    result = run_resonance("models", "--help", cwd=_empty(tmp_path))
    text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", result.stdout).split())
    assert (
        "--project <path> Project folder holding specs/ and generated/. Default: the current folder when it holds "
        "specs/, else the nearest folder above it holding both; with none, the specs packaged with resonance."
    ) in text


def test_models_in_a_project_with_no_specs_says_so_instead_of_an_empty_table(tmp_path: Path) -> None:
    project = tmp_path / "proj"
    (project / "specs").mkdir(parents=True)
    result = run_resonance("models", cwd=project)
    assert result.returncode == EXIT_INPUT
    assert result.stderr.strip() == f"error: no specs in the project {project} (specs/): add specs/NAME.yaml files"
    assert result.stdout == ""


def test_scaffold_of_a_spec_file_uses_the_project_that_holds_it(tmp_path: Path) -> None:
    project = _own_project(tmp_path / "proj")
    spec = project / "specs" / "mini.yaml"
    elsewhere = _empty(tmp_path)
    scaffold = run_resonance("scaffold", str(spec), cwd=elsewhere)
    assert scaffold.returncode == 0, scaffold.stderr
    assert (project / "generated" / "mini" / "__init__.py").is_file()
    assert list(elsewhere.iterdir()) == []
    assert run_resonance("check", cwd=project).returncode == 0


def _pip(*args: str) -> None:
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    subprocess.run([sys.executable, "-m", "pip", *args, "-q"], check=True, env=env, capture_output=True, timeout=300)


def test_a_wheel_carries_the_specs_and_commands_outside_a_project_use_them(tmp_path: Path) -> None:
    """What a pip user has: the built wheel, installed on its own, run from an empty folder."""
    source = tmp_path / "src"  # a copy, so the build leaves nothing in the checkout
    for name in ("resonance", "generated", "specs", "templates"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    _pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "wheel"), str(source))
    _pip("install", "--no-deps", "--target", str(tmp_path / "site"), *map(str, (tmp_path / "wheel").glob("*.whl")))
    packaged = tmp_path / "site" / "resonance" / "_data" / "specs"
    assert sorted(path.stem for path in packaged.glob("*.yaml")) == PACKAGED

    elsewhere = _empty(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}  # ahead of the editable install's finder

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        code = f"import sys; from resonance.cli import main; sys.exit(main({list(args)!r}))"
        return subprocess.run(
            [sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300
        )

    models = run("models")
    assert models.returncode == 0, models.stderr
    assert f"{len(PACKAGED)} spec(s) from the specs packaged with resonance ({packaged})" in models.stdout
    check = run("check")
    assert check.returncode == EXIT_INPUT and "no Resonance project in" in check.stderr


def test_tiny_with_an_unknown_name_fails_before_torch_is_imported(tmp_path: Path) -> None:
    code = (
        "import sys\nfrom resonance.cli import main\ncode = main(['tiny', 'nope', 'out'])\n"
        "print(code, 'torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=_empty(tmp_path), capture_output=True, text=True)
    assert result.stdout.split() == [str(EXIT_INPUT), "False"], result.stderr
    assert "error: no spec 'nope' in the specs packaged with resonance" in result.stderr
