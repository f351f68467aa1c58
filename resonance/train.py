"""``resonance train sft|dpo|rm|grpo|ppo``: arguments spelled as in the seed and in TrainingArguments/TRL configs."""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger("resonance")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Checkpoint folder whose config.json names a supported family."})
    lora_target_modules: str = field(
        default="auto",
        metadata={
            "help": "'auto' (the spec's default_lora_target), a comma list of leaf names (both restricted "
            "to the language model), or 'none' for full training."
        },
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    freeze_vision_tower: bool = field(default=True, metadata={"help": "Freeze the vision tower's weights."})
    compile_layers: bool = field(
        default=False,
        metadata={
            "help": "Compile each decoder layer and vision block in place with torch.compile (one compile per "
            "layer kind, reused by every layer): fuses the small kernels that bound steps on small models. The "
            "first steps are slower while it compiles. Pads batches to a multiple of 8 tokens unless "
            "--pad_to_multiple_of says otherwise. sft, dpo and rm only."
        },
    )


@dataclass
class DataArguments:
    data_path: str = field(metadata={"help": "Training data: JSONL or a JSON list (see README, Data)."})
    eval_data_path: str | None = field(default=None, metadata={"help": "Optional evaluation data, same format."})
    skip_invalid_rows: bool = field(
        default=False, metadata={"help": "Skip (and count, in the log) invalid rows instead of failing."}
    )
    skip_long_rows: bool = field(
        default=False, metadata={"help": "Skip (and count) rows longer than --max_length instead of failing."}
    )


def _config_class(algorithm: str):
    from trl import SFTConfig

    from resonance.base.ppo import VLPPOConfig
    from resonance.base.reward import VLRewardConfig
    from resonance.base.trainer import VLDPOConfig
    from resonance.grpo import VLGRPOConfig

    configs = {"sft": SFTConfig, "dpo": VLDPOConfig, "rm": VLRewardConfig, "grpo": VLGRPOConfig, "ppo": VLPPOConfig}
    return configs[algorithm]


def parse(algorithm: str, argv: list[str]):
    """Parse command-line flags into (ModelArguments, DataArguments, SFTConfig | VLDPOConfig | VLRewardConfig |
    VLGRPOConfig | VLPPOConfig)."""
    import torch
    from transformers import HfArgumentParser

    parser = HfArgumentParser((ModelArguments, DataArguments, _config_class(algorithm)))
    parser.prog = f"resonance train {algorithm}"
    defaults = {"remove_unused_columns": False, "report_to": "none"}
    if not torch.cuda.is_available():
        defaults["bf16"] = False  # TRL's configs default to bf16, which a CPU run refuses
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # Several processes without a GPU (torchrun, or `accelerate launch` of configs/accelerate/cpu_2proc.yaml):
            # accelerate only joins them into one gloo group (MULTI_CPU) when asked for the CPU. Without it each
            # process sees LOCAL_RANK, finds no GPU, falls back to DistributedType.NO and trains alone on the
            # whole dataset: N independent copies of a one-process run, all writing the same --output_dir.
            defaults["use_cpu"] = True
    argv = [*argv]
    for key, value in defaults.items():
        if f"--{key}" not in argv:
            argv += [f"--{key}", str(value)]
    model_args, data_args, config = parser.parse_args_into_dataclasses(args=argv)
    if model_args.compile_layers and algorithm in ("grpo", "ppo"):
        # Generation guards each layer on its own KV-cache entry, so every layer would compile separately.
        parser.error(
            f"--compile_layers: sft, dpo and rm only, not {algorithm} (generation would compile every layer separately)"
        )
    given = {arg.split("=", 1)[0] for arg in argv}
    if model_args.compile_layers and hasattr(config, "pad_to_multiple_of") and "--pad_to_multiple_of" not in given:
        # sdpa's attention mask wants a length that is a multiple of 8; compiled code specialises on it, so
        # lengths of both kinds would compile every layer twice, the second time deep into training.
        config.pad_to_multiple_of = 8
    if algorithm == "sft":
        config.dataset_kwargs = {**(config.dataset_kwargs or {}), "skip_prepare_dataset": True}
    return model_args, data_args, config


def _apply_lora(model, model_cls, model_args: ModelArguments):
    from peft import LoraConfig, get_peft_model

    spec = model_args.lora_target_modules.strip()
    if spec.lower() == "none":
        return model
    names = model_cls.default_lora_target if spec == "auto" else [n.strip() for n in spec.split(",") if n.strip()]
    config = LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=model_cls.lora_target_modules(names),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def _load(mapper, model_args: ModelArguments, data_args: DataArguments, config, kind: str, max_images: int | None):
    """Data (train, eval), then the model (vision tower frozen as asked) and the processor.

    Data first: a bad row, or one the family cannot take (``min_images``/``max_images``), fails in a second,
    naming its FILE:LINE, not after the model has loaded.
    """
    import torch

    from resonance.data import load_rows

    model_cls = mapper.model
    data_kwargs = {
        "image_placeholder": mapper.processor.image_placeholder,
        "skip_invalid": data_args.skip_invalid_rows,
        "min_images": 1 if mapper.processor.images_required else 0,
        "max_images": max_images,
    }
    train_rows = load_rows(data_args.data_path, kind, **data_kwargs)
    eval_rows = load_rows(data_args.eval_data_path, kind, **data_kwargs) if data_args.eval_data_path else None
    dtype = torch.bfloat16 if config.bf16 else (torch.float16 if config.fp16 else torch.float32)
    model = model_cls.from_pretrained(model_args.model_name_or_path, dtype=dtype)
    if model_args.freeze_vision_tower:
        model_cls.freeze_vision_tower(model)
    processor = mapper.processor(model_args.model_name_or_path, trust_remote_code=model_cls.trust_remote_code)
    return train_rows, eval_rows, dtype, model, processor


def build_trainer(algorithm: str, model_args: ModelArguments, data_args: DataArguments, config):
    """Load adapter, model, processor and data, and return the family's trainer, ready to train."""

    from resonance.utils.auto_load import UnsupportedModelError, load_core_mapper
    from resonance.utils.compat import install_video_processor_optional

    # The Trainer saves the processor in every checkpoint; without torchvision, Qwen-VL processors
    # can only be saved and loaded with this patch active (a no-op where torchvision exists).
    install_video_processor_optional()
    # Seeded before any weight is made (LoRA matrices, heads): the same flags give the same run, whatever ran
    # before in the process (the trainers seed again, after the model exists).
    from transformers import set_seed

    set_seed(config.seed)

    mapper = load_core_mapper(model_args.model_name_or_path)
    model_cls = mapper.model
    if algorithm == "grpo":
        return _build_grpo_trainer(mapper, model_args, data_args, config)
    if algorithm == "ppo":
        return _build_ppo_trainer(mapper, model_args, data_args, config)
    kind = "sft" if algorithm == "sft" else "preference"
    max_images = None if mapper.processor.multi_image else 1
    train_rows, eval_rows, dtype, model, processor = _load(mapper, model_args, data_args, config, kind, max_images)
    collator_cls = {"sft": mapper.sft_collator, "dpo": mapper.dpo_collator, "rm": mapper.reward_collator}[algorithm]
    if collator_cls is None:
        raise UnsupportedModelError(
            f"{model_cls.__name__}: the adapter has no {algorithm} classes; rerun `resonance scaffold`"
        )
    train_rows, eval_rows = (_with_lengths(rows, processor, config) for rows in (train_rows, eval_rows))
    collator = collator_cls(
        processor,
        max_length=config.max_length,
        skip_long_rows=data_args.skip_long_rows,
        pad_to_multiple_of=getattr(config, "pad_to_multiple_of", None),
    )
    ref_model = None
    peft_model = _apply_lora(model, model_cls, model_args)
    if algorithm == "dpo" and peft_model is model:
        ref_model = model_cls.from_pretrained(model_args.model_name_or_path, dtype=dtype)
        ref_model.requires_grad_(False)
    if algorithm == "rm":  # the scalar head on the (LoRA-wrapped) model; the head is always fully trained
        peft_model = mapper.reward_model(peft_model)
    trainer_cls = {"sft": mapper.sft_trainer, "dpo": mapper.dpo_trainer, "rm": mapper.reward_trainer}[algorithm]
    kwargs = {"ref_model": ref_model} if algorithm == "dpo" else {}
    trainer = trainer_cls(
        model=peft_model,
        args=config,
        data_collator=collator,
        train_dataset=train_rows,
        eval_dataset=eval_rows,
        processing_class=processor.hf,
        vl_model=model_cls,
        vl_processor=processor,
        **kwargs,
    )
    if model_args.compile_layers:
        from resonance.base.compile import compile_blocks

        models = (trainer.model, getattr(trainer, "ref_model", None))  # DPO's separate reference: full training
        count = sum(compile_blocks(m) for m in models if m is not None)
        logger.info("compiled %d layers in place (torch.compile, one compile per layer kind)", count)
    return trainer, processor


def _with_lengths(rows, processor, config):
    """Length-grouped sampling (``--train_sampling_strategy group_by_length`` or ``batch_rebalance``) reads each
    row's token count from ``--length_column_name``; our rows are tokenized per batch, so add it where missing."""
    if rows is None or config.train_sampling_strategy not in ("group_by_length", "batch_rebalance"):
        return rows
    if config.length_column_name in rows.column_names:
        return rows
    from resonance.base.lengths import row_lengths

    return rows.add_column(config.length_column_name, row_lengths(rows, processor))


def _build_grpo_trainer(mapper, model_args: ModelArguments, data_args: DataArguments, config):
    """GRPO (resonance.grpo): prompt rows, reward functions from --reward_funcs, TRL's GRPOTrainer."""

    from resonance.grpo import VLGRPOTrainer, load_reward_funcs, max_images_for_grpo, unsupported_reason
    from resonance.utils.auto_load import UnsupportedModelError

    model_cls = mapper.model
    reason = unsupported_reason(model_cls, mapper.processor)
    if reason is not None:  # before data and model load
        raise UnsupportedModelError(f"GRPO: {reason}")
    reward_funcs = load_reward_funcs(config.reward_funcs)
    train_rows, eval_rows, _, model, processor = _load(
        mapper, model_args, data_args, config, "prompt", max_images_for_grpo(mapper.processor)
    )
    trainer = VLGRPOTrainer(
        model=_apply_lora(model, model_cls, model_args),  # with --beta > 0 the reference is the adapter disabled
        reward_funcs=reward_funcs,
        args=config,
        train_dataset=train_rows,
        eval_dataset=eval_rows,
        processing_class=processor.hf,
        vl_model=model_cls,
        vl_processor=processor,
    )
    return trainer, processor


def _build_ppo_trainer(mapper, model_args: ModelArguments, data_args: DataArguments, config):
    """PPO (resonance.base.ppo): prompt rows, the policy with a value head, rewards from functions and/or a
    reward model, the reference as the adapter disabled (LoRA) or a frozen copy (full training)."""
    import torch

    from resonance.base.ppo import load_reward_model
    from resonance.rewards import load_reward_funcs
    from resonance.utils.auto_load import UnsupportedModelError

    model_cls = mapper.model
    if mapper.ppo_trainer is None or mapper.value_model is None:
        raise UnsupportedModelError(f"{model_cls.__name__}: the adapter has no PPO classes; rerun `resonance scaffold`")
    reward_funcs = load_reward_funcs(config.reward_funcs) if config.reward_funcs else None
    if config.reward_model_path and not Path(config.reward_model_path).is_dir():
        raise FileNotFoundError(f"--reward_model_path {config.reward_model_path}: no such folder")
    max_images = None if mapper.processor.multi_image else 1
    train_rows, eval_rows, dtype, model, processor = _load(mapper, model_args, data_args, config, "prompt", max_images)
    policy = _apply_lora(model, model_cls, model_args)
    ref_model = None
    if policy is model:  # full training: a frozen copy is the reference
        ref_model = model_cls.from_pretrained(model_args.model_name_or_path, dtype=dtype)
    device = torch.device("cuda" if torch.cuda.is_available() and not config.use_cpu else "cpu")
    reward_model = None
    if config.reward_model_path:
        reward_model = load_reward_model(config.reward_model_path, policy, model_args.model_name_or_path, dtype, device)
    trainer = mapper.ppo_trainer(
        model=mapper.value_model(policy),
        args=config,
        train_dataset=train_rows,
        eval_dataset=eval_rows,
        vl_model=model_cls,
        vl_processor=processor,
        reward_funcs=reward_funcs,
        reward_model=reward_model,
        ref_model=ref_model,
        data_collator=mapper.ppo_collator(processor),
        processing_class=processor.hf,
    )
    return trainer, processor


def _log_processes(config) -> None:
    """Say how many processes train together; warn where the launcher started more than joined."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    kind = getattr(getattr(config, "distributed_state", None), "distributed_type", "?")
    if config.world_size != launched:
        logger.warning(
            "%d processes were launched but this one trains alone (%s): each runs the whole training on its own",
            launched,
            kind,
        )
    elif config.process_index == 0:
        logger.info("%d process(es), %s", config.world_size, kind)


def main(algorithm: str, argv: list[str]) -> int:
    """Train, then save weights (or adapter) and the processor into --output_dir."""
    from resonance.base.collator import RowError
    from resonance.base.ppo import PPOConfigError
    from resonance.data import DataError
    from resonance.rewards import RewardFunctionError
    from resonance.utils.auto_load import UnsupportedModelError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        model_args, data_args, config = parse(algorithm, argv)
    except PPOConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        trainer, _ = build_trainer(algorithm, model_args, data_args, config)
        _log_processes(config)
        trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    except (DataError, RowError, UnsupportedModelError, FileNotFoundError, RewardFunctionError, PPOConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # The adapter or weights (for rm: plus the reward head), and the processor (processing_class).
    trainer.save_model(config.output_dir)
    skipped = getattr(trainer.data_collator, "skipped_rows", 0)  # GRPO: TRL's collator, no length policy
    if skipped:
        logger.warning("skipped %d over-long rows (--skip_long_rows)", skipped)
    logger.info("saved to %s", Path(config.output_dir).resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
