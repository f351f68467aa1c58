#!/usr/bin/env python
"""Resonance vs TRL, same model, data, batch, LoRA and precision, in one process: DPO, SFT and RM throughput.

Models are random-weight and real-size, built from configs (no download): a Qwen2.5-VL-3B shape and a
LLaVA-1.5-7B shape (the shapes of ../shared/bench/trl_baseline.py). Images are synthetic (448x448 for
Qwen, 336x336 for LLaVA); prompts ~64 tokens, answers ~128 tokens. For each (model, algorithm) the
model is built twice from the same seed: once trained by our trainer (adapter from specs/), once by
TRL's own DPOTrainer / SFTTrainer with its own collator. Prints and writes as JSON: pairs/s, tokens/s,
peak GPU memory, MFU against a bf16 matmul measured in the same run, the first-step loss, and the
ratios ours/TRL. The reward model (``rm``) runs ours only: TRL 1.16's RewardTrainer takes no images, so its
entry records that instead of TRL figures. PPO has no peer at all (TRL 1.x removed it) and no script here.

    python benchmarks/bench_train.py --out results.json                  # GPU, real sizes
    python benchmarks/bench_train.py --tiny --out /tmp/bench.json        # CPU smoke test, tiny sizes
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import random
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

# Real-size shapes (text and vision towers) of the two models the issue names, as in trl_baseline.py.
REAL_SHAPES: dict[str, dict[str, Any]] = {
    "qwen2_5_vl_3b": {
        "spec": "qwen2_5_vl",
        "image_size": 448,  # 32x32 patches of 14 px -> 256 tokens after the 2x2 merge
        "config": {
            "text_config": {
                "hidden_size": 2048,
                "num_hidden_layers": 36,
                "num_attention_heads": 16,
                "num_key_value_heads": 2,
                "intermediate_size": 11008,
                "max_position_embeddings": 128000,
                "rms_norm_eps": 1e-6,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
            },
            "vision_config": {
                "depth": 32,
                "hidden_size": 1280,
                "intermediate_size": 3420,
                "num_heads": 16,
                "out_hidden_size": 2048,
                "patch_size": 14,
                "spatial_merge_size": 2,
                "temporal_patch_size": 2,
                "window_size": 112,
                "fullatt_block_indexes": [7, 15, 23, 31],
                "hidden_act": "silu",
            },
            "tie_word_embeddings": True,
        },
        "vocab_size": 151936,
        "image_processor": {
            "min_pixels": 3136,
            "max_pixels": 1003520,
            "patch_size": 14,
            "temporal_patch_size": 2,
            "merge_size": 2,
        },
    },
    "llava_1_5_7b": {
        "spec": "llava",
        "image_size": 336,  # 24x24 patches -> 576 tokens
        "config": {
            "vision_config": {
                "model_type": "clip_vision_model",
                "hidden_size": 1024,
                "intermediate_size": 4096,
                "num_hidden_layers": 24,
                "num_attention_heads": 16,
                "image_size": 336,
                "patch_size": 14,
                "projection_dim": 768,
                "hidden_act": "quick_gelu",
            },
            "text_config": {
                "model_type": "llama",
                "hidden_size": 4096,
                "num_hidden_layers": 32,
                "num_attention_heads": 32,
                "num_key_value_heads": 32,
                "intermediate_size": 11008,
                "max_position_embeddings": 4096,
                "rms_norm_eps": 1e-5,
            },
            "image_seq_length": 576,
            "tie_word_embeddings": False,
        },
        "vocab_size": 32064,
        "image_processor": {
            "size": {"shortest_edge": 336},
            "crop_size": {"height": 336, "width": 336},
            "do_center_crop": True,
        },
    },
}


def log(*parts: Any) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *parts, flush=True)


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def build(model_key: str, tiny: bool) -> dict[str, Any]:
    """The processor, config and adapter for one model, real-size unless ``tiny``."""
    from resonance.base.registry import load_core_mapper  # noqa: F401  (registry import check
    from resonance.codegen.project import load_specs
    from resonance.tiny import build_processor_and_config, tiny_from_spec

    shape = REAL_SHAPES[model_key]
    ((_, spec),) = load_specs([REPO / "specs" / f"{shape['spec']}.yaml"], REPO)
    description = tiny_from_spec(spec)
    image_size = 56 if tiny else shape["image_size"]
    if not tiny:
        description = description.model_copy(
            update={
                "config": merge(description.config, shape["config"]),
                "image_processor": dict(shape["image_processor"]),
            }
        )
    processor, config = build_processor_and_config(description)
    if not tiny:
        config.get_text_config(decoder=True).vocab_size = shape["vocab_size"]
    import importlib

    mapper = importlib.import_module(f"resonance.generated.{spec.name}").core_mapper
    return {
        "key": model_key,
        "spec": spec,
        "processor": processor,
        "config": config,
        "mapper": mapper,
        "image_size": image_size,
    }


def make_rows(bundle: dict[str, Any], rows: int, prompt_tokens: int, answer_tokens: int, folder: Path):
    """Synthetic preference rows: ours (canonical, image paths) and TRL's (conversational, PIL images)."""
    rng = random.Random(0)
    tokenizer = bundle["processor"].tokenizer
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in special]
    words = [w for w in (tokenizer.decode([i]).strip() for i in vocab) if w.isalpha()]

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    ours, trl_rows = [], []
    size = bundle["image_size"]
    for i in range(rows):
        pixels = torch.randint(0, 256, (size, size, 3), generator=torch.Generator().manual_seed(i), dtype=torch.uint8)
        image = Image.fromarray(pixels.numpy(), "RGB")
        path = folder / f"img{i}.png"
        image.save(path)
        prompt, chosen, rejected = text(prompt_tokens), text(answer_tokens), text(answer_tokens)
        image_part, text_part = {"type": "image", "text": None}, {"type": "text", "text": prompt}
        ours.append(
            {
                "prompt": [{"role": "user", "content": [image_part, text_part]}],
                "chosen": [{"role": "assistant", "content": [{"type": "text", "text": chosen}]}],
                "rejected": [{"role": "assistant", "content": [{"type": "text", "text": rejected}]}],
                "messages": [
                    {"role": "user", "content": [image_part, text_part]},
                    {"role": "assistant", "content": [{"type": "text", "text": chosen}]},
                ],
                "images": [str(path)],
                "source": f"synthetic:{i + 1}",
            }
        )
        trl_rows.append(
            {
                "images": [image],
                "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}],
                "chosen": [{"role": "assistant", "content": [{"type": "text", "text": chosen}]}],
                "rejected": [{"role": "assistant", "content": [{"type": "text", "text": rejected}]}],
                "messages": [
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]},
                    {"role": "assistant", "content": [{"type": "text", "text": chosen}]},
                ],
            }
        )
    return ours, trl_rows


