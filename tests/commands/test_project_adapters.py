"""A project's own specs serve its checkpoints: ``train``, ``generate``, ``data inspect`` and ``export`` run in a
project (found from the current folder, or named by ``--project``; ``--spec_project`` in ``train``) use the
adapters compiled from its specs/, override hooks included, and refuse a ``generated/`` that is not what those
specs compile to.

The project here is ``mini``: the packaged llava spec under another name, training only ``q_proj`` and with an
override hook that marks every prompt, so that which adapters ran can be seen in the output.
"""

from __future__ import annotations

import importlib
import json
import shutil
import sys
from pathlib import Path

import pytest
from helpers.cli import generate_argv, train_argv
from helpers.repo import REPO
from helpers.rows import write_data

from resonance.base import registry
from resonance.cli import main
from resonance.errors import EXIT_INPUT, EXIT_OK

HOOKS = """class ProcessorHooks:
    def render_conversation(self, messages, add_generation_prompt):
        return "[mini] " + super().render_conversation(messages, add_generation_prompt)
"""


@pytest.fixture(autouse=True)
def _restore_adapters(monkeypatch: pytest.MonkeyPatch):
    """Each test chooses the adapters in this process; the next test starts from the packaged ones again."""
    monkeypatch.setattr(registry, "_in_use", registry.adapters_in_use())
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield
    for name in [n for n in sys.modules if n.split(".")[0] in (registry.PROJECT_PACKAGE, "mini_hooks")]:
        del sys.modules[name]


def _spec_text(name: str, family: str = "llava") -> str:
    """The packaged spec of ``family`` as ``name`` (without the editor header naming a schema file)."""
    lines = (REPO / "specs" / f"{family}.yaml").read_text().splitlines(keepends=True)
    text = "".join(line for line in lines if "yaml-language-server" not in line)
    text = text.replace(f"\nname: {family}\n", f"\nname: {name}\n")
    assert f"\nname: {name}\n" in text
    return text


def _mini_project(root: Path, scaffold: bool = True) -> Path:
    """The project ``mini``, compiled with ``resonance scaffold`` unless ``scaffold`` is False."""
    (root / "specs").mkdir(parents=True)
    text = _spec_text("mini")
    targets = "  targets: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]"
    assert targets in text
    text = text.replace(targets, "  targets: [q_proj]")
    text += "overrides:\n  module: mini_hooks\n  hooks: [processor.render_conversation]\n"
    (root / "specs" / "mini.yaml").write_text(text)
    (root / "mini_hooks.py").write_text(HOOKS)
    if scaffold:
        assert main(["scaffold", "--project", str(root)]) == EXIT_OK
    return root


