#!/usr/bin/env python
"""Online RL, in one process: rollout decoding, GRPO (ours against TRL's own GRPOTrainer) and PPO (ours: no peer has
VLM PPO), on the same random-weight real-size model, prompts, LoRA and precision as bench_train.py builds them.

* ``decode``: one ``generate`` call per setting on a batch of prompts (LoRA model, as rollouts run it): transformers'
  dynamic cache (what TRL's trainer and ``resonance generate`` ran before) against ours (``cache_implementation``
  auto: the static cache and compiled decode step on a GPU), through PEFT's adapter layers and with the adapters
  merged (``--rollout_adapters``). Milliseconds per decode step (a full call less a two-token call, over the tokens
  between), tokens/s, and the memory-bandwidth floor of one decode step (the language model's weight bytes over a
  device-to-device copy's bandwidth measured in the same run).
* ``grpo``: steps of ours and of TRL's GRPOTrainer, each on a freshly built model from the same seed: completions/s,
  tokens/s (prompt + completion tokens per step, per GPU, as the published figures count them), the step split into
  generation / scoring (rewards, log-probs of the old policy and reference where run) / update, peak memory, and the
  MFU of the update (language model forward and backward through activations, over a bf16 matmul measured here).
* ``ppo``: steps of ours with the same split, rollouts as many and as long as GRPO's.

    python benchmarks/bench_rl.py --out results.json                  # GPU, real sizes
    python benchmarks/bench_rl.py --tiny --out /tmp/bench_rl.json     # CPU smoke test, tiny sizes
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import platform
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_train import (  # noqa: E402
    REAL_SHAPES,
    build,
    lm_linear_params,
    log,
    lora_model,
    make_rows,
    matmul_peak_tflops,
    step_flops,
)


def bench_reward(completions: list, **kwargs: Any) -> list[float]:
    """A reward that differs between completions (so advantages are not all zero): their length modulo 7."""
    return [float(len(str(completion)) % 7) for completion in completions]


def sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # not in a data loader's forked worker
        torch.cuda.synchronize()


class Split:
    """Seconds spent in named methods, per call, the device synchronised at both ends."""

    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = {}

    def wrap(self, owner: Any, method: str, name: str) -> None:
        inner = getattr(owner, method)

        @functools.wraps(inner)
        def timed(*args: Any, **kwargs: Any) -> Any:
            sync()
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                sync()
                self.seconds.setdefault(name, []).append(time.perf_counter() - start)

        setattr(owner, method, timed)

    def per_step(self, name: str, steps: int, skip: int, ran: int | None = None) -> float:
        """The mean over the timed steps (after ``skip``, up to ``steps``, of the ``ran`` that ran) of the seconds
        in ``name`` (calls spread evenly over the steps)."""
        calls = self.seconds.get(name, [])
        if not calls:
            return 0.0
        per = len(calls) // (ran or steps)
        return sum(calls[skip * per : steps * per]) / (steps - skip)


def our_processor(bundle: dict[str, Any]) -> Any:
    from resonance.base.processor import VLProcessor

    processor = VLProcessor.__new__(bundle["mapper"].processor)
    VLProcessor.__init__(processor, bundle["processor"])
    return processor


def copy_bandwidth() -> float | None:
    """Bytes per second of a device-to-device copy (read plus write), the median of ten."""
    if not torch.cuda.is_available():
        return None
    source = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    times = []
    for _ in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        target.copy_(source)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * source.numel() / statistics.median(times[3:])


def free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def step_figures(
    bundle: dict[str, Any],
    model: torch.nn.Module,
    times: tuple[float, float, float],
    tokens: float,
    completion_tokens: float,
    passes: int,
    peak: float | None,
    device: str,
) -> dict[str, Any]:
    """An RL step's figures from its seconds ``(step, generation, scoring)`` (the update is the rest) and tokens:
    throughput, the split, peak memory, and the MFU of the update, whose ``passes`` over the rollout each run the
    language model forward and backward through activations (vision and recompute not counted)."""
    step_s, generation, scoring = times
    update = step_s - generation - scoring
    n_lm = lm_linear_params(model, bundle["mapper"].model.language_model_path)
    text = bundle["config"].get_text_config(decoder=True)
    flops = passes * step_flops(n_lm, text.vocab_size * text.hidden_size, tokens, completion_tokens, "sft")
    return {
        "tokens_per_s": tokens / step_s,
        "step_s": step_s,
        "generation_s": generation,
        "scoring_s": scoring,
        "update_s": update,
        "tokens_per_step": tokens,
        "completion_tokens_per_step": completion_tokens,
        "update_mfu": flops / update / (peak * 1e12) if peak and update > 0 else None,
        "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
    }


# ---------------------------------------------------------------------------------------------- decode


def bench_decode(bundle: dict[str, Any], rows: list[dict[str, Any]], args: argparse.Namespace, device: str) -> dict:
    from resonance.algorithms.ppo.rollout import PLAIN_SAMPLING
    from resonance.base.collator import VLPromptCollator
    from resonance.generation import adapters_merged, decode_settings, generate_from

    free(device)
    model = lora_model(bundle, device)
    processor = our_processor(bundle)
    processor.infer()
    base = model.get_base_model()
    language = base.get_submodule(bundle["mapper"].model.language_model_path)
    weight_bytes = sum(p.numel() * p.element_size() for p in language.parameters())
    head = base.get_output_embeddings()
    if head is not None and all(head.weight is not p for p in language.parameters()):
        weight_bytes += head.weight.numel() * head.weight.element_size()
    bandwidth = copy_bandwidth()
    result: dict[str, Any] = {
        "weight_bytes": weight_bytes,
        "copy_bandwidth_gb_s": bandwidth / 1e9 if bandwidth else None,
        # the weights read once per step, at the copy's rate of bytes moved (read plus write)
        "floor_ms": 1e3 * weight_bytes / bandwidth if bandwidth else None,
        "batches": {},
    }
    new = args.completion
    for size in args.decode_batches:
        prompts = [rows[i % len(rows)] for i in range(size)]
        entry: dict[str, Any] = {}
        # (label, cache_implementation, --rollout_adapters)
        for mode, cache, adapters in (
            (mode, cache, adapters)
            for mode, cache, adapters in (
                ("dynamic", "dynamic", "separate"),
                ("auto", "auto", "separate"),
                ("merged", "auto", "auto"),
            )
            if mode in args.decode_modes
        ):
            kwargs = {
                **PLAIN_SAMPLING,
                "min_new_tokens": new,
                "suppress_tokens": processor.placeholder_token_ids(),
                "cache_implementation": cache,
                "pad_token_id": processor.tokenizer.pad_token_id,
            }

            def call(tokens: int, kwargs: dict[str, Any] = kwargs, prompts: list = prompts, adapters=adapters) -> float:
                batch = VLPromptCollator(processor)(prompts)
                sync()
                start = time.perf_counter()
                settings = {**kwargs, "max_new_tokens": tokens, "min_new_tokens": tokens}
                with adapters_merged(model, adapters):
                    generate_from(model, processor, batch, settings)
                sync()
                return time.perf_counter() - start

            begin = time.perf_counter()
            call(new)  # compiles on the first call (auto on a GPU)
            first_s = time.perf_counter() - begin
            call(2)
            full = statistics.median(call(new) for _ in range(args.decode_repeats))
            short = statistics.median(call(2) for _ in range(args.decode_repeats))
            step_ms = 1e3 * (full - short) / (new - 2)
            batch = VLPromptCollator(processor)(prompts)
            settings = decode_settings(model, batch["inputs"]["input_ids"].shape[1], kwargs)
            entry[mode] = {
                "cache": settings.get("cache_implementation", "dynamic"),
                "step_ms": step_ms,
                "decode_tokens_per_s": size / step_ms * 1e3,
                "call_s": full,
                "first_call_s": first_s,
                "prompt_tokens": int(batch["inputs"]["attention_mask"].sum()),
            }
            log(bundle["key"], "decode batch", size, mode, f"{step_ms:.2f} ms/step", f"first call {first_s:.1f} s")
        if "dynamic" in entry and "auto" in entry:
            entry["speedup"] = entry["dynamic"]["step_ms"] / entry["auto"]["step_ms"]
        if "auto" in entry and "merged" in entry:
            entry["merged_speedup"] = entry["auto"]["step_ms"] / entry["merged"]["step_ms"]
        for mode in ("auto", "merged"):
            if result["floor_ms"] and mode in entry:
                entry[f"{mode}_over_floor"] = entry[mode]["step_ms"] / result["floor_ms"]
        result["batches"][str(size)] = entry
    return result


# ---------------------------------------------------------------------------------------------- GRPO


# The sides of ours: each name's --shared_prompt (GRPO; ours_rows: a row per completion in the loss pass, to measure
# the shared prompt's own effect in the same run) and --compile_layers (ours_eager: the blocks not compiled, as before
# auto took in GRPO and PPO). PPO runs the sides that differ for it: ours and ours_eager.
OURS = {
    "ours": {"shared_prompt": True, "compiled": True},
    "ours_rows": {"shared_prompt": False, "compiled": True},
    "ours_eager": {"shared_prompt": True, "compiled": False},
}
PPO_SIDES = ("ours", "ours_eager")
PARTS = ("decode", "grpo", "ppo")  # --parts


def compiled_as_flag(trainer: Any, who: str) -> dict[str, Any]:
    """What ``resonance train --compile_layers`` does to the side ``who``'s trainer (its blocks compiled in place, the
    CPU's tiny runs included), and the side's figures of it (torch.compile's seconds are added at the end)."""
    from resonance.patches.compile_layers import compile_blocks, compile_seconds

    compiled = OURS.get(who, {}).get("compiled", False)  # TRL's side: never
    if compiled:
        compile_blocks(trainer.model)
    return {"compiled_layers": compiled, "compile_s": -compile_seconds()}


def grpo_trainer(bundle, who: str, rows_ours, rows_trl, args, device: str) -> Any:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from resonance.algorithms.grpo import VLGRPOConfig

    common = dict(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=args.completions,
        num_generations=args.num_generations,
        max_completion_length=args.completion,
        max_steps=args.warmup + args.steps + args.profile,
        learning_rate=1e-6,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=device == "cuda",
        use_cpu=device != "cuda",
        gradient_checkpointing=True,
        remove_unused_columns=False,
        seed=0,
        beta=args.beta,
        disable_tqdm=True,
        dataloader_num_workers=args.dataloader_num_workers,
    )
    model = lora_model(bundle, device)
    hf_processor = bundle["processor"]
    prompts = args.completions // args.num_generations * (args.warmup + args.steps + args.profile)
    if who in OURS:
        processor = our_processor(bundle)
        dataset = Dataset.from_list(
            [{k: rows_ours[i % len(rows_ours)][k] for k in ("prompt", "images", "source")} for i in range(prompts)]
        )
        padding = {"pad_to_multiple_of": 8} if OURS[who]["compiled"] else {}  # as --compile_layers pads
        config = VLGRPOConfig(**common, **padding, shared_prompt=OURS[who]["shared_prompt"])
        return bundle["mapper"].grpo_trainer(
            model=model,
            reward_funcs=[bench_reward],
            args=config,
            train_dataset=dataset,
            processing_class=hf_processor,
            vl_model=bundle["mapper"].model,
            vl_processor=processor,
        )
    dataset = Dataset.from_list(
        [{k: rows_trl[i % len(rows_trl)][k] for k in ("prompt", "images")} for i in range(prompts)]
    )
    return GRPOTrainer(
        model=model,
        reward_funcs=[bench_reward],
        args=GRPOConfig(**common),
        train_dataset=dataset,
        processing_class=hf_processor,
    )


def last_step_profiler(steps: int) -> Any:
    """A TrainerCallback that runs torch's profiler over the last of ``steps`` steps; ``table`` is then its operators
    by self device time (CPU time on the CPU), the 25 costliest (``--profile``: where the step's time goes)."""
    from transformers import TrainerCallback

    class _Profile(TrainerCallback):
        table = ""

        def on_step_begin(self, args, state, control, **kwargs):  # noqa: D102
            if state.global_step == steps - 1:
                self.profiler = profiler()
                self.profiler.__enter__()

        def on_step_end(self, args, state, control, **kwargs):  # noqa: D102
            if state.global_step == steps and hasattr(self, "profiler"):
                self.profiler.__exit__(None, None, None)
                self.table = profile_table(self.profiler)

    return _Profile()


def profile_table(profiler: Any) -> str:
    """The profiled operators by self device time (CPU time on the CPU), the 25 costliest."""
    sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    return profiler.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=70)


