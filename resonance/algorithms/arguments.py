"""The flags every ``resonance train X`` shares: the model and LoRA (ModelArguments) and the data (DataArguments)."""

from __future__ import annotations

from dataclasses import dataclass, field

from resonance.data.images import DEFAULT_MAX_IMAGE_PIXELS


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
