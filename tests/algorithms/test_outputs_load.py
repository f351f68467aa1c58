"""What ``resonance train`` leaves in --output_dir loads in other tools, from any working directory.

A DPO LoRA run on tiny LLaVA, trained with the base checkpoint named by a relative path: the output's adapter names
its base by absolute path, loads through ``peft.AutoPeftModel`` and Resonance's own loader from another folder,
holds the trained adapter alone (TRL's frozen ``ref`` adapter stays in checkpoints, which a resume reloads), and
every file is readable by others (safetensors writes 0600).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import run_resonance, train_argv
from helpers.rows import write_data
from safetensors.torch import load_file

from resonance.algorithms.guards import absolute_base_paths, auto_loadable_adapter, make_readable, publish_checkpoint

UMASK = 0o022


@pytest.fixture(scope="module")
def dpo_output(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Callable[[str], Path]) -> Path:
    """``resonance train dpo --model_name_or_path ckpt`` (relative) in a scratch folder, checkpointing at step 1."""
    tmp = tmp_path_factory.mktemp("dpo")
    (tmp / "ckpt").symlink_to(tiny_checkpoint("llava"), target_is_directory=True)
    argv = train_argv("dpo", "ckpt", write_data(tmp, "dpo").name, "out", save_strategy="steps", save_steps=1)
    old = os.umask(UMASK)
    try:
        done = run_resonance("train", "dpo", *argv, cwd=tmp)
    finally:
        os.umask(old)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp / "out"


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The working directory is a folder that holds nothing of the run."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_adapter_names_its_base_by_absolute_path(dpo_output: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    config = json.loads((dpo_output / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_checkpoint("llava").resolve())
    checkpoint_config = json.loads((dpo_output / "checkpoint-1" / "adapter_config.json").read_text())
    assert Path(checkpoint_config["base_model_name_or_path"]).is_absolute()


def test_auto_peft_model_loads_the_output_from_another_folder(dpo_output: Path, elsewhere: Path) -> None:
    from peft import AutoPeftModel

    model = AutoPeftModel.from_pretrained(str(dpo_output))
    assert type(model.get_base_model()).__name__ == "LlavaForConditionalGeneration"
    saved = load_file(dpo_output / "adapter_model.safetensors")
    name = next(n for n in saved if "lora_B" in n)
    assert saved[name].abs().sum() > 0, "the trained adapter is not its zero start"
    loaded = dict(model.named_parameters())[name.replace(".weight", ".default.weight")]
    torch.testing.assert_close(loaded.detach(), saved[name])


def test_resonance_loads_the_output_from_another_folder(dpo_output: Path, elsewhere: Path) -> None:
    from resonance.generation import load_for_generation

    _, model, processor = load_for_generation(dpo_output, device="cpu")
    assert hasattr(model, "peft_config") and processor.hf is not None


def test_output_holds_the_trained_adapter_alone(dpo_output: Path) -> None:
    assert not (dpo_output / "ref").exists()
    assert (dpo_output / "checkpoint-1" / "ref" / "adapter_model.safetensors").is_file(), "kept for a resume"


def test_every_output_file_is_readable_by_others(dpo_output: Path) -> None:
    files = [p for p in dpo_output.rglob("*") if p.is_file()]
    assert any(p.name == "adapter_model.safetensors" for p in files)
    unreadable = {
        str(p.relative_to(dpo_output)): oct(p.stat().st_mode & 0o777)
        for p in files
        if p.stat().st_mode & 0o044 != 0o044
    }
    assert not unreadable


# -- the steps, on hand-made folders -------------------------------------------------------------------------


def _adapter(folder: Path, base: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base, "task_type": "CAUSAL_LM"}))
    return folder / "adapter_config.json"


def test_only_local_folders_become_absolute(elsewhere: Path) -> None:
    (elsewhere / "base").mkdir()
    local = _adapter(elsewhere / "out", "base")
    hub = _adapter(elsewhere / "out" / "other", "llava-hf/llava-1.5-7b-hf")
    absolute_base_paths(elsewhere / "out")
    assert json.loads(local.read_text())["base_model_name_or_path"] == str((elsewhere / "base").resolve())
    assert json.loads(hub.read_text())["base_model_name_or_path"] == "llava-hf/llava-1.5-7b-hf"


def test_auto_mapping_names_the_checkpoints_class(tiny_checkpoint: Callable[[str], Path], tmp_path: Path) -> None:
    config_file = _adapter(tmp_path / "out", str(tiny_checkpoint("llava")))
    auto_loadable_adapter(tmp_path / "out")
    config = json.loads(config_file.read_text())
    assert config["task_type"] is None
    assert config["auto_mapping"] == {
        "base_model_class": "LlavaForConditionalGeneration",
        "parent_library": "transformers",
    }


def test_make_readable_adds_the_read_bits_a_new_file_gets(tmp_path: Path) -> None:
    private, script = tmp_path / "sub" / "weights.safetensors", tmp_path / "run.sh"
    private.parent.mkdir()
    private.write_bytes(b"x")
    script.write_text("#!/bin/sh\n")
    private.chmod(0o600)
    script.chmod(0o700)
    old = os.umask(UMASK)
    try:
        make_readable(tmp_path)
    finally:
        os.umask(old)
    assert private.stat().st_mode & 0o777 == 0o644
    assert script.stat().st_mode & 0o777 == 0o744


def test_a_checkpoint_is_readable_and_names_its_base_absolutely_as_soon_as_it_is_published(elsewhere: Path) -> None:
    """Mid-run, not only when the run ends: serving or evaluating ``checkpoint-N`` from another account works."""
    (elsewhere / "base").mkdir()
    staged = elsewhere / "out" / ".partial" / "checkpoint-1"
    config_file = _adapter(staged, "base")
    (staged / "adapter_model.safetensors").write_bytes(b"x")
    (staged / "adapter_model.safetensors").chmod(0o600)
    old = os.umask(UMASK)
    try:
        publish_checkpoint(staged, elsewhere / "out" / "checkpoint-1")
    finally:
        os.umask(old)
    final = elsewhere / "out" / "checkpoint-1"
    assert (final / "adapter_model.safetensors").stat().st_mode & 0o777 == 0o644
    base = json.loads((final / config_file.name).read_text())["base_model_name_or_path"]
    assert base == str((elsewhere / "base").resolve())
    assert not (elsewhere / "out" / ".partial").exists()
