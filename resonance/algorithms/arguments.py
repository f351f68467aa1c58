"""The flags every ``resonance train X`` shares: the model and LoRA (ModelArguments) and the data (DataArguments)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from resonance.algorithms.compile_flag import compile_choice
from resonance.algorithms.quantization import quantization_problems
from resonance.data.images import DEFAULT_MAX_IMAGE_PIXELS
from resonance.errors import ConfigError


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Checkpoint folder whose config.json names a supported family."})
    spec_project: str | None = field(
        default=None,
        metadata={
            "help": "Project folder whose specs/ and generated/ adapters serve the checkpoint (the other commands' "
            "--project; train's --project is transformers' Trackio project name). Default: the current folder when "
            "it holds specs/, else the nearest folder above it holding both; with none, the specs packaged with "
            "resonance."
        },
    )
    lora_target_modules: str = field(
        default="auto",
        metadata={
            "help": "'auto' (the spec's default_lora_target), a comma list of leaf names (both restricted "
            "to the language model), or 'none' for full training."
        },
    )
    lora_target_parameters: str = field(
        default="auto",
        metadata={
            "help": "Weights that are no Linear layer, for a mixture-of-experts decoder's 3-D expert weights: "
            "'auto' (the spec's lora.parameters; none for other families), a comma list of name endings (like "
            "mlp.experts.down_proj, under the language model), or 'none'. Through peft's target_parameters; "
            "with --lora_target_modules none (full training) only 'auto' is allowed."
        },
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float | None = field(
        default=None,
        metadata={
            "help": "LoRA dropout. Default 0.05, or 0 where LoRA reaches expert weights (--lora_target_parameters): "
            "peft's LoRA on a parameter has no dropout."
        },
    )
    freeze_vision_tower: bool = field(default=True, metadata={"help": "Freeze the vision tower's weights."})
    compile_layers: str = field(
        default="auto",
        metadata={
            "help": "Compile each decoder layer and vision block in place with torch.compile (one compile per "
            "layer kind, reused by every layer): fuses the small kernels that bound steps on small models; grpo and "
            "ppo generate with the blocks eager. auto: on a CUDA GPU (not with --load_in_4bit/--load_in_8bit), off "
            "on the CPU; true or false. The first steps are slower while it compiles (the time is logged). Pads "
            "batches to a multiple of 8 tokens unless --pad_to_multiple_of says otherwise."
        },
    )
    load_in_4bit: bool = field(
        default=False,
        metadata={
            "help": "QLoRA: load the language model's Linear layers in 4 bits (bitsandbytes; pip install "
            "'resonance[qlora]'; a CUDA GPU) and train LoRA on top; the vision tower, projector and LM head are not "
            "quantised."
        },
    )
    load_in_8bit: bool = field(
        default=False,
        metadata={"help": "As --load_in_4bit, in 8 bits (bitsandbytes' LLM.int8())."},
    )
    bnb_4bit_quant_type: str | None = field(
        default=None,
        metadata={"help": "--load_in_4bit's data type: nf4 (the default, QLoRA's) or fp4."},
    )
    bnb_4bit_compute_dtype: str | None = field(
        default=None,
        metadata={
            "help": "--load_in_4bit's matmul precision: bfloat16, float16 or float32 (default: the run's, from "
            "--bf16/--fp16)."
        },
    )
    bnb_4bit_use_double_quant: bool = field(
        default=False,
        metadata={"help": "--load_in_4bit: quantise the quantisation constants too (about 0.4 bits per weight less)."},
    )

    def __post_init__(self) -> None:
        self.compile_layers = compile_choice(self.compile_layers)
        problems = quantization_problems(vars(self))
        if problems:
            raise ConfigError("; ".join(problems))

    def compiles_layers(self, use_cpu: bool) -> bool:
        """Whether ``resonance train`` compiles the layers: --compile_layers true, or auto on a CUDA GPU with
        unquantised weights."""
        if self.compile_layers != "auto":
            return self.compile_layers == "true"
        import torch

        quantised = self.load_in_4bit or self.load_in_8bit
        return torch.cuda.is_available() and not use_cpu and not quantised


@dataclass
class DataArguments:
    data_path: str = field(
        metadata={
            "help": "Training data: a .jsonl, .json, .parquet, .arrow or .csv file, a folder of them, a save_to_disk "
            "folder, or a dataset name (README, Data)."
        }
    )
    eval_data_path: str | None = field(default=None, metadata={"help": "Optional evaluation data, same kinds."})
    data_format: str = field(
        default="auto",
        metadata={
            "help": "The rows' format (README, Data; `resonance data formats` lists them): auto (recognised from "
            "each row's fields), or a name for rows that fit several."
        },
    )
    data_config: str | None = field(default=None, metadata={"help": "The configuration of a dataset name."})
    data_split: str | None = field(
        default=None, metadata={"help": "The split of a dataset name or save_to_disk folder (default: train)."}
    )
    eval_data_split: str | None = field(
        default=None, metadata={"help": "The split of --eval_data_path (default: --data_split's)."}
    )
    data_revision: str | None = field(default=None, metadata={"help": "The revision of a dataset name."})
    image_root: str | None = field(
        default=None,
        metadata={"help": "The folder relative image paths are resolved against (default: the data file's folder)."},
    )
    allow_image_urls: bool = field(
        default=False,
        metadata={
            "help": "Download http(s) images (once, into the image store in the datasets cache); without it a row "
            "with an image URL is refused."
        },
    )
    skip_invalid_rows: bool = field(
        default=False, metadata={"help": "Skip (and count, in the log) invalid rows instead of failing."}
    )
    skip_long_rows: bool = field(
        default=False, metadata={"help": "Skip (and count) rows longer than --max_length instead of failing."}
    )
    max_image_pixels: int = field(
        default=DEFAULT_MAX_IMAGE_PIXELS,
        metadata={
            "help": "Refuse (or with --skip_invalid_rows skip) a row with an image of more pixels (width x height), "
            "read from the file's header before anything is decoded; 0: no limit."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Train into a non-empty --output_dir (the checkpoint-* folders of an earlier run there are "
            "removed); without it a non-empty --output_dir is refused unless --resume_from_checkpoint is given."
        },
    )


def router_aux_loss_coef_field() -> Any:
    """``--router_aux_loss_coef`` for the trainers of our own (RM, PPO), as TRL's configs have it."""
    return field(
        default=None,
        metadata={
            "help": "Weight of a mixture-of-experts model's router load-balancing loss, added to the loss (as TRL's "
            "trainers add it). None: the spec's moe.aux_loss decides (on: the model config's own coefficient); 0 "
            "turns it off."
        },
    )
