"""A family's model (or its PEFT/LoRA wrapper) with a small float32 head: what reward and value models share.

:class:`ScalarHeadModel` owns the wrapped model and a ``nn.Linear(hidden, 1)`` head, and saves and reloads the
pair: the backbone as ``save_pretrained`` writes it (full weights or the LoRA adapter), the head as a
safetensors file and a JSON description naming the format and the checkpoint's class. Subclasses say which
files, which attribute holds the head and which ``core_mapper`` slot serves the family, and add ``forward``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from resonance.base.model import VLModel, unwrap
from resonance.base.registry import load_core_mapper, read_json_object
from resonance.errors import CheckpointError


class ScalarHeadModel(nn.Module):
    """The wrapped model (``self.model``) and a scalar head (the attribute named by ``head_attribute``).

    Generated adapters subclass the concrete classes with ``vl_model`` set; otherwise pass ``vl_model=``.
    """

    vl_model: ClassVar[type[VLModel] | None] = None
    head_attribute: ClassVar[str]  # the head's attribute name (the key prefix in state dicts)
    head_file: ClassVar[str]  # safetensors file of the head, in the saved folder
    config_file: ClassVar[str]  # JSON description, in the saved folder
    file_format: ClassVar[str]  # the description's "format"
    mapper_slot: ClassVar[str]  # the core_mapper field holding the family's subclass
    what: ClassVar[str]  # how messages name it ("reward model")

    def __init__(self, model: nn.Module, vl_model: type[VLModel] | None = None, head: nn.Linear | None = None):
        super().__init__()
        self.family = vl_model or type(self).vl_model
        if self.family is None:
            raise TypeError(
                f"{type(self).__name__} needs the family's VLModel class: pass vl_model= or use the adapter's class"
            )
        self.model = model
        hidden_size = unwrap(model).config.get_text_config().hidden_size
        if head is None:
            head = nn.Linear(hidden_size, 1)
            nn.init.normal_(head.weight, std=1.0 / (hidden_size + 1) ** 0.5)
            nn.init.zeros_(head.bias)
        if head.in_features != hidden_size or head.out_features != 1:
            raise ValueError(f"{self.what} head is {head.in_features}->{head.out_features}, expected {hidden_size}->1")
        setattr(self, self.head_attribute, head.float())

    @property
    def head(self) -> nn.Linear:
        return getattr(self, self.head_attribute)

    # -- the wrapped model ---------------------------------------------------------------------------

    def get_base_model(self) -> nn.Module:
        """The transformers model (under PEFT), so ``resonance.base.model.unwrap`` and the spec paths reach it."""
        return unwrap(self.model)

    @property
    def config(self) -> Any:
        return unwrap(self.model).config

    @property
    def is_lora(self) -> bool:
        return hasattr(self.model, "peft_config")

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        """As the wrapped model's (Trainer passes transformers' own options, e.g. ``every_n_layers``)."""
        base = unwrap(self.model)
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=activation_checkpointing_kwargs, **kwargs)
        if self.is_lora:  # frozen embeddings: checkpointed blocks need an input that requires grad
            base.enable_input_require_grads()

    def activation_checkpointing_disable(self) -> None:
        unwrap(self.model).activation_checkpointing_disable()

    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        """transformers' name before 5.25, which TRL still calls."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def gradient_checkpointing_disable(self) -> None:
        self.activation_checkpointing_disable()

    # -- save / load ---------------------------------------------------------------------------------

    def description(self) -> dict[str, Any]:
        """What the JSON description records; subclasses add their fields."""
        return {
            "format": self.file_format,
            "version": 1,
            "hf_model_class": self.family.hf_model_class,
            "backbone": "lora" if self.is_lora else "full",
            "hidden_size": self.head.in_features,
            "head": self.head_file,
        }

    def save_pretrained(
        self, output_dir: str | Path, state_dict: dict[str, torch.Tensor] | None = None, **save_kwargs: Any
    ) -> None:
        """The backbone (full weights, or the LoRA adapter), the head file and the JSON description.

        ``state_dict``: this model's whole state (``model.`` and head keys), where the live weights are shards
        (FSDP: what the Trainer gathered); ``save_kwargs`` go to the backbone's ``save_pretrained`` (e.g. PEFT's
        ``selected_adapters``)."""
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        if state_dict is None:
            self.model.save_pretrained(str(output_dir), **save_kwargs)
            head = self.head.state_dict()
        else:
            backbone = {k.removeprefix("model."): v for k, v in state_dict.items() if k.startswith("model.")}
            self.model.save_pretrained(str(output_dir), state_dict=backbone, **save_kwargs)
            prefix = self.head_attribute + "."
            head = {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}
        state = {k: v.detach().cpu().contiguous() for k, v in head.items()}
        save_file(state, output_dir / self.head_file)
        (output_dir / self.config_file).write_text(json.dumps(self.description(), indent=2) + "\n")

    def load_backbone(self, path: str | Path) -> None:
        """Load full backbone weights saved by :meth:`save_pretrained` (not a LoRA adapter) into this model."""
        base = unwrap(self.model)
        loaded = self.family.from_pretrained(path, dtype=base.dtype)
        base.load_state_dict(loaded.state_dict())

    def load_head(self, path: str | Path) -> None:
        """Load the head file from a folder written by :meth:`save_pretrained`."""
        state = load_file(str(Path(path) / self.head_file))
        self.head.load_state_dict({k: v.to(self.head.weight.device) for k, v in state.items()})

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs: Any) -> ScalarHeadModel:
        """Reload a folder written by :meth:`save_pretrained` (``kwargs`` go to the model's ``from_pretrained``).

        The class is the family's adapter subclass where the ``core_mapper`` has one, else ``cls``.
        """
        path = Path(path)
        config_file = path / cls.config_file
        if not config_file.is_file():
            raise CheckpointError(f"{config_file}: not found; not a {cls.what} saved by Resonance")
        description = read_json_object(config_file)
        if description.get("format") != cls.file_format:
            raise CheckpointError(f"{config_file}: format {description.get('format')!r}, expected {cls.file_format!r}")
        mapper = load_core_mapper(path)
        vl_model = cls.vl_model or mapper.model
        if vl_model.hf_model_class != description.get("hf_model_class"):
            raise CheckpointError(
                f"{config_file}: a {description.get('hf_model_class')} {cls.what}, not {vl_model.hf_model_class}"
            )
        model_cls = cls if cls.vl_model is not None else (getattr(mapper, cls.mapper_slot) or cls)
        model = model_cls(vl_model.from_pretrained(path, **kwargs), vl_model=vl_model)
        model.load_head(path)
        return model