def profiler() -> Any:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(activities=activities)


def profile_last_call(owner: Any, method: str, calls: int) -> Any:
    """``owner.method`` wrapped so that its ``calls``-th call runs under torch's profiler; the returned object's
    ``table`` is then :func:`profile_table` of it (PPO's ``--profile``)."""
    inner = getattr(owner, method)
    record = types.SimpleNamespace(table="", calls=0)

    @functools.wraps(inner)
    def profiled(*args: Any, **kwargs: Any) -> Any:
        record.calls += 1
        if record.calls != calls:
            return inner(*args, **kwargs)
        with profiler() as running:
            result = inner(*args, **kwargs)
        record.table = profile_table(running)
        return result

    setattr(owner, method, profiled)
    return record


def bench_grpo(bundle, who: str, rows_ours, rows_trl, args, device: str, peak: float | None) -> dict[str, Any]:
    from bench_train import StepTimer

    from resonance.patches.compile_layers import compile_seconds

    free(device)
    built = time.perf_counter()
    trainer = grpo_trainer(bundle, who, rows_ours, rows_trl, args, device)
    compiling = compiled_as_flag(trainer, who)
    setup_s = time.perf_counter() - built
    split = Split()
    split.wrap(trainer, "_generate_single_turn", "generation")
    split.wrap(trainer, "_generate_and_score_completions", "generate_and_score")
    timer = StepTimer()
    trainer.add_callback(timer)
    steps, skip = args.warmup + args.steps, args.warmup
    ran = trainer.args.max_steps  # one more than steps with --profile: that step is profiled, not timed
    profile = last_step_profiler(ran) if args.profile else None
    if profile is not None:
        trainer.add_callback(profile)
    trainer.train()
    step_s = statistics.mean(timer.times[skip:steps])
    generation = split.per_step("generation", steps, skip, ran)
    scoring = split.per_step("generate_and_score", steps, skip, ran) - generation
    history = [entry for entry in trainer.state.log_history if "num_tokens" in entry][:steps]
    totals = [0.0] + [entry["num_tokens"] for entry in history]
    tokens = statistics.mean(b - a for a, b in zip(totals[skip:], totals[skip + 1 :], strict=False))
    completion_tokens = statistics.mean(e["completions/mean_length"] for e in history[skip:]) * args.completions
    times = (step_s, generation, scoring)
    result = {
        "completions_per_s": args.completions / step_s,
        **step_figures(bundle, trainer.model, times, tokens, completion_tokens, 1, peak, device),
        "each_step_s": timer.times,
        "each_call_s": split.seconds,  # per call, warm-up steps included: a slow step's generation or scoring
        "setup_s": setup_s,
        "cache": getattr(trainer.generation_config, "cache_implementation", None) or "dynamic",
        "rollout_adapters": getattr(trainer.args, "rollout_adapters", "separate"),  # TRL's: through PEFT's layers
        "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        **compiling,
    }
    result["compile_s"] += compile_seconds()
    log(
        bundle["key"],
        "grpo",
        who,
        {k: v for k, v in result.items() if k not in ("each_step_s", "each_call_s", "losses")},
    )
    if profile is not None:
        result["profile_last_step"] = profile.table
        print(profile.table, flush=True)
    del trainer
    return result


