"""QLoRA: ``--load_in_4bit`` / ``--load_in_8bit`` through bitsandbytes (the ``qlora`` extra).

Only the language model is quantised (:meth:`VLModel.unquantized_modules` leaves the vision tower, the projector
and the LM head out); LoRA trains on top. This module imports neither torch nor transformers at
import time: its flag checks run with the command line's, before anything loads.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from resonance.algorithms.compile_flag import compile_asked

if TYPE_CHECKING:
    import torch
    from transformers import BitsAndBytesConfig, TrainingArguments

    from resonance.base.model import VLModel

QUANT_TYPES = ("nf4", "fp4")  # bitsandbytes' 4-bit data types (BitsAndBytesConfig.bnb_4bit_quant_type)
DEFAULT_QUANT_TYPE = "nf4"  # QLoRA's (and TRL's ModelConfig's) choice; transformers' own default is fp4
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")  # --bnb_4bit_compute_dtype; default: the run's precision
FOUR_BIT_FLAGS = ("bnb_4bit_quant_type", "bnb_4bit_compute_dtype", "bnb_4bit_use_double_quant")
INSTALL = "pip install 'resonance[qlora]'"


def quantization_problems(values: Mapping[str, Any]) -> list[str]:
    """Every reason the quantisation flags in ``values`` (a run's flags by field name) cannot make a run: both bit
    widths, 4-bit settings without ``--load_in_4bit``, values outside their choices, full training, compiled layers,
    and a machine without bitsandbytes or CUDA. Empty when no quantisation is asked for and none of its flags is set."""
    four, eight = bool(values.get("load_in_4bit")), bool(values.get("load_in_8bit"))
    problems = []
    given_4bit = [f"--{name}" for name in FOUR_BIT_FLAGS if values.get(name) not in (None, False)]
    if given_4bit and not four:
        problems.append(f"{', '.join(given_4bit)}: 4-bit settings, they need --load_in_4bit")
    quant_type = values.get("bnb_4bit_quant_type")
    if quant_type is not None and quant_type not in QUANT_TYPES:
        problems.append(f"--bnb_4bit_quant_type {quant_type}: expected one of {', '.join(QUANT_TYPES)}")
    compute_dtype = values.get("bnb_4bit_compute_dtype")
    if compute_dtype is not None and compute_dtype not in COMPUTE_DTYPES:
        problems.append(
            f"--bnb_4bit_compute_dtype {compute_dtype}: expected one of {', '.join(COMPUTE_DTYPES)} "
            "(or leave it out for the run's precision: --bf16, --fp16, else float32)"
        )
    if not (four or eight):
        return problems
    flag = "--load_in_4bit" if four else "--load_in_8bit"
    if four and eight:
        problems.append("--load_in_4bit and --load_in_8bit: give one of them, not both")
    if str(values.get("lora_target_modules", "auto")).strip().lower() == "none":
        problems.append(
            f"{flag} with --lora_target_modules none: quantised weights cannot be trained; QLoRA trains LoRA on "
            "top of them (give auto or layer names), or leave the quantisation out for full training"
        )
    if compile_asked(values.get("compile_layers", "auto")):  # given: auto leaves quantised layers uncompiled
        # Seen on an H200 with torch 2.11 and bitsandbytes 0.50.2: inductor's partitioner fails in the first step
        # ("Node ... was invalid, but is output") on a quantised LLaVA; the same layers unquantised compile.
        problems.append(
            f"{flag} with --compile_layers: torch.compile fails on bitsandbytes' quantised layers in training; "
            "leave one of them out"
        )
    if values.get("use_cpu"):
        problems.append(f"{flag} with --use_cpu: bitsandbytes' quantised layers train on a CUDA GPU only")
    problems += environment_problems(flag)
    return problems


def environment_problems(flag: str) -> list[str]:
    """What this machine lacks for ``flag``: the bitsandbytes package (the ``qlora`` extra) and a CUDA GPU."""
    problems = []
    if importlib.util.find_spec("bitsandbytes") is None:
        problems.append(f"{flag} needs bitsandbytes, which is not installed: {INSTALL}")
    import torch

    if not torch.cuda.is_available():
        problems.append(f"{flag} needs a CUDA GPU (bitsandbytes' quantised layers), and torch sees none here")
    return problems


def quantization_config(
    model_cls: type[VLModel], values: Mapping[str, Any], dtype: torch.dtype
) -> BitsAndBytesConfig | None:
    """transformers' ``BitsAndBytesConfig`` for the bit width ``values`` (a run's flags by field name, as
    :func:`quantization_problems` reads them) ask for, or None: the language model quantised, the family's
    :meth:`~VLModel.unquantized_modules` left out; 4-bit computes in ``--bnb_4bit_compute_dtype`` (default ``dtype``,
    the run's precision)."""
    if not (values.get("load_in_4bit") or values.get("load_in_8bit")):
        return None
    import torch
    from transformers import BitsAndBytesConfig

    compute_dtype = values.get("bnb_4bit_compute_dtype")
    return BitsAndBytesConfig(
        load_in_4bit=bool(values.get("load_in_4bit")),
        load_in_8bit=bool(values.get("load_in_8bit")),
        llm_int8_skip_modules=model_cls.unquantized_modules(),
        bnb_4bit_quant_type=values.get("bnb_4bit_quant_type") or DEFAULT_QUANT_TYPE,
        bnb_4bit_compute_dtype=getattr(torch, compute_dtype) if compute_dtype else dtype,
        bnb_4bit_use_double_quant=bool(values.get("bnb_4bit_use_double_quant")),
    )


def prepare_for_training(model: Any, config: TrainingArguments) -> Any:
    """PEFT's ``prepare_model_for_kbit_training`` on a quantised model (a no-op on others): every weight frozen, the
    unquantised ones (norms, embeddings, vision tower) in float32 for stable LoRA training, and gradient
    checkpointing as ``--gradient_checkpointing`` asks, with inputs that require grad so checkpointed layers
    backpropagate into LoRA."""
    if not (getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)):
        return model
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=config.gradient_checkpointing,
        gradient_checkpointing_kwargs=config.gradient_checkpointing_kwargs,
    )
