"""Two CPU processes under FSDP 2 (gloo) train exactly like one process with the same global batch: SFT, DPO, RM;
their output, gathered to a full state dict on rank 0, loads in one process.

As ``test_multiprocess`` (whose runner and batch sizes this reuses): the tiny LLaVA, 4 steps of 4 rows from the
example data (16 rows), two processes with 2 rows each against one process with 4. The two processes are
launched with the shipped ``configs/accelerate/fsdp_cpu_2proc.yaml``: accelerate makes CPU processes MULTI_CPU
and drops the FSDP plugin there, which ``resonance train`` restores (``resonance.patches.fsdp_cpu``), so they
shard every wrapped layer's weights over gloo with torch's ``fully_shard``; the test checks the log says FSDP.

The layers to wrap are named on the command line (``--fsdp_transformer_layer_cls_to_wrap``): the config's
TRANSFORMER_BASED_WRAP takes the model's ``_no_split_modules``, which for LLaVA (as for every CLIP-tower
family) names ``CLIPTextEmbeddings``, a class the vision tower does not hold, and accelerate refuses it.

Tolerances: ``test_multiprocess``'s, for the same reason (the same sums in another order: gloo's reduce-scatter of
the half-batch gradients instead of its all-reduce): losses 1e-5 relative, grad norms 1e-4, each LoRA tensor 1e-4
of its norm (measured: 6e-8 for SFT and 3e-8 for DPO). RM's reward head has a bias that the pairwise loss
``-log sigmoid(r_chosen - r_rejected)`` cancels: its gradient is rounding alone, which AdamW divides by its own
size into steps of up to the learning rate (one run's bias ends at 1.5e-3, the other's at 0). That bias is left
out of the comparison, and RM's weights, whose rewards it shifts by rounding, get 1e-3 of their norm (measured:
1.1e-4). A real difference is far above both: a process training alone on 2 rows a step moves some tensor by 0.5
to 0.9 of its norm after 4 steps.

PPO is compared with two processes under data parallel (``test_multiprocess``'s ``cpu_2proc.yaml``), not with one
process: each process samples its own responses from its own prompts, which one process cannot reproduce, while
two processes draw the same prompts and random streams under either strategy. Rollouts run ``generate`` outside
the policy's forward, where FSDP has not gathered the weights the root holds: the trainer makes it one of the
root's forward methods, and passes ``synced_gpus``. Same tolerances (the same sums in another order).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from helpers import EXAMPLES, REPO, train_argv
from helpers.repo import TESTS
from safetensors.torch import load_file
from test_multiprocess import CONFIG as DATA_PARALLEL
from test_multiprocess import GLOBAL_BATCH, ROWS, STEPS, _run, assert_same_steps

CONFIG = REPO / "configs" / "accelerate" / "fsdp_cpu_2proc.yaml"
LAYERS = "LlamaDecoderLayer,CLIPEncoderLayer"  # the tiny LLaVA's decoder and vision tower layers
DATA = {"sft": "sft.jsonl", "dpo": "dpo.jsonl", "rm": "dpo.jsonl"}  # RM trains on the preference pairs
WEIGHT_TOLERANCE = {"sft": 1e-4, "dpo": 1e-4, "rm": 1e-3}
CANCELLED = {"reward_head.safetensors": {"bias"}}  # gradients of rounding alone (see above)


# PPO logs its metrics rounded to 6 decimals (resonance/algorithms/ppo/trainer.py).
LOGGED_UNIT = 1e-6


def assert_logged_alike(got: dict[str, float], expected: dict[str, float]) -> None:
    """One step's logged values (rewards, losses, KL, ratios) of two runs that sum the same numbers in another order:
    within 1e-5 of each value (float32 reduction order, ~1e-7) plus one unit of the logged rounding, since values a
    hair apart can round to neighbouring 6th decimals (measured: policy_loss -0.028928 against -0.028929)."""
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        # (1 + 1e-9): 0.028929 - 0.028928 is a hair above 1e-6 in binary floating point
        tolerance = 1e-5 * abs(value) + LOGGED_UNIT * (1 + 1e-9)
        assert abs(got[key] - value) <= tolerance, f"step {expected['step']}: {key}: {got[key]} against {value}"


def _launch(algorithm: str, argv: list[str], processes: int, config: Path = CONFIG) -> str:
    """``resonance train`` in one process, or in ``processes`` through ``accelerate launch`` with ``config``."""
    launch = [
        "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", str(processes),
        "--main_process_port", "0",  # 0: a free port
        *(["--fsdp_transformer_layer_cls_to_wrap", LAYERS] if config == CONFIG else []),
    ]  # fmt: skip
    return _run([sys.executable, *(launch if processes > 1 else []), "-m", "resonance", "train", algorithm, *argv])


def _train(algorithm: str, ckpt: Path, out: Path, processes: int) -> tuple[list[dict], str]:
    argv = train_argv(
        algorithm, ckpt, EXAMPLES / DATA[algorithm], out,
        max_steps=STEPS, per_device_train_batch_size=GLOBAL_BATCH // processes, learning_rate="1e-3",
        lora_dropout=0, save_strategy="steps", save_steps=STEPS,
    )  # fmt: skip
    output = _launch(algorithm, argv, processes)
    state = json.loads((out / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    return [entry for entry in state["log_history"] if "loss" in entry], output


def _weights(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every safetensors file of an output folder (the adapter; RM: the reward head too), by file name."""
    return {path.name: load_file(path) for path in sorted(out.glob("*.safetensors"))}


