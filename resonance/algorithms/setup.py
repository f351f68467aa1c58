"""The setup steps every algorithm shares: data and model loading, LoRA, sampler lengths, and the trainer of the
offline algorithms (sft, dpo, rm), which differ only in their core_mapper classes."""

from __future__ import annotations

import difflib
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from transformers import TrainingArguments, set_seed
from transformers.pytorch_utils import Conv1D

from resonance.algorithms.arguments import DataArguments, ModelArguments
from resonance.algorithms.lengths import fit_rows, row_lengths
from resonance.algorithms.quantization import prepare_for_training, quantization_config
from resonance.base.checks import lora_layer_names
from resonance.base.model import VLModel
from resonance.base.processor import VLProcessor
from resonance.base.registry import ModelCoreMapper, lora_base_checkpoint
from resonance.data.images import ImageCount
from resonance.data.rows import load_rows
from resonance.errors import ConfigError
from resonance.patches.fsdp_cpu import wrap_layers_the_model_holds

logger = logging.getLogger("resonance")

DEFAULT_LORA_DROPOUT = 0.05  # --lora_dropout where no LoRA reaches expert weights


def apply_lora(model: torch.nn.Module, model_cls: type[VLModel], model_args: ModelArguments) -> torch.nn.Module:
    """``--lora_target_modules`` on the model: ``auto`` (the spec's targets), leaf names, or ``none`` (full); and
    ``--lora_target_parameters``: the expert weights of a mixture-of-experts decoder (spec lora.parameters)."""
    spec = model_args.lora_target_modules.strip()
    parameters = model_args.lora_target_parameters.strip()
    if spec.lower() == "none":
        if parameters != "auto":
            raise ConfigError(
                f"--lora_target_parameters {parameters} with --lora_target_modules none: full training trains every "
                "weight, experts included (leave --lora_target_parameters out)"
            )
        return model
    names = model_cls.default_lora_target if spec == "auto" else [n.strip() for n in spec.split(",") if n.strip()]
    if spec != "auto":
        _check_lora_targets(model, model_cls, names)
    experts = _lora_parameters(model, model_cls, parameters)
    dropout = model_args.lora_dropout
    if dropout is None:
        dropout = 0.0 if experts else DEFAULT_LORA_DROPOUT
    elif dropout and experts:
        raise ConfigError(
            f"--lora_dropout {dropout} with LoRA on expert weights (--lora_target_parameters {parameters}): peft's "
            "LoRA on a parameter has no dropout; pass --lora_dropout 0, or --lora_target_parameters none"
        )
    config = LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=dropout,
        target_modules=model_cls.lora_target_modules(names),
        target_parameters=experts or None,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def _lora_parameters(model: torch.nn.Module, model_cls: type[VLModel], flag: str) -> list[str]:
    """The full names of the parameters ``--lora_target_parameters`` asks for; a name ending that matches no
    parameter of the language model is a ConfigError naming it, with the expert weights there are."""
    if flag.lower() == "none":
        return []
    endings = model_cls.default_lora_parameters if flag == "auto" else [e.strip() for e in flag.split(",") if e.strip()]
    unknown = [e for e in endings if not model_cls.lora_target_parameters(model, [e])]
    if unknown:
        prefix = model_cls.language_model_path + "."
        # the weights of more than two dimensions, without the layer list's index: layers.3.mlp.experts.down_proj
        names = [n[len(prefix) :] for n, p in model.named_parameters() if n.startswith(prefix) and p.dim() > 2]
        ends = sorted({re.sub(r"^(?:\w+\.)*?\d+\.", "", name) for name in names})
        there = f"its weights of more than two dimensions are {', '.join(ends)}" if ends else "it has none"
        raise ConfigError(
            f"--lora_target_parameters: {', '.join(map(repr, unknown))} ends no parameter name under "
            f"{model_cls.language_model_path}; {there}"
        )
    return model_cls.lora_target_parameters(model, endings)


# The layer kinds PEFT's LoRA wraps (peft.tuners.lora.model dispatches on these).
_LORA_LAYERS = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, Conv1D)


