#!/usr/bin/env python
"""Where a rollout decode step's time goes, on the real-size Qwen2.5-VL-3B shape with merged LoRA, the static cache
and the compiled step, as rollouts decode. Modes (``--modes``, comma-separated, in that order):

- ``every_token``: transformers' decode loop as it runs on CUDA, its stop check read every token;
- ``deferred``: the check read a step late (``resonance.patches.deferred_stop``);
- ``packed``: deferred, and the single query token's heads packed onto the key/value heads instead of the keys and
  values repeated (``resonance.patches.packed_gqa``; transformers' attention function registered again after).

For each: milliseconds per decode step (a full call less a two-token call, over the tokens between), and under
torch's profiler the device kernels and their time per step (the profiler slows each kernel: a bound, not the
step), with the 12 costliest kernels. On the CPU (``--tiny``) nothing runs on a device: those figures are zero.

    python benchmarks/profile_decode.py --out decode.json   # GPU
    python benchmarks/profile_decode.py --tiny --out /tmp/decode.json
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_rl import copy_bandwidth, our_processor, profiler, sync  # noqa: E402
from bench_train import build, lora_model, make_rows  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402

MODES = {  # mode: the resonance.patches it installs
    "every_token": (),
    "deferred": ("deferred_stop",),
    "packed": ("deferred_stop", "packed_gqa"),
}
TOP_KERNELS = 12


def device_kernels(profiled: Any) -> dict[str, tuple[float, int]]:
    """Microseconds and calls of each kernel (device event) the profiler saw, by name. Not the host operators'
    device time: an operator that launches a kernel, or a CUDA graph's launch, carries that kernel's time too."""
    return {
        average.key: (average.self_device_time_total, average.count)
        for average in profiled.key_averages()
        if average.device_type != DeviceType.CPU and not average.is_user_annotation
    }


def per_step(full: dict[str, tuple[float, int]], short: dict[str, tuple[float, int]], steps: int) -> dict[str, Any]:
    """Kernel milliseconds and kernels per decode step (a full call's less a two-token call's, over ``steps``), in all
    and for the costliest kernels."""
    kernels = {}
    for name in full.keys() | short.keys():
        (full_us, full_count), (short_us, short_count) = full.get(name, (0, 0)), short.get(name, (0, 0))
        kernels[name] = ((full_us - short_us) / 1e3 / steps, (full_count - short_count) / steps)
    costliest = sorted(kernels.items(), key=lambda item: item[1][0], reverse=True)[:TOP_KERNELS]
    return {
        "profiled_kernel_ms_per_step": sum(ms for ms, _ in kernels.values()),
        "kernels_per_step": sum(count for _, count in kernels.values()),
        "top_kernels": [{"kernel": name[:80], "ms_per_step": ms, "per_step": count} for name, (ms, count) in costliest],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--new", type=int, default=128, help="New tokens per call.")
    parser.add_argument("--tiny", action="store_true", help="Tiny model on the CPU: a smoke test of the script.")
    parser.add_argument("--modes", default="deferred,packed", help=f"Comma-separated, of {', '.join(MODES)}.")
    args = parser.parse_args()
    modes = args.modes.split(",")
    if unknown := set(modes) - set(MODES):
        parser.error(f"--modes: unknown {', '.join(sorted(unknown))}; choose from {', '.join(MODES)}")
    from transformers import AttentionInterface
    from transformers.generation.utils import DeferredStopCheck
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from resonance.algorithms.ppo.rollout import PLAIN_SAMPLING
    from resonance.base.collator import VLPromptCollator
    from resonance.generation import adapters_merged, generate_from
    from resonance.patches import deferred_stop, packed_gqa

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

    patches = {"deferred_stop": deferred_stop, "packed_gqa": packed_gqa}
    transformers_stop_check = inspect.unwrap(DeferredStopCheck.is_supported)

    def transformers_functions() -> None:
        DeferredStopCheck.is_supported = staticmethod(transformers_stop_check)
        AttentionInterface.register("sdpa", sdpa_attention_forward)  # compiled steps recompile for a new registration

    def only(installed: tuple[str, ...]) -> contextlib.ExitStack:
        """transformers' functions with the patches named in ``installed``; the others' ``install`` does nothing until
        the stack closes (``generate_from`` installs them at each call)."""
        transformers_functions()
        stack = contextlib.ExitStack()
        for name, patch in patches.items():
            if name in installed:
                patch.install()
            else:
                stack.enter_context(mock.patch.object(patch, "install", lambda: None))
        return stack

    with adapters_merged(model, "auto"):
        for mode in modes:
            with only(MODES[mode]):
                begin = time.perf_counter()
                call(args.new)  # compiles on the first call (GPU)
                first = time.perf_counter() - begin
                call(2)
                full = statistics.median(call(args.new) for _ in range(3))
                short = statistics.median(call(2) for _ in range(3))
                entry = {"step_ms": 1e3 * (full - short) / (args.new - 2), "first_call_s": first}
                kernels = {}
                for tokens in (args.new, 2):
                    with profiler() as running:
                        call(tokens)
                    kernels[tokens] = device_kernels(running)
            entry.update(per_step(kernels[args.new], kernels[2], args.new - 2))
            report["modes"][mode] = entry
            print(mode, json.dumps(entry), flush=True)
    transformers_functions()
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