def _assert_weights_match(two: Path, one: Path, tolerance: float) -> None:
    """Every tensor of ``two``'s saved files within ``tolerance`` of its norm of ``one``'s (but :data:`CANCELLED`),
    and training moved the LoRA weights (else the comparison proves nothing)."""
    two_files, one_files = _weights(two), _weights(one)
    assert two_files.keys() == one_files.keys() and "adapter_model.safetensors" in one_files
    moved = 0.0
    for file, one_weights in one_files.items():
        assert two_files[file].keys() == one_weights.keys() and one_weights
        for name, weight in one_weights.items():
            if name in CANCELLED.get(file, ()):
                continue
            error = ((two_files[file][name] - weight).norm() / weight.norm()).item()
            assert error < tolerance, f"{file} {name}: the runs differ by {error:.2e} of its norm"
            if ".lora_B." in name:  # zero at the start: all of it is what training did
                moved = max(moved, weight.abs().max().item())
    assert moved > 1e-4, "training did not move the LoRA weights: the comparison would prove nothing"


def _assert_loads(out: Path) -> None:
    """The output loads in one process (:func:`load_for_generation`), its most trained LoRA tensor in place."""
    from resonance.generation import load_for_generation

    _, model, _ = load_for_generation(out, device="cpu")
    saved = load_file(out / "adapter_model.safetensors")
    name = max((n for n in saved if ".lora_B." in n), key=lambda n: saved[n].abs().max().item())
    loaded = dict(model.named_parameters())[name.replace(".weight", ".default.weight")]
    torch.testing.assert_close(loaded.detach(), saved[name], rtol=0, atol=0)


@pytest.mark.parametrize("algorithm", ["sft", "dpo", "rm"])
def test_fsdp_on_two_cpu_processes_matches_one(algorithm: str, tiny_checkpoint, tmp_path: Path) -> None:
    ckpt = tiny_checkpoint("llava")
    two_logs, two_output = _train(algorithm, ckpt, tmp_path / "two", processes=2)
    one_logs, _ = _train(algorithm, ckpt, tmp_path / "one", processes=1)

    # Two processes really trained sharded and together: FSDP (its checkpoints are the Trainer's FSDP ones), and 4
    # of the 16 rows a step.
    assert_same_steps(two_logs, two_output, one_logs, GLOBAL_BATCH, ROWS, "FSDP")
    assert (tmp_path / "two" / f"checkpoint-{STEPS}" / "pytorch_model_fsdp.bin").is_file()

    # The output, saved from the full state dict gathered on rank 0, holds the trained weights and loads.
    _assert_weights_match(tmp_path / "two", tmp_path / "one", WEIGHT_TOLERANCE[algorithm])
    _assert_loads(tmp_path / "two")


def test_ppo_under_fsdp_matches_data_parallel(tiny_checkpoint, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))  # the reward
    ckpt, runs = tiny_checkpoint("llava"), {}
    for name, config in (("fsdp", CONFIG), ("ddp", DATA_PARALLEL)):
        argv = train_argv(
            "ppo", ckpt, EXAMPLES / "dpo.jsonl", tmp_path / name, reward_funcs="helpers.rewards:token_sum_reward",
            max_steps=2, learning_rate="1e-3", lora_dropout=0,
        )  # fmt: skip
        output = _launch("ppo", argv, processes=2, config=config)
        logs = json.loads((tmp_path / name / "trainer_state.json").read_text())["log_history"]
        runs[name] = output, logs
    assert "2 process(es), DistributedType.FSDP" in runs["fsdp"][0], runs["fsdp"][0][-4000:]
    assert "2 process(es), DistributedType.MULTI_CPU" in runs["ddp"][0], runs["ddp"][0][-4000:]
    fsdp_logs, ddp_logs = runs["fsdp"][1], runs["ddp"][1]
    assert [entry["step"] for entry in fsdp_logs] == [entry["step"] for entry in ddp_logs] == [1, 2]
    for fsdp, ddp in zip(fsdp_logs, ddp_logs, strict=True):
        assert_logged_alike(fsdp, ddp)
    _assert_weights_match(tmp_path / "fsdp", tmp_path / "ddp", 1e-4)
    _assert_loads(tmp_path / "fsdp")
