"""Checkpoints written during training resume through --resume_from_checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import EXAMPLES, train_argv

from resonance.commands.train import main


def _argv(ckpt: Path, out: Path, steps: int) -> list[str]:
    return train_argv("dpo", ckpt, EXAMPLES / "dpo.jsonl", out, max_steps=steps, save_strategy="steps", save_steps=1)


def test_dpo_checkpoint_resumes(tiny_checkpoint, tmp_path: Path) -> None:
    ckpt, out = tiny_checkpoint("qwen2_vl"), tmp_path / "out"
    assert main("dpo", _argv(ckpt, out, 2)) == 0
    first = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert main("dpo", [*_argv(ckpt, out, 3), "--resume_from_checkpoint", str(out / "checkpoint-2")]) == 0
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    # the resumed run continued the logged history rather than starting over
    assert state["log_history"][: len(first["log_history"])] == first["log_history"]
    assert [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2, 3]
    assert (out / "checkpoint-3" / "processor_config.json").is_file()
