#!/usr/bin/env python
"""Where a rollout decode step's time goes: transformers' decode loop with its stop check read every token (as
transformers runs it on CUDA) against the check read a step late (``resonance.patches.deferred_stop``), on the
real-size Qwen2.5-VL-3B shape with merged LoRA, the static cache and the compiled step, as rollouts decode.

For each: milliseconds per decode step (a full call less a two-token call, over the tokens between), and under
torch's profiler the kernels and kernel time per step (the profiler slows each kernel: a bound, not the step).

    python benchmarks/profile_decode.py --out decode.json   # GPU
    python benchmarks/profile_decode.py --tiny --out /tmp/decode.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_rl import copy_bandwidth, our_processor, profiler, sync  # noqa: E402
from bench_train import build, lora_model, make_rows  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--new", type=int, default=128, help="New tokens per call.")
    parser.add_argument("--tiny", action="store_true", help="Tiny model on the CPU: a smoke test of the script.")
    args = parser.parse_args()
    from transformers.generation.utils import DeferredStopCheck

    from resonance.algorithms.ppo.rollout import PLAIN_SAMPLING
    from resonance.base.collator import VLPromptCollator
    from resonance.generation import adapters_merged, generate_from
    from resonance.patches import deferred_stop

    device = "cpu" if args.tiny else "cuda"
    bundle = build("qwen2_5_vl_3b", args.tiny)
    rows, _ = make_rows(bundle, 32, 64, 4, Path(tempfile.mkdtemp()))
    model = lora_model(bundle, device)
    processor = our_processor(bundle)
    processor.infer()
    prompts = [rows[i % len(rows)] for i in range(args.batch)]
    kwargs = {
        **PLAIN_SAMPLING,
        "suppress_tokens": processor.placeholder_token_ids(),
        "pad_token_id": processor.tokenizer.pad_token_id,
    }
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
        "settings": vars(args),
        "copy_bandwidth_gb_s": (copy_bandwidth() or 0) / 1e9,
        "modes": {},
    }

    def call(tokens: int) -> float:
        batch = VLPromptCollator(processor)(prompts)
        sync()
        start = time.perf_counter()
        generate_from(model, processor, batch, {**kwargs, "max_new_tokens": tokens, "min_new_tokens": tokens})
        sync()
        return time.perf_counter() - start

    deferred_stop.install()
    ours = DeferredStopCheck.is_supported
    with adapters_merged(model, "auto"):
        for mode, decide in (("every_token", ours.__wrapped__), ("deferred", ours)):
            DeferredStopCheck.is_supported = staticmethod(decide)
            begin = time.perf_counter()
            call(args.new)  # compiles on the first call (GPU)
            first = time.perf_counter() - begin
            call(2)
            full = statistics.median(call(args.new) for _ in range(3))
            short = statistics.median(call(2) for _ in range(3))
            entry = {"step_ms": 1e3 * (full - short) / (args.new - 2), "first_call_s": first}
            counted = {}
            for tokens in (args.new, 2):
                with profiler() as running:
                    call(tokens)
                averages = running.key_averages()
                counted[tokens] = (
                    sum(a.self_device_time_total for a in averages) / 1e3,
                    sum(a.count for a in averages if a.self_device_time_total > 0),
                )
            steps = args.new - 2
            entry["profiled_kernel_ms_per_step"] = (counted[args.new][0] - counted[2][0]) / steps
            entry["kernels_per_step"] = (counted[args.new][1] - counted[2][1]) / steps
            report["modes"][mode] = entry
            print(mode, json.dumps(entry), flush=True)
    DeferredStopCheck.is_supported = ours
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
