#!/usr/bin/env python
"""One GPU, the shipped accelerate configs: a few bf16 steps of SFT, DPO, PPO and GRPO through ``accelerate launch``
(one process) on a real-size random-weight Qwen2.5-VL-3B, each output reloaded in a fresh process; per strategy and
algorithm: exit status, time per step, peak GPU memory, and whether the output loads.

What it shows: that each shipped strategy runs Resonance's real code path with the real libraries (DDP, DeepSpeed
ZeRO-2 and ZeRO-3, FSDP2), saves an output that loads on one device, and what each costs on one GPU. One process
cannot show scaling or cross-GPU parity; a machine with several GPUs is needed for that.

    python benchmarks/bench_scale.py --out scale.json                       # GPU, real size, all strategies
    python benchmarks/bench_scale.py --tiny --configs cpu_2proc --processes 2 --out /tmp/scale.json  # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_train import build, log, make_rows  # noqa: E402  (the same model shapes and synthetic rows)

REPO = HERE.parent
CONFIGS = ("ddp", "zero2", "zero3", "fsdp")
ALGORITHMS = ("sft", "dpo", "ppo", "grpo")
PEAK = re.compile(r"peak GPU memory: ([0-9.]+) GiB")
ERROR = re.compile(r"^error: |^[A-Za-z_.]*(Error|Exception): ")
RUNTIME = re.compile(r"'train_runtime': '?([0-9.]+)|train_runtime=([0-9.]+)")  # the Trainer's, PPO's


def save_checkpoint(bundle: dict[str, Any], folder: Path, device: str) -> Path:
    """The random-weight model (bf16 on a GPU) and its processor, saved as a checkpoint folder."""
    import transformers

    model_class = getattr(transformers, bundle["mapper"].model.hf_model_class)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = model_class._from_config(bundle["config"], dtype=dtype)
    model.save_pretrained(folder)
    bundle["processor"].save_pretrained(folder)
    del model
    return folder


def write_data(bundle: dict[str, Any], folder: Path, rows: int, tokens: int) -> dict[str, Path]:
    """SFT, preference and prompt files (JSONL) of synthetic rows with real-size images."""
    ours, _ = make_rows(bundle, rows, tokens, tokens, folder)
    files = {"sft": folder / "sft.jsonl", "dpo": folder / "dpo.jsonl", "ppo": folder / "prompts.jsonl"}
    keys = {
        "sft": ("messages", "images"),
        "dpo": ("prompt", "chosen", "rejected", "images"),
        "ppo": ("prompt", "images"),
    }
    for algorithm, path in files.items():
        path.write_text("".join(json.dumps({k: row[k] for k in keys[algorithm]}) + "\n" for row in ours))
    return {**files, "grpo": files["ppo"]}  # GRPO takes PPO's prompt rows


def train_command(config: str, processes: int, algorithm: str, ckpt: Path, data: Path, out: Path, args) -> list[str]:
    flags = {
        "model_name_or_path": ckpt,
        "data_path": data,
        "output_dir": out,
        "max_steps": args.steps,
        "per_device_train_batch_size": args.batch,
        "learning_rate": "1e-5",
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "gradient_checkpointing": "true",
    }
    if not args.tiny:
        flags["bf16"] = "true"
    if algorithm == "ppo":
        flags.update(reward_funcs="rewards:brevity", response_length=args.response_length, num_mini_batches=1)
    if algorithm == "grpo":  # the batch is completions: batch / 2 prompts of 2 completions each
        flags.update(reward_funcs="rewards:brevity", max_completion_length=args.response_length, num_generations=2)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "configs" / "accelerate"
              / f"{config}.yaml"), "--num_processes", str(processes), "--main_process_port", "0"]  # fmt: skip
    return [*launch, "-m", "resonance", "train", algorithm, *(f"--{k}={v}" for k, v in flags.items())]


def reloads(out: Path) -> str:
    """``ok`` when the output loads in a fresh process through Resonance's loader, else the error's last line."""
    code = "import sys; from resonance.generation import load_for_generation; load_for_generation(sys.argv[1])"
    done = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=600)
    return "ok" if done.returncode == 0 else (done.stderr.strip().splitlines() or ["failed"])[-1]


def run_one(config: str, processes: int, algorithm: str, ckpt: Path, data: Path, work: Path, args) -> dict[str, Any]:
    out = work / f"{config}-{algorithm}"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "examples" / "configs"), os.environ.get("PYTHONPATH", "")]),
    }
    start = time.perf_counter()
    done = subprocess.run(train_command(config, processes, algorithm, ckpt, data, out, args), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=args.timeout)  # fmt: skip
    wall = time.perf_counter() - start
    output = done.stdout + done.stderr
    result: dict[str, Any] = {
        "config": config,
        "algorithm": algorithm,
        "exit": done.returncode,
        "wall_s": round(wall, 1),
    }
    if done.returncode != 0:
        # the workers' own error lines (resonance's "error: ...", an exception's last line), not torchrun's summary
        lines = [line.strip() for line in output.splitlines() if line.strip()]
        result["error"] = [line for line in lines if ERROR.search(line)][:12] or lines[-12:]
        return result
    runtime = [a or b for a, b in RUNTIME.findall(output)]
    if runtime:  # the trainer's own time for its training loop
        result["s_per_step"] = round(float(runtime[-1]) / args.steps, 3)
    peaks = [float(p) for p in PEAK.findall(output)]
    if peaks:
        result["peak_gib"] = max(peaks)
    result["reload"] = reloads(out)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS))
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--tiny", action="store_true", help="tiny sizes, for a CPU smoke test")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64, help="prompt and answer words per row")
    parser.add_argument("--response_length", type=int, default=32)
    parser.add_argument("--timeout", type=int, default=400)
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    results: list[dict[str, Any]] = []
    environment = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bundle = build("qwen2_5_vl_3b", args.tiny)
        ckpt = save_checkpoint(bundle, work / "ckpt", device)
        files = write_data(bundle, work, args.rows, args.tokens)
        log("checkpoint and data written")
        for config in args.configs.split(","):
            for algorithm in args.algorithms.split(","):
                result = run_one(config, args.processes, algorithm, ckpt, files[algorithm], work, args)
                log(json.dumps(result))
                results.append(result)
                args.out.write_text(json.dumps({"environment": environment, "results": results}, indent=2) + "\n")
    print(f"{'config':<10}{'algorithm':<10}{'exit':>5}{'s/step':>9}{'peak GiB':>10}  reload")
    for r in results:
        print(f"{r['config']:<10}{r['algorithm']:<10}{r['exit']:>5}{r.get('s_per_step', '-'):>9}"
              f"{r.get('peak_gib', '-'):>10}  {r.get('reload', '-')}")  # fmt: skip


if __name__ == "__main__":
    main()
