"""VLModel: where a family keeps its vision tower and language model, and how to load and adapt it."""

from __future__ import annotations

import importlib.util
import inspect
import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

import torch
import transformers
from torch import nn
from transformers import PreTrainedConfig
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from resonance.base.checks import module_problems, raise_problems
from resonance.base.registry import base_model_checkpoint, check_weights, lora_base_checkpoint, read_json_object
from resonance.errors import CheckpointError
from resonance.patches import input_grad_hooks
from resonance.patches.vision_attention import install_batched_vision_attention

logger = logging.getLogger("resonance")


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under PEFT and distributed wrappers."""
    while True:
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        else:
            return model


def get_submodule(model: nn.Module, path: str, field: str) -> nn.Module:
    """``model.<path>``, with an error naming the spec field when the path does not exist."""
    try:
        return unwrap(model).get_submodule(path)
    except AttributeError as exc:
        raise AttributeError(f"spec field {field}: {type(unwrap(model)).__name__} has no submodule {path!r}") from exc


ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


_KERNEL_SUPPORT = {"sdpa": "_supports_sdpa", "flash_attention_2": "_supports_flash_attn"}


def per_submodel(config: PreTrainedConfig, choice: str) -> str | dict[str, str]:
    """``choice`` of attention for the model, and eager for each sub-model whose class has no such kernel (Gemma 4's
    audio tower has no sdpa): given one name, transformers asks every sub-model for it and refuses the whole model.
    A dict keyed by sub-config name is transformers' own way to choose per sub-model."""
    flag = _KERNEL_SUPPORT.get(choice)
    eager = [
        name
        for name in config.sub_configs
        if flag
        and (sub := getattr(config, name, None)) is not None
        and type(sub) in MODEL_MAPPING
        and not getattr(MODEL_MAPPING[type(sub)], flag, True)
    ]
    return {"": choice, **dict.fromkeys(eager, "eager")} if eager else choice


def _load(model_class: type, folder: Path, kwargs: dict[str, Any]) -> nn.Module:
    """``model_class.from_pretrained(folder)``; a folder whose config or weights are broken is a CheckpointError
    naming the file, found before transformers reads it (and from transformers' own error otherwise)."""
    from safetensors import SafetensorError

    read_json_object(folder / "config.json")
    check_weights(folder)
    input_grad_hooks.install()  # a transformers bug that adds an embedding hook each time checkpointing is switched on
    # transformers 5.25 turns hub kernels on by default where the kernels package is installed (it depends on it): each
    # later model.train() or .eval() on a GPU then fetches layer code from the Hub and runs it. Nobody asked for that
    # code, and offline the fetch fails mid-step. Resonance's own compiled layers (--compile_layers) need none of it.
    kwargs = {"use_kernels": False, **kwargs}
    try:
        if isinstance(kwargs.get("attn_implementation"), str):
            config = model_class.config_class.from_pretrained(str(folder))
            kwargs = {**kwargs, "attn_implementation": per_submodel(config, kwargs["attn_implementation"])}
        return model_class.from_pretrained(str(folder), **kwargs)
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"{folder}: cannot load the model: {exc}") from exc


def no_hub_kernels(model: nn.Module) -> None:
    """Turn hub kernels off in a model that was loaded elsewhere with transformers' default (on where the kernels
    package is installed: see :func:`_load`), putting its layers' own forwards back."""
    if getattr(model, "use_kernels", False):
        model.use_kernels = False