class StepTimer:
    """A TrainerCallback that times each optimizer step (device synchronised)."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _Timer(TrainerCallback):
            def __init__(self) -> None:
                self.times: list[float] = []
                self.cycles: list[float] = []  # step begin to next step begin: includes data loading
                self.start = 0.0

            def on_step_begin(self, args, state, control, **kwargs):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                now = time.perf_counter()
                if self.start:
                    self.cycles.append(now - self.start)
                self.start = now

            def on_step_end(self, args, state, control, **kwargs):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.times.append(time.perf_counter() - self.start)

        return _Timer()


def lora_model(bundle: dict[str, Any], device: str) -> torch.nn.Module:
    """The bundle's model, built from its config with the seed 0 (bf16 on CUDA, fp32 on the CPU, sdpa), its vision
    tower frozen, with LoRA r=16 (no dropout) on the spec's default targets: what both sides train."""
    from peft import LoraConfig, get_peft_model

    mapper, spec = bundle["mapper"], bundle["spec"]
    model_cls = getattr(__import__("transformers"), spec.model_class)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    # a copy of the config: transformers' Trainer sets use_cache=False on its model's config, which a later model
    # built from the same object would then generate with (no KV cache at all)
    with torch.device(device):
        model = model_cls._from_config(copy.deepcopy(bundle["config"]), dtype=dtype, attn_implementation="sdpa")
    mapper.model.freeze_vision_tower(model)
    lora = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
        target_modules=mapper.model.lora_target_modules(mapper.model.default_lora_target),
    )
    return get_peft_model(model, lora)