# ---------------------------------------------------------------------------------------------- PPO


SCORING_PARTS = (
    "generate_and_score",
    "_reference_log_probs",
    "_encoded_for_rollout",
    "_image_model_inputs",
    "data_collator",
)


def bench_ppo(
    bundle, who: str, rows_ours, args, device: str, peak: float | None, epochs: int, kl_coef: float
) -> dict[str, Any]:
    from datasets import Dataset

    from resonance.algorithms.ppo.config import VLPPOConfig
    from resonance.patches.compile_layers import compile_seconds
    from resonance.reward_funcs import ensure_checked

    free(device)
    mapper = bundle["mapper"]
    built = time.perf_counter()
    policy = lora_model(bundle, device)
    processor = our_processor(bundle)
    micro = args.completions // args.ppo_mini_batches
    config = VLPPOConfig(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=micro,
        num_mini_batches=args.ppo_mini_batches,
        num_ppo_epochs=epochs,
        kl_coef=kl_coef,
        response_length=args.completion,
        max_steps=args.warmup + args.steps + args.profile,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        bf16=device == "cuda",
        use_cpu=device != "cuda",
        gradient_checkpointing=True,
        seed=0,
        dataloader_num_workers=args.dataloader_num_workers,  # PPO: its steps collated ahead in these
        reward_funcs="bench_rl:bench_reward",  # named for the config's check; the trainer gets the function below
    )
    rows = Dataset.from_list([{k: r[k] for k in ("prompt", "images", "source")} for r in rows_ours])
    trainer = mapper.ppo_trainer(
        model=mapper.value_model(policy),
        args=config,
        train_dataset=rows,
        vl_model=mapper.model,
        vl_processor=processor,
        reward_funcs=ensure_checked([bench_reward], 60.0),
        data_collator=mapper.ppo_collator(processor),
        processing_class=bundle["processor"],
    )
    compiling = compiled_as_flag(trainer, who)
    setup_s = time.perf_counter() - built
    steps, skip = args.warmup + args.steps, args.warmup
    ran = config.max_steps  # one more than steps with --profile: that step is profiled, not timed
    profile = profile_last_call(trainer, "step", ran) if args.profile else None
    split = Split()
    split.wrap(trainer.engine, "generate", "generation")
    split.wrap(trainer, "update", "update")
    split.wrap(trainer, "step", "step")
    # inside scoring: each micro-batch's whole scoring, its reference pass, image encodings (the step's before
    # generation among them), collations in this process (none where --dataloader_num_workers collate ahead)
    for method in SCORING_PARTS:
        split.wrap(trainer, method, method)
    tokens: list[int] = []
    inner = trainer.generate_and_score

    def counted(rows: list[dict[str, Any]]) -> Any:
        rollout, counts = inner(rows)
        tokens.append(int(rollout.attention_mask.sum()))
        return rollout, counts

    trainer.generate_and_score = counted
    trainer.train()
    step_s = split.per_step("step", steps, skip, ran)
    generation = split.per_step("generation", steps, skip, ran)
    # the rest of the rollout: collating, the policy's, value's and reference's passes, rewards, advantages
    scoring = step_s - generation - split.per_step("update", steps, skip, ran)
    per_step = len(tokens) // steps
    step_tokens = sum(tokens[skip * per_step :]) / (steps - skip)
    lengths = [entry["response_length"] for entry in trainer.log_history[skip:]]
    completion_tokens = statistics.mean(lengths) * args.completions
    times = (step_s, generation, scoring)
    result = {
        "rollouts_per_s": args.completions / step_s,
        **step_figures(bundle, trainer.policy.model, times, step_tokens, completion_tokens, epochs, peak, device),
        "each_step_s": split.seconds["step"],
        "each_call_s": split.seconds,  # per call, warm-up steps included
        "scoring_parts_s": {name: split.per_step(name, steps, skip, ran) for name in SCORING_PARTS},
        "setup_s": setup_s,
        "ppo_epochs": epochs,
        "kl_coef": kl_coef,
        "mini_batches": args.ppo_mini_batches,
        **compiling,
    }
    result["compile_s"] += compile_seconds()
    shown = {k: v for k, v in result.items() if k not in ("each_step_s", "each_call_s")}
    log(bundle["key"], "ppo", who, f"{epochs} epochs, kl_coef {kl_coef}", shown)
    if profile is not None:
        result["profile_last_step"] = profile.table
        print(profile.table, flush=True)
    del trainer, policy
    return result


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON file to write (rewritten after each measurement).")
    parser.add_argument("--tiny", action="store_true", help="Tiny models on the CPU: a smoke test of the script.")
    parser.add_argument("--models", default="qwen2_5_vl_3b", help=f"Comma-separated, of {', '.join(REAL_SHAPES)}.")
    parser.add_argument("--parts", default="decode,grpo,ppo", help="Comma-separated: decode, grpo, ppo.")
    parser.add_argument(
        "--order",
        default="trl,ours",
        help="The sides to run, in order: trl, ours, ours_rows (ours with --shared_prompt False), ours_eager (ours "
        "with --compile_layers false). PPO runs ours and ours_eager of them (ours where neither is named).",
    )
    parser.add_argument("--completions", type=int, default=16, help="Completions (rollouts) per step.")
    parser.add_argument("--num_generations", type=int, default=4, help="GRPO: completions per prompt.")
    parser.add_argument("--completion", type=int, default=128, help="New tokens per completion.")
    parser.add_argument("--prompt_tokens", type=int, default=64, help="Text tokens per prompt (plus the image).")
    parser.add_argument("--beta", type=float, default=0.0, help="GRPO's KL weight (TRL's default: 0, no reference).")
    parser.add_argument(
        "--dataloader_num_workers",
        type=int,
        default=2,
        help="Every side's: PPO reads and collates its steps' rows ahead in these; GRPO's trainers read rows in them.",
    )
    parser.add_argument(
        "--ppo_runs",
        default="2:0.05",
        help="PPO's runs in one process, comma-separated EPOCHS:KL_COEF (num_ppo_epochs, kl_coef; kl_coef 0 runs no "
        "reference pass). The first is the side's own key (ours); the others ours_epochsE_klK.",
    )
    parser.add_argument("--ppo_mini_batches", type=int, default=2)
    parser.add_argument("--decode_batches", default="8,32", help="Decode: batch sizes.")
    parser.add_argument("--decode_repeats", type=int, default=3)
    parser.add_argument("--decode_modes", default="dynamic,auto,merged", help="Decode: of dynamic, auto, merged.")
    parser.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="Steps not timed: the first compiles, and GRPO's second was slow in every H200 run (NOTES section 14).",
    )
    parser.add_argument("--steps", type=int, default=2, help="Steps timed.")
    parser.add_argument(
        "--profile", action="store_true", help="GRPO and PPO: torch's profiler over one more step, not timed."
    )
    args = parser.parse_args()
    for flag, value, known in (("--parts", args.parts, PARTS), ("--order", args.order, ("trl", *OURS))):
        if unknown := set(value.split(",")) - set(known):
            parser.error(f"{flag}: unknown {', '.join(sorted(unknown))}; choose from {', '.join(known)}")
    try:
        args.ppo_runs = [(int(e), float(k)) for e, k in (run.split(":") for run in args.ppo_runs.split(","))]
    except ValueError:
        parser.error(f"--ppo_runs {args.ppo_runs}: expected EPOCHS:KL_COEF[,EPOCHS:KL_COEF...], e.g. 2:0.05,1:0")
    args.decode_batches = [int(size) for size in args.decode_batches.split(",")]
    args.decode_modes = args.decode_modes.split(",")
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    if args.tiny:
        args.completion = min(args.completion, 8)
        args.prompt_tokens = min(args.prompt_tokens, 8)
    import transformers
    import trl

    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "results": [],
    }
    peak = matmul_peak_tflops()
    report["bf16_matmul_tflops"] = peak

    def save() -> None:
        Path(args.out).write_text(json.dumps(report, indent=2))

    parts = args.parts.split(",")
    for key in args.models.split(","):
        bundle = build(key, args.tiny)
        folder = Path(tempfile.mkdtemp())
        rows_ours, rows_trl = make_rows(bundle, 32, args.prompt_tokens, 4, folder)
        for part in parts:
            entry: dict[str, Any] = {"model": key, "part": part}
            report["results"].append(entry)
            try:
                if part == "decode":
                    entry.update(bench_decode(bundle, rows_ours, args, device))
                elif part == "grpo":
                    for who in args.order.split(","):
                        entry[who] = bench_grpo(bundle, who, rows_ours, rows_trl, args, device, peak)
                        save()
                    if "ours" in entry and "trl" in entry:
                        entry["ratio_completions_per_s"] = (
                            entry["ours"]["completions_per_s"] / entry["trl"]["completions_per_s"]
                        )
                    if "ours" in entry and "ours_rows" in entry:  # the shared prompt's own effect
                        entry["update_rows_over_shared"] = entry["ours_rows"]["update_s"] / entry["ours"]["update_s"]
                elif part == "ppo":
                    grpo = next((e for e in report["results"] if e["model"] == key and e["part"] == "grpo"), None)
                    for who in [who for who in args.order.split(",") if who in PPO_SIDES] or ["ours"]:
                        for run, (epochs, kl_coef) in enumerate(args.ppo_runs):
                            name = who if run == 0 else f"{who}_epochs{epochs}_kl{kl_coef:g}"
                            entry[name] = bench_ppo(bundle, who, rows_ours, args, device, peak, epochs, kl_coef)
                            if grpo and who in grpo:  # against our GRPO step with the same --compile_layers
                                ratio = entry[name]["step_s"] / grpo[who]["step_s"]
                                entry[f"ppo_step_over_grpo_step_{name}"] = ratio
                            save()
            except Exception as exc:  # noqa: BLE001 - a benchmark reports failures and goes on
                entry["error"] = f"{type(exc).__name__}: {exc}"[:2000]
                log(key, part, "failed:", entry["error"])
            save()
    log("wrote", args.out)


if __name__ == "__main__":
    main()