def _prompts(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    return write_data(folder, "prompt")


def _generated_prompts(answers: Path) -> list[str]:
    return [json.loads(line)["prompt"] for line in answers.read_text().splitlines()]


@pytest.mark.parametrize("named_by", ["the current folder", "--spec_project"])
def test_training_in_a_project_uses_the_project_s_adapter(
    named_by: str, tmp_path: Path, tiny_checkpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = _mini_project(tmp_path / "project")
    data = write_data(tmp_path, "sft")
    monkeypatch.chdir(project if named_by == "the current folder" else tmp_path)
    out = tmp_path / "out"
    extra = {} if named_by == "the current folder" else {"spec_project": project}
    assert main(["train", "sft", *train_argv("sft", tiny_checkpoint("llava"), data, out, **extra)]) == EXIT_OK
    adapter = json.loads((out / "adapter_config.json").read_text())
    targets = adapter["target_modules"]  # a pattern anchored at the language model
    assert "q_proj" in targets and "k_proj" not in targets  # the packaged llava spec trains seven projections
    assert registry.adapters_in_use().where == f"the project {project.resolve()}"


def test_generate_with_project_from_another_folder_runs_the_project_s_override_hooks(
    tmp_path: Path, tiny_checkpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = _mini_project(tmp_path / "project")
    prompts = _prompts(tmp_path)
    monkeypatch.chdir(tmp_path)
    answers = tmp_path / "answers.jsonl"
    argv = generate_argv(tiny_checkpoint("llava"), prompts, answers, max_new_tokens=2)
    assert main(["generate", *argv, "--project", str(project)]) == EXIT_OK
    assert all(prompt.startswith("[mini] ") for prompt in _generated_prompts(answers))
    packaged = tmp_path / "packaged.jsonl"  # the same command outside any project: the packaged llava adapter
    assert main(["generate", *generate_argv(tiny_checkpoint("llava"), prompts, packaged, max_new_tokens=2)]) == 0
    assert not any(prompt.startswith("[mini]") for prompt in _generated_prompts(packaged))


def test_data_inspect_names_the_project_s_family(
    tmp_path: Path, tiny_checkpoint, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    project = _mini_project(tmp_path / "project")
    prompts = _prompts(tmp_path)
    monkeypatch.chdir(project / "specs")  # below the project: found as git finds .git
    assert main(["data", "inspect", str(prompts), "--model", str(tiny_checkpoint("llava"))]) == EXIT_OK
    assert "mini" in capsys.readouterr().out


def test_a_project_whose_generated_code_is_out_of_date_is_refused_before_anything_is_written(
    tmp_path: Path, tiny_checkpoint, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    project = _mini_project(tmp_path / "project")
    spec = project / "specs" / "mini.yaml"
    spec.write_text(spec.read_text().replace("  targets: [q_proj]", "  targets: [v_proj]"))
    data = write_data(tmp_path, "sft")
    monkeypatch.chdir(project)
    out = tmp_path / "out"
    assert main(["train", "sft", *train_argv("sft", tiny_checkpoint("llava"), data, out)]) == EXIT_INPUT
    err = capsys.readouterr().err
    assert f"error: the project {project.resolve()}: generated/ is not what its specs compile to" in err
    assert "generated/mini/__init__.py: out of date" in err
    assert f"`resonance scaffold --project {project.resolve()}`" in err
    assert not out.exists()


def test_a_project_with_specs_but_no_generated_code_says_to_scaffold(
    tmp_path: Path, tiny_checkpoint, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    project = _mini_project(tmp_path / "project", scaffold=False)
    answers = tmp_path / "answers.jsonl"
    argv = generate_argv(tiny_checkpoint("llava"), _prompts(tmp_path), answers)
    monkeypatch.chdir(project)
    assert main(["generate", *argv]) == EXIT_INPUT
    err = capsys.readouterr().err
    assert f"the project {project.resolve()} has specs/ but no compiled adapters" in err
    assert "resonance scaffold" in err
    assert not answers.exists()


def test_a_checkpoint_the_project_has_no_spec_for_points_at_the_packaged_specs(
    tmp_path: Path, tiny_checkpoint, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    project = tmp_path / "project"
    (project / "specs").mkdir(parents=True)
    (project / "specs" / "myqwen.yaml").write_text(_spec_text("myqwen", family="qwen2_vl"))
    assert main(["scaffold", "--project", str(project)]) == EXIT_OK
    monkeypatch.chdir(project)
    argv = generate_argv(tiny_checkpoint("llava"), _prompts(tmp_path), tmp_path / "answers.jsonl")
    assert main(["generate", *argv]) == EXIT_INPUT
    err = capsys.readouterr().err
    assert f"'LlavaForConditionalGeneration' has no Resonance adapter in the project {project.resolve()}" in err
    assert "Qwen2VLForConditionalGeneration (myqwen)" in err
    assert f"The packaged specs serve it: pass --project {REPO}" in err


def test_two_projects_in_one_process_each_get_their_own_adapters(tmp_path: Path) -> None:
    first = _mini_project(tmp_path / "first")
    second = tmp_path / "second"
    shutil.copytree(first, second)
    spec = second / "specs" / "mini.yaml"
    spec.write_text(spec.read_text().replace("  targets: [q_proj]", "  targets: [v_proj]"))
    assert main(["scaffold", "--project", str(second)]) == EXIT_OK
    targets = []
    for root in (first, second, first):
        registry.use_adapters(root)
        model = importlib.import_module(f"{registry.PROJECT_PACKAGE}.mini").core_mapper.model
        targets.append(model.default_lora_target)
    assert targets == [["q_proj"], ["v_proj"], ["q_proj"]]
    registry.use_adapters(REPO)
    assert registry.adapters_in_use().packaged


def test_train_s_project_flag_is_trackio_s_and_a_folder_there_is_refused_naming_spec_project(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """transformers' TrainingArguments owns ``--project`` (Trackio's project name): read only with that tracker, so
    a run without it refuses the flag instead of ignoring it, and says where the Resonance project goes."""
    argv = train_argv("sft", tmp_path, tmp_path / "rows.jsonl", tmp_path / "out", project=tmp_path)
    assert main(["train", "sft", *argv]) == EXIT_INPUT
    err = capsys.readouterr().err
    assert f"error: --project {tmp_path}: the Trackio project name (transformers' TrainingArguments)" in err
    assert "is --spec_project DIR in resonance train" in err