def lm_linear_params(model: torch.nn.Module, language_model_path: str) -> int:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    lm = base.get_submodule(language_model_path)
    return sum(
        m.weight.numel() for name, m in lm.named_modules() if isinstance(m, torch.nn.Linear) and "lora_" not in name
    )


def step_flops(n_lm: int, lm_head: int, tokens: float, completion_tokens: float, algorithm: str) -> float:
    """Model FLOPs per step of the LM with LoRA (no weight grads): policy fwd + bwd-through-activations, plus
    (DPO) the reference forward; lm_head on completion tokens only. Vision and recompute not counted."""
    per_token_fwd = 2 * n_lm * tokens + 2 * lm_head * completion_tokens
    return per_token_fwd * (3 if algorithm == "dpo" else 2)


def matmul_peak_tflops() -> float | None:
    if not torch.cuda.is_available():
        return None
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * 8192**3 / statistics.median(times) / 1e12


def run_one(bundle, algorithm: str, who: str, rows_ours, rows_trl, args, device: str) -> dict[str, Any]:
    """Train ``args.warmup + args.steps`` steps with our trainer or TRL's; return the measurements."""
    if algorithm == "rm" and who == "trl":
        raise NotImplementedError("TRL 1.16's RewardTrainer is text-only: it has no image reward model to compare")
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from resonance.algorithms.dpo.config import VLDPOConfig
    from resonance.algorithms.rm import VLRewardConfig
    from resonance.algorithms.shared_prompt import plan_pairs
    from resonance.base.processor import VLProcessor

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    mapper = bundle["mapper"]
    model = lora_model(bundle, device)
    n_lm = lm_linear_params(model, mapper.model.language_model_path)
    text_config = bundle["config"].get_text_config(decoder=True)
    lm_head = text_config.vocab_size * text_config.hidden_size
    if algorithm == "rm":  # the scalar head on the LoRA model, as `resonance train rm` builds it
        model = mapper.reward_model(model)
    common = dict(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=args.bs,
        max_steps=args.warmup + args.steps,
        learning_rate=1e-6 if algorithm == "dpo" else 2e-5,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=device == "cuda",
        use_cpu=device != "cuda",
        gradient_checkpointing=True,
        max_length=1024,
        dataloader_num_workers=args.workers,
        remove_unused_columns=False,
        seed=0,
    )
    timer = StepTimer()
    if args.no_vision_cache:  # ablation: our trainer, but images go through the tower per copy, with grad
        mapper.model.image_encoder_frozen = classmethod(lambda cls, model: False)
    hf_processor = bundle["processor"]
    built = time.perf_counter()
    keys = ("messages",) if algorithm == "sft" else ("prompt", "chosen", "rejected")
    if who == "ours" and args.compile:  # as `resonance train --compile_layers True`
        common["pad_to_multiple_of"] = 8
    if algorithm == "dpo" and who == "ours":
        config = VLDPOConfig(
            **common,
            precompute_ref_log_probs=args.precompute_ref,
            shared_prompt=not args.no_shared_prompt,
            use_liger_kernel=args.liger,
        )
    elif algorithm == "dpo":
        config = DPOConfig(**common)
    elif algorithm == "rm":
        config = VLRewardConfig(**common)
    else:  # our collator builds the labels; TRL's prepares its own dataset
        config = SFTConfig(
            **common,
            dataset_kwargs={"skip_prepare_dataset": True} if who == "ours" else None,
            use_liger_kernel=args.liger and who == "ours",
        )
    kwargs: dict[str, Any] = {"model": model, "args": config, "processing_class": hf_processor, "callbacks": [timer]}
    if who == "ours":
        processor = VLProcessor.__new__(mapper.processor)
        VLProcessor.__init__(processor, hf_processor)
        dataset = Dataset.from_list([{k: r[k] for k in (*keys, "images", "source")} for r in rows_ours])
        collator_cls = {"dpo": mapper.dpo_collator, "sft": mapper.sft_collator, "rm": mapper.reward_collator}
        collator = collator_cls[algorithm](processor, pad_to_multiple_of=config.pad_to_multiple_of)
        trainer_cls = {"dpo": mapper.dpo_trainer, "sft": mapper.sft_trainer, "rm": mapper.reward_trainer}[algorithm]
        kwargs.update(data_collator=collator, vl_model=mapper.model, vl_processor=processor)
    else:
        dataset = Dataset.from_list([{k: r[k] for k in (*keys, "images")} for r in rows_trl])
        trainer_cls = DPOTrainer if algorithm == "dpo" else SFTTrainer
    trainer = trainer_cls(train_dataset=dataset, **kwargs)
    if args.compile and who == "ours":  # what `resonance train --compile_layers True` does
        from resonance.patches.compile_layers import compile_blocks

        compile_blocks(trainer.model)
    setup_s = time.perf_counter() - built  # includes the reference pass with --precompute-ref
    # Tokens per step from a few batches collated up front (the loader may run in worker processes).
    collate = trainer.data_collator
    batch_tokens, collate_times = [], []
    for first in range(0, 3 * args.bs, args.bs):
        features = [dataset[i] for i in range(first, first + args.bs)]
        begin = time.perf_counter()
        batch = collate(features)
        collate_times.append(time.perf_counter() - begin)
        if "completion_mask" in batch:
            mask = batch["completion_mask"]
        elif "labels" in batch:
            mask = batch["labels"] != -100
        else:  # reward model: a score on each row's last token, no LM head
            mask = torch.zeros_like(batch["attention_mask"])
        executed = int(batch["attention_mask"].sum())
        if who == "ours" and algorithm == "dpo" and config.shared_prompt:  # the tokens the model actually runs
            layout = plan_pairs(
                batch["input_ids"], batch["attention_mask"], mask, trainer.vl_processor.placeholder_token_ids()
            )
            executed = layout.tokens if layout is not None else executed
        batch_tokens.append((int(batch["attention_mask"].sum()), int(mask.sum()), executed))
    profiler = None
    if args.profile and device == "cuda":
        from transformers import TrainerCallback

        class _Profile(TrainerCallback):
            def on_step_begin(self, a, state, control, **kwargs):
                nonlocal profiler
                if state.global_step == args.warmup:
                    profiler = torch.profiler.profile(
                        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
                    )
                    profiler.__enter__()

            def on_step_end(self, a, state, control, **kwargs):
                if profiler is not None and state.global_step == args.warmup + 1:
                    torch.cuda.synchronize()
                    profiler.__exit__(None, None, None)

        trainer.add_callback(_Profile())
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    if profiler is not None:
        log(who, algorithm, "profile of one step:")
        print(profiler.key_averages().table(sort_by="cuda_time_total", row_limit=18), flush=True)
    timed = timer.times[args.warmup :]
    step_s = statistics.mean(timed)
    tokens = statistics.mean(t for t, _, _ in batch_tokens)
    completion = statistics.mean(c for _, c, _ in batch_tokens)
    executed = statistics.mean(e for _, _, e in batch_tokens)
    # With precomputed reference log-probs a step runs no reference forward: count it as SFT-like.
    counted = "sft" if algorithm == "dpo" and getattr(config, "precompute_ref_log_probs", False) else algorithm
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    result = {
        "pairs_per_s": args.bs / step_s,
        "tokens_per_s": tokens / step_s,
        "step_s": step_s,
        "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
        "first_loss": losses[0] if losses else None,
        "losses": losses,
        "tokens_per_step": tokens,
        "cycle_s": statistics.mean(timer.cycles[args.warmup :]) if len(timer.cycles) > args.warmup else None,
        "collate_s_per_batch": statistics.mean(collate_times),
        "train_wall_s": wall,
        "setup_s": setup_s,
        "each_step_s": timer.times,  # warm-up steps first (with --compile they include compiling)
        "compiled_layers": bool(args.compile and who == "ours"),
        "executed_tokens_per_step": executed,
        # FLOPs the step runs (shared-prompt rows: each prompt once), and those of the same pairs as two rows
        "flops_per_step": step_flops(n_lm, lm_head, executed, completion, counted),
        "two_row_flops_per_step": step_flops(n_lm, lm_head, tokens, completion, counted),
    }
    del trainer, model
    return result


