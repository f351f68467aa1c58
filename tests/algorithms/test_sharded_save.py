"""Outputs saved under ZeRO-3 hold the whole weights, not the shards: PPO gathers its policy before saving.

ZeRO-3 keeps a weight whole on every process only below ``stage3_param_persistence_threshold`` (1e5 numbers by
default): the tiny models' LoRA matrices are below it, a real model's are not. This run sets the threshold to 0, so
every weight is a partition, as a 3B model's are (on one H200, `benchmarks/bench_scale.py` saw a ZeRO-3 PPO output
whose LoRA tensors had shape [0]: the live placeholders, which no loader can take).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from helpers import EXAMPLES, REPO, train_argv
from safetensors.torch import load_file
from test_multiprocess import _run


def test_ppo_under_zero3_saves_whole_lora_weights_that_load(tiny_checkpoint, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(REPO / "examples" / "configs"), os.environ.get("PYTHONPATH", "")])
    )
    deepspeed = {
        "zero_optimization": {
            "stage": 3,
            "stage3_param_persistence_threshold": 0,
            "stage3_gather_16bit_weights_on_model_save": True,
        },
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
    }
    (tmp_path / "ds.json").write_text(json.dumps(deepspeed))
    (tmp_path / "accelerate.yaml").write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\n"
        f"deepspeed_config:\n  deepspeed_config_file: {tmp_path / 'ds.json'}\n  zero3_init_flag: true\n"
        "num_machines: 1\nnum_processes: 2\nuse_cpu: false\n"
    )
    out = tmp_path / "out"
    argv = train_argv(
        "ppo", tiny_checkpoint("llava"), EXAMPLES / "dpo.jsonl", out,
        reward_funcs="rewards:brevity", skip_invalid_rows=True, max_steps=1, num_mini_batches=1, save_strategy="no",
    )  # fmt: skip
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "accelerate.yaml")]
    output = _run([*command, "--main_process_port", "0", "-m", "resonance", "train", "ppo", *argv])
    assert "2 process(es), DistributedType.DEEPSPEED" in output, output[-4000:]

    from resonance.generation import load_for_generation

    saved = load_file(out / "adapter_model.safetensors")
    assert saved and all(tensor.numel() > 0 for tensor in saved.values()), "a LoRA tensor was saved as its shard"
    _, model, _ = load_for_generation(out, device="cpu")
    loaded = dict(model.named_parameters())
    for name, tensor in saved.items():
        assert loaded[name.replace(".weight", ".default.weight")].shape == tensor.shape, name