def _check_lora_targets(model: torch.nn.Module, model_cls: type[VLModel], names: list[str]) -> None:
    """Every ``--lora_target_modules`` name must be a layer LoRA can wrap under the language model; else one
    :class:`ConfigError` naming each unknown name with did-you-mean (or the names there are)."""
    layers = sorted(lora_layer_names(model, model_cls.language_model_path, _LORA_LAYERS))
    unknown = [name for name in dict.fromkeys(names) if name not in layers]
    if not unknown:
        return
    problems = []
    for name in unknown:
        close = difflib.get_close_matches(name, layers, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"the layers there are {', '.join(layers)}"
        problems.append(f"{name!r} is no Linear, Embedding or Conv layer under {model_cls.language_model_path}; {hint}")
    raise ConfigError("--lora_target_modules: " + "; ".join(problems) + " (or give auto, or none for full training)")


def load_data_and_processor(
    mapper: ModelCoreMapper,
    model_args: ModelArguments,
    data_args: DataArguments,
    kind: str,
    most_images: int | None = None,
    no_videos: str | None = None,
) -> tuple[Any, Any, VLProcessor]:
    """Data (train, eval), then the processor: a bad row, or one the family cannot take (its :class:`ImageCount`,
    narrowed to ``most_images``, and to no video for the reason ``no_videos``, where the algorithm takes fewer),
    fails in a second, naming its FILE:LINE; a broken chat template or processor fails next; both before the model
    loads."""
    data_kwargs = {
        "image_placeholder": mapper.processor.image_placeholder,
        "video_placeholder": mapper.processor.video.placeholder if mapper.processor.video else "<video>",
        "skip_invalid": data_args.skip_invalid_rows,
        "image_count": ImageCount.for_family(mapper.processor, most_images, no_videos),
        "max_image_pixels": data_args.max_image_pixels,
        **source_options(data_args),
    }
    train_rows = load_rows(data_args.data_path, kind, **data_kwargs)
    eval_kwargs = {**data_kwargs, "data_split": data_args.eval_data_split or data_args.data_split}
    eval_rows = load_rows(data_args.eval_data_path, kind, **eval_kwargs) if data_args.eval_data_path else None
    processor = mapper.processor(model_args.model_name_or_path, trust_remote_code=mapper.model.trust_remote_code)
    return train_rows, eval_rows, processor


def source_options(data_args: DataArguments) -> dict[str, Any]:
    """The ``read_rows`` options that say where rows and their images come from, from the data flags."""
    names = ("data_format", "image_root", "allow_image_urls", "data_config", "data_split", "data_revision")
    return {name: getattr(data_args, name) for name in names}


def load_model(
    mapper: ModelCoreMapper, model_args: ModelArguments, config: TrainingArguments
) -> tuple[torch.nn.Module, torch.dtype]:
    """The model in the run's precision, its vision tower frozen as asked; with ``--load_in_4bit``/``--load_in_8bit``
    its language model quantised on this process's GPU and prepared for LoRA (:mod:`.quantization`)."""
    dtype = torch.bfloat16 if config.bf16 else (torch.float16 if config.fp16 else torch.float32)
    kwargs: dict[str, Any] = {"dtype": dtype}
    quantization = quantization_config(mapper.model, vars(model_args), dtype)
    if quantization is not None:
        # A quantised model is placed as it loads (Trainer and accelerate never move it): one process, one GPU.
        kwargs.update(quantization_config=quantization, device_map={"": config.local_process_index})
    start = Path(model_args.model_name_or_path)
    if quantization is not None and lora_base_checkpoint(start) is not None:
        raise ConfigError(
            f"--model_name_or_path {start} is a LoRA output, which a quantised run cannot start from (its adapter "
            f"would be merged into quantised weights, losing precision): run `resonance export {start} --to DIR` "
            "and train from DIR"
        )
    model = mapper.model.from_pretrained(start, **kwargs)
    if lora_base_checkpoint(start) is not None:
        # A run from another run's LoRA output (DPO after SFT): that adapter merged is where this run starts, and
        # its reference; the new adapter names the output as its base, so loading it applies both.
        model = model.merge_and_unload()
        model.name_or_path = model.config._name_or_path = str(start.resolve())  # what peft records as the base
        logger.info("%s: a LoRA output; its adapter is merged into its base and this run trains on top", start)
    coefficient = getattr(config, "router_aux_loss_coef", 0.0)
    if coefficient is None and not mapper.model.router_aux_loss:
        # TRL adds a mixture-of-experts model's router loss unless the coefficient is 0; the spec's moe.aux_loss
        # decides where --router_aux_loss_coef is not given
        config.router_aux_loss_coef = 0.0
    text_config = model.config.get_text_config()
    if coefficient and hasattr(text_config, "output_router_logits") and not hasattr(text_config, "num_experts"):
        # TRL's router loss (Mixtral's) reads the config's num_experts: Llama 4's names its experts otherwise and
        # defines no such loss
        raise ConfigError(
            f"--router_aux_loss_coef {coefficient}: {type(model).__name__} has no load-balancing loss to add (its "
            "config has no num_experts, which TRL's router loss reads); leave the flag out"
        )
    model = prepare_for_training(model, config)
    wrap_layers_the_model_holds(model)  # FSDP: the layers to wrap, before the trainer's accelerator reads them
    if model_args.freeze_vision_tower:
        mapper.model.freeze_vision_tower(model)
    # Seeded again now that the model is loaded: the weights made next (LoRA matrices, heads) must not depend on
    # how the base was built (under DeepSpeed ZeRO-3 from_pretrained initialises every weight before loading it,
    # drawing from the random stream; a plain load draws nothing).
    set_seed(config.seed)
    return model, dtype


def load_data_and_model(
    mapper: ModelCoreMapper,
    model_args: ModelArguments,
    data_args: DataArguments,
    config: TrainingArguments,
    kind: str,
    most_images: int | None = None,
) -> tuple[Any, Any, torch.dtype, torch.nn.Module, VLProcessor]:
    """:func:`load_data_and_processor`, then :func:`load_model`: for the online algorithms (GRPO, PPO), whose
    generation takes no video yet, so a row with one is refused by name."""
    algorithm = type(config).__name__.removeprefix("VL").removesuffix("Config")  # VLGRPOConfig: GRPO
    no_videos = f"{algorithm} generates answers from prompts with images only: it takes no video yet"
    train_rows, eval_rows, processor = load_data_and_processor(
        mapper, model_args, data_args, kind, most_images, no_videos
    )
    model, dtype = load_model(mapper, model_args, config)
    return train_rows, eval_rows, dtype, model, processor


def with_lengths(rows: Any, processor: VLProcessor, config: TrainingArguments) -> Any:
    """Length-grouped sampling (``--train_sampling_strategy group_by_length`` or ``batch_rebalance``) reads each
    row's token count from ``--length_column_name``; our rows are tokenized per batch, so add it where missing."""
    if rows is None or config.train_sampling_strategy not in ("group_by_length", "batch_rebalance"):
        return rows
    if config.length_column_name in rows.column_names:
        return rows

    return rows.add_column(config.length_column_name, row_lengths(rows, processor))


def build_offline_trainer(
    mapper: ModelCoreMapper,
    model_args: ModelArguments,
    data_args: DataArguments,
    config: TrainingArguments,
    *,
    kind: str,
    collator_cls: type,
    trainer_cls: type,
    wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
    full_training_reference: bool = False,
) -> tuple[Any, VLProcessor]:
    """The trainer of an offline algorithm: rows of ``kind``, the family's collator and trainer classes, LoRA;
    ``wrap`` puts a head on the (LoRA-wrapped) model; ``full_training_reference`` gives full training a frozen
    copy of the model as its reference (under LoRA the reference is the adapter disabled)."""
    train_rows, eval_rows, processor = load_data_and_processor(mapper, model_args, data_args, kind)
    model_cls = mapper.model
    collator = collator_cls(
        processor,
        max_length=config.max_length,
        skip_long_rows=data_args.skip_long_rows,
        pad_to_multiple_of=getattr(config, "pad_to_multiple_of", None),
    )
    train_rows, eval_rows = (fit_rows(rows, collator, data_args.skip_invalid_rows) for rows in (train_rows, eval_rows))
    train_rows, eval_rows = (with_lengths(rows, processor, config) for rows in (train_rows, eval_rows))
    model, dtype = load_model(mapper, model_args, config)  # every row fits: only now the model
    trained = apply_lora(model, model_cls, model_args)
    kwargs = {}
    if full_training_reference:
        ref_model = None
        if trained is model:
            ref_model = model_cls.from_pretrained(model_args.model_name_or_path, dtype=dtype)
            ref_model.requires_grad_(False)
        kwargs["ref_model"] = ref_model
    if wrap is not None:
        trained = wrap(trained)
    trainer = trainer_cls(
        model=trained,
        args=config,
        data_collator=collator,
        train_dataset=train_rows,
        eval_dataset=eval_rows,
        processing_class=processor.hf,
        vl_model=model_cls,
        vl_processor=processor,
        **kwargs,
    )
    return trainer, processor