def largest_batch(bundle, algorithm: str, sizes: list[int], rows_ours, rows_trl, args, device: str, save) -> None:
    """For each side, the largest of ``sizes`` (tried in order, two steps each) that trains without running
    out of GPU memory, with the peak memory and speed at each size that fitted; ``save(entry)`` after each."""
    entry: dict[str, Any] = {"model": bundle["key"], "algorithm": algorithm, "setup": "lora", "largest_batch": {}}
    for who in args.order.split(","):
        if args.only and who != args.only:
            continue
        fitted: dict[int, dict[str, Any]] = {}
        failure = None
        entry["largest_batch"][who] = {"largest": None, "stopped": "not finished", "fitted": fitted}
        for size in sizes:
            trial = argparse.Namespace(**{**vars(args), "bs": size, "warmup": 1, "steps": 1})
            log(bundle["key"], algorithm, who, "batch", size, "...")
            try:
                result = run_one(bundle, algorithm, who, rows_ours, rows_trl, trial, device)
            except torch.OutOfMemoryError:
                failure = f"out of memory at batch {size}"
            except Exception as exc:  # noqa: BLE001 - a benchmark reports failures and goes on
                failure = f"{type(exc).__name__} at batch {size}: {exc}"[:500]
            else:
                fitted[size] = {"peak_gb": result["peak_gb"], "pairs_per_s": result["pairs_per_s"]}
                entry["largest_batch"][who]["largest"] = size
                save(entry)
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
            if failure:
                break
        largest = max(fitted, default=None)
        entry["largest_batch"][who] = {"largest": largest, "stopped": failure, "fitted": fitted}
        save(entry)
        log(bundle["key"], algorithm, who, "largest batch", largest, failure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="Where to write the JSON results.")
    parser.add_argument("--tiny", action="store_true", help="Tiny sizes on the CPU (a smoke test).")
    parser.add_argument("--models", default="qwen2_5_vl_3b,llava_1_5_7b")
    parser.add_argument(
        "--algorithms", default="dpo,sft", help="dpo, sft, rm (rm: ours only; TRL has no image reward trainer)"
    )
    parser.add_argument("--bs", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rows", type=int, default=96)
    parser.add_argument("--workers", type=int, default=4, help="DataLoader workers (both sides).")
    parser.add_argument("--order", default="trl,ours", help="Which side runs first for each model/algorithm.")
    parser.add_argument("--only", choices=["ours", "trl"], help="Run one side only (debugging).")
    parser.add_argument("--no-vision-cache", action="store_true", help="Ablation: run ours without encoding once.")
    parser.add_argument(
        "--precompute-ref", action="store_true", help="Ours precomputes reference log-probs before training."
    )
    parser.add_argument("--profile", action="store_true", help="Print a torch.profiler table of one step.")
    parser.add_argument(
        "--no-shared-prompt", action="store_true", help="Ablation: ours runs each pair as two rows, as TRL does."
    )
    parser.add_argument(
        "--liger", action="store_true", help="Ours applies Liger's layer kernels (RMSNorm, SwiGLU, RoPE)."
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="Ours compiles each decoder layer and vision block in place and pads to a multiple of 8 (as "
        "--compile_layers); give --warmup 3: the first two steps compile (with grad, without, backward).",
    )
    parser.add_argument(
        "--max-batch",
        default="",
        help="Comma-separated per-device batch sizes to try, one step each, in increasing order; reports the "
        "largest that fits for each side (stops at the first out-of-memory).",
    )
    args = parser.parse_args()

    import accelerate
    import peft
    import transformers
    import trl

    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    peak = matmul_peak_tflops() if device == "cuda" else None
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
            "peft": peft.__version__,
            "accelerate": accelerate.__version__,
            "python": platform.python_version(),
        },
        "matmul_peak_tflops": peak,
        "runs": [],
    }
    log("device", report["device"], "matmul peak", peak)
    for model_key in args.models.split(","):
        bundle = build(model_key, args.tiny)
        with tempfile.TemporaryDirectory() as folder:
            sizes = [int(size) for size in args.max_batch.split(",") if size]
            # Rows for the timed steps, and for the three batches collated up front to count tokens.
            needed = max([args.bs * max(3, args.warmup + args.steps), *(3 * size for size in sizes)])
            rows_ours, rows_trl = make_rows(bundle, max(args.rows, needed), 64, 128, Path(folder))
            for algorithm in args.algorithms.split(","):
                if sizes:

                    def save(entry: dict[str, Any], slot: int = len(report["runs"])) -> None:
                        report["runs"][slot:] = [entry]
                        Path(args.out).write_text(json.dumps(report, indent=1))

                    largest_batch(bundle, algorithm, sizes, rows_ours, rows_trl, args, device, save)
                    continue
                entry: dict[str, Any] = {
                    "model": model_key,
                    "algorithm": algorithm,
                    "setup": "lora",
                    "batch_size": args.bs,
                }
                for who in args.order.split(","):
                    if args.only and who != args.only:
                        continue
                    log(model_key, algorithm, who, "...")
                    try:
                        entry[who] = run_one(bundle, algorithm, who, rows_ours, rows_trl, args, device)
                    except Exception as exc:  # noqa: BLE001 - a benchmark reports failures and goes on
                        entry[who] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
                    if peak and "flops_per_step" in entry[who]:
                        side = entry[who]
                        side["mfu"] = side["flops_per_step"] / side["step_s"] / 1e12 / peak
                        side["two_row_mfu"] = side["two_row_flops_per_step"] / side["step_s"] / 1e12 / peak
                    log(model_key, algorithm, who, {k: v for k, v in entry[who].items() if k != "losses"})
                ours, theirs = entry.get("ours", {}), entry.get("trl", {})
                if "pairs_per_s" in ours and "pairs_per_s" in theirs:
                    entry["speedup"] = ours["pairs_per_s"] / theirs["pairs_per_s"]
                    if ours.get("peak_gb") and theirs.get("peak_gb"):
                        entry["memory_ratio"] = ours["peak_gb"] / theirs["peak_gb"]
                    entry["first_loss_rel_diff"] = abs(ours["first_loss"] - theirs["first_loss"]) / abs(
                        theirs["first_loss"]
                    )
                    log(
                        model_key,
                        algorithm,
                        "speedup",
                        round(entry["speedup"], 3),
                        "memory ratio",
                        entry.get("memory_ratio"),
                    )
                report["runs"].append(entry)
                Path(args.out).write_text(json.dumps(report, indent=1))
    Path(args.out).write_text(json.dumps(report, indent=1))
    log("wrote", args.out)


if __name__ == "__main__":
    main()
