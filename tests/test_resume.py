"""Checkpoints written during training resume through --resume_from_checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

from resonance.commands.train import main

REPO = Path(__file__).resolve().parent.parent


def _argv(ckpt: Path, out: Path, steps: int) -> list[str]:
    return [
        "--model_name_or_path", str(ckpt), "--data_path", str(REPO / "examples/data/dpo.jsonl"),
        "--output_dir", str(out), "--max_steps", str(steps), "--per_device_train_batch_size", "2",
        "--save_strategy", "steps", "--save_steps", "1", "--logging_steps", "1", "--report_to", "none",
    ]  # fmt: skip


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
