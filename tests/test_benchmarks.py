"""The RL benchmark runs end to end on tiny models (``--tiny``, the CPU): every part measured, none failed. Its
figures are not checked here (speed is the benchmark's output on a GPU, never a test's assertion)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_bench_rl_tiny(tmp_path: Path) -> None:
    out = tmp_path / "bench_rl.json"
    command = [
        sys.executable, str(REPO / "benchmarks" / "bench_rl.py"), "--tiny", "--out", str(out),
        "--decode_batches", "2", "--decode_repeats", "1", "--completions", "4", "--num_generations", "2",
        "--warmup", "1", "--steps", "1", "--order", "trl,ours,ours_rows,ours_eager",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    parts = {entry["part"]: entry for entry in report["results"]}
    assert set(parts) == {"decode", "grpo", "ppo"}
    assert not [entry["error"] for entry in report["results"] if "error" in entry]
    decode = parts["decode"]["batches"]["2"]
    assert decode["dynamic"]["cache"] == "dynamic" and decode["auto"]["cache"] == "dynamic"  # auto: static on a GPU
    # ours_rows: ours with --shared_prompt False; ours_eager: ours with --compile_layers false
    for side in ("ours", "trl", "ours_rows", "ours_eager"):
        grpo = parts["grpo"][side]
        assert grpo["completions_per_s"] > 0 and grpo["tokens_per_step"] > 0
        assert math.isclose(grpo["generation_s"] + grpo["scoring_s"] + grpo["update_s"], grpo["step_s"])
        assert len(grpo["each_call_s"]["generation"]) >= 2  # every step's split, the warm-up's included
    assert parts["grpo"]["update_rows_over_shared"] > 0
    for side in ("ours", "ours_eager"):
        ppo = parts["ppo"][side]
        assert ppo["rollouts_per_s"] > 0 and min(ppo["generation_s"], ppo["scoring_s"], ppo["update_s"]) > 0
        assert len(ppo["each_call_s"]["update"]) >= 2
        assert ppo["compiled_layers"] is parts["grpo"][side]["compiled_layers"] is (side == "ours")
        assert parts["ppo"][f"ppo_step_over_grpo_step_{side}"] > 0
    assert parts["ppo"]["ours"]["compile_s"] > 0 and parts["grpo"]["ours"]["compile_s"] > 0
    assert "ours_rows" not in parts["ppo"]  # the same run as ours for PPO


def test_bench_models_have_their_own_config() -> None:
    """Each benchmarked model is built from its own copy of the config: transformers' Trainer sets ``use_cache=False``
    on its model's config, and a model built after it from the same object generated with no KV cache at all."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_train import build, lora_model

    bundle = build("qwen2_5_vl_3b", True)
    first = lora_model(bundle, "cpu").get_base_model()
    first.config.get_text_config().use_cache = False
    assert lora_model(bundle, "cpu").get_base_model().config.get_text_config().use_cache