def cast_vision_inputs(tower: nn.Module) -> None:
    """Floating-point inputs reach the vision tower in its weights' dtype. Most towers cast them themselves; Llama
    4's does not, and its image processor returns bfloat16 pixel values whatever the model's dtype (as the original
    implementation did). Idempotent."""
    if getattr(tower, "_resonance_casts_inputs", False):
        return

    def cast(
        module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        dtype = next(module.parameters()).dtype

        def to(value: Any) -> Any:
            return value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value

        return tuple(to(a) for a in args), {k: to(v) for k, v in kwargs.items()}

    tower.register_forward_pre_hook(cast, with_kwargs=True)
    tower._resonance_casts_inputs = True


class VLModel:
    """Class-level adapter for one model family; it never wraps or subclasses the HF model.

    Subclasses (generated from specs) set the class attributes below.
    """

    hf_model_class: ClassVar[str]
    trust_remote_code: ClassVar[bool] = False
    language_model_path: ClassVar[str]
    vision_tower_path: ClassVar[str]
    projector_path: ClassVar[str | None] = None
    default_lora_target: ClassVar[list[str]]
    default_lora_parameters: ClassVar[list[str]] = []  # spec lora.parameters: expert weights, by name ending
    router_paths: ClassVar[list[str]] = []  # spec moe.router: the routers' module path endings
    router_aux_loss: ClassVar[bool] = False  # spec moe.aux_loss
    default_generation_kwargs: ClassVar[dict[str, Any]] = {"max_new_tokens": 1024, "do_sample": False}
    supports_flash_attention: ClassVar[bool] = False
    position_ids_kind: ClassVar[str] = "1d"
    shares_prompt: ClassVar[bool] = True  # spec shared_prompt: chosen and rejected may share one prompt row
    batched_vision_attention: ClassVar[bool] = False  # spec image.batched_attention
    image_features_input: ClassVar[str | None] = None  # spec image.features_input

    @classmethod
    def attention_implementation(cls) -> str:
        """flash_attention_2 where the spec allows it and flash_attn is usable, else sdpa."""
        if (
            cls.supports_flash_attention
            and torch.cuda.is_available()
            and importlib.util.find_spec("flash_attn") is not None
        ):
            choice, why = "flash_attention_2", "the spec declares support and flash_attn is installed"
        elif cls.supports_flash_attention:
            choice, why = "sdpa", "flash_attn is not installed or no CUDA device is present"
        else:
            choice, why = "sdpa", f"the {cls.hf_model_class} spec does not declare flash-attention support"
        logger.info("attention implementation: %s (%s)", choice, why)
        return choice

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs: Any) -> nn.Module:
        """Load the checkpoint (or a LoRA output folder: base model + adapter) with this family's class."""
        path = Path(path)
        kwargs.setdefault("attn_implementation", cls.attention_implementation())
        kwargs.setdefault("trust_remote_code", cls.trust_remote_code)
        model_class = getattr(transformers, cls.hf_model_class)
        base_path = lora_base_checkpoint(path)
        if base_path is not None:
            from peft import PeftModel

            check_weights(path, ADAPTER_WEIGHTS)
            if lora_base_checkpoint(base_path) is not None:  # trained from another LoRA output: that one, merged
                base_model_checkpoint(path)  # a chain that goes round in a circle fails here, naming it
                base = cls.from_pretrained(base_path, **kwargs).merge_and_unload()
            else:
                base = _load(model_class, base_path, kwargs)
                cls.check_model(base)
                cls.batch_vision_attention(base)
                cast_vision_inputs(cls.get_vision_tower(base))
            return PeftModel.from_pretrained(base, str(path))
        model = _load(model_class, path, kwargs)
        cls.check_model(model)
        cls.batch_vision_attention(model)
        cast_vision_inputs(cls.get_vision_tower(model))
        return model

    @classmethod
    def batch_vision_attention(cls, *models: nn.Module | None) -> None:
        """Where the spec says so (image.batched_attention), run each model's vision tower's per-segment attention
        as one batched sdpa call (:mod:`resonance.patches.vision_attention`); idempotent, Nones skipped. Loading
        does it, and each trainer again for a model it is given built elsewhere."""
        if cls.batched_vision_attention:
            for model in models:
                if model is not None:
                    install_batched_vision_attention(cls.get_vision_tower(unwrap(model)))

    @classmethod
    def check_model(cls, model: nn.Module) -> None:
        """Raise :class:`SpecMismatchError` naming each spec field (modules, lora.targets) the model does not fit."""
        raise_problems(cls, module_problems(cls, unwrap(model)))

    @classmethod
    def get_language_model(cls, model: nn.Module) -> nn.Module:
        return get_submodule(model, cls.language_model_path, "modules.language_model")

    @classmethod
    def get_vision_tower(cls, model: nn.Module) -> nn.Module:
        """The image encoder (spec ``modules.vision_tower``)."""
        return get_submodule(model, cls.vision_tower_path, "modules.vision_tower")

    @classmethod
    def get_projector(cls, model: nn.Module) -> nn.Module | None:
        if cls.projector_path is None:
            return None
        return get_submodule(model, cls.projector_path, "modules.projector")

    @classmethod
    def freeze_vision_tower(cls, model: nn.Module) -> None:
        """Stop gradients into the vision tower's weights (--freeze_vision_tower True)."""
        cls.get_vision_tower(model).requires_grad_(False)

    @classmethod
    def image_encoder_frozen(cls, model: nn.Module) -> bool:
        """True when no weight that may encode images is trained: every trainable parameter is in the
        language model or the LM head. Stricter than "tower and projector frozen" on purpose: some
        families keep image weights elsewhere (LLaVA-NeXT's ``image_newline``)."""
        language_model = cls.language_model_path + "."
        for name, parameter in unwrap(model).named_parameters():
            if parameter.requires_grad and not (name.startswith(language_model) or name.startswith("lm_head.")):
                return False
        return True

    @classmethod
    def reuses_image_features(cls, model: nn.Module) -> bool:
        """Whether the model takes precomputed image features: transformers' ``mm_encoder_outputs``, or
        the forward argument named by spec ``image.features_input`` (Mllama's ``cross_attention_states``).

        Families with neither run the tower inside ``forward`` as usual.
        """
        base = unwrap(model)
        forward = inspect.signature(type(base).forward).parameters
        if cls.image_features_input is not None:
            return cls.image_features_input in forward
        return hasattr(base, "get_image_features") and "mm_encoder_outputs" in forward

    @classmethod
    def encode_images(cls, model: nn.Module, image_inputs: dict[str, Any]) -> torch.Tensor:
        """``projector(vision_tower(**image_inputs).last_hidden_state)``: what ``image.features_input`` takes."""
        features = cls.get_vision_tower(model)(**image_inputs).last_hidden_state
        projector = cls.get_projector(model)
        return features if projector is None else projector(features)

    @classmethod
    def prepare_default_generation_kwargs(cls, generation_config: Any = None) -> dict[str, Any]:
        """Default generation kwargs (spec ``generation``), filled with the model's special token ids."""
        kwargs = dict(cls.default_generation_kwargs)
        if generation_config is not None:
            for key in ("eos_token_id", "pad_token_id", "bos_token_id"):
                value = getattr(generation_config, key, None)
                if value is not None:
                    kwargs.setdefault(key, value)
        return kwargs

    @classmethod
    def unquantized_modules(cls) -> list[str]:
        """The modules ``--load_in_4bit``/``--load_in_8bit`` leave unquantised, as transformers'
        ``BitsAndBytesConfig.llm_int8_skip_modules`` reads them (each a regex matched from a module name's start, or
        a name suffix): the vision tower, the projector, and the LM head by name, then every other module outside
        the language model (InstructBLIP's ``language_projection``, say), so only the language model is quantised.
        ``lm_head`` is a suffix too: families whose language model holds its own head (InstructBLIP) keep it."""
        kept = [cls.vision_tower_path, cls.projector_path, "lm_head"]
        outside_language_model = rf"(?!{re.escape(cls.language_model_path)}\.).*"
        return [re.escape(path) for path in kept if path is not None] + [outside_language_model]

    @classmethod
    def lora_target_parameters(cls, model: nn.Module, endings: list[str]) -> list[str]:
        """The full names of the language model's parameters whose names end with one of ``endings`` (spec
        lora.parameters: 3-D expert weights), for PEFT's ``target_parameters``. PEFT matches its entries as name
        endings over the whole model; full names keep them to the language model, as target_modules are."""
        return cls._language_model_names(unwrap(model).named_parameters(), endings)

    @classmethod
    def router_modules(cls, model: nn.Module) -> list[str]:
        """The names of the language model's routers (spec moe.router), as ``named_modules`` gives them."""
        return cls._language_model_names(unwrap(model).named_modules(), cls.router_paths)

    @classmethod
    def _language_model_names(cls, named: Iterable[tuple[str, Any]], endings: Iterable[str]) -> list[str]:
        """The names in ``named`` under the language model that end with one of ``endings`` (dotted paths)."""
        prefix = cls.language_model_path + "."
        suffixes = tuple("." + ending for ending in endings)
        return [name for name, _ in named if name.startswith(prefix) and name.endswith(suffixes)]

    @classmethod
    def lora_target_modules(cls, names: list[str]) -> str:
        """A PEFT ``target_modules`` regex that matches ``names`` only under the language model.

        Leaf names such as ``q_proj`` also occur in vision towers, so they are anchored to the
        language model's path instead of being matched by suffix.
        """
        for name in names:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise ValueError(f"LoRA target {name!r} is not a module leaf name like q_proj")
        prefix = re.escape(cls.language_model_path)
        return rf"{prefix}\..*\.({'|'.join(sorted(set(names)))})"
