"""The reference side: each family's own HF processor, and the adapter under test loaded the way users load it.

The references never use Resonance code: :func:`hf_batch` and :func:`expected_supervision` call the HF
processor's ``apply_chat_template`` only (on conversations converted with ``helpers.messages.to_hf``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import AutoImageProcessor, AutoProcessor, BatchFeature, ProcessorMixin
from trl.chat_template_utils import get_training_chat_template

from helpers.messages import Message
from helpers.repo import REPO
from resonance.base.processor import VLProcessor
from resonance.base.registry import ModelCoreMapper, load_core_mapper

IGNORE_INDEX = -100


# -- loading -----------------------------------------------------------------------------------------


def load_adapter(ckpt: Path) -> tuple[ModelCoreMapper, VLProcessor]:
    """The family's adapter and our processor for ``ckpt``."""
    mapper = load_core_mapper(ckpt)
    return mapper, mapper.processor(ckpt)


def _raw_spec(ckpt: Path) -> dict[str, Any]:
    """The YAML of the spec that lists the checkpoint's architecture, read as plain data (no Resonance code)."""
    architecture = json.loads((Path(ckpt) / "config.json").read_text())["architectures"][0]
    for path in sorted((REPO / "specs").glob("*.yaml")):
        spec = yaml.safe_load(path.read_text())
        if architecture in spec["architectures"]:
            return spec
    raise AssertionError(f"no spec in specs/ lists {architecture}")


def with_template(ckpt: Path, template: str) -> tuple[ModelCoreMapper, type[VLProcessor]]:
    """The adapter for ``ckpt`` and its processor class rendering with ``template`` (as a spec's inline template
    does): template-dependent behaviour tested on an existing tiny family."""
    mapper, processor = load_adapter(ckpt)
    return mapper, type(type(processor).__name__, (type(processor),), {"inline_chat_template": template})


def expected_lora_layers(model: torch.nn.Module, vl_model: Any) -> set[str]:
    """The module names (of the transformers ``model``) where LoRA auto must put a layer: the language model's
    modules named like the spec's lora.targets, and for its lora.parameters (3-D expert weights) each module that
    holds them, once per such parameter (peft wraps the owner once per parameter, nesting the earlier wrapper as
    ``.base_layer``)."""
    prefix = vl_model.language_model_path + "."
    names = {
        n
        for n, _ in model.named_modules()
        if n.startswith(prefix) and n.rsplit(".", 1)[-1] in vl_model.default_lora_target
    }
    owners: dict[str, int] = {}
    # the parameters by their names before peft (which wraps their owners, adding .base_layer)
    plain = {name.replace(".base_layer", "") for name, _ in model.named_parameters() if ".lora_" not in name}
    for name in sorted(plain):
        if name.startswith(prefix) and any(name.endswith("." + p) for p in vl_model.default_lora_parameters):
            owner = name.rsplit(".", 1)[0]
            owners[owner] = owners.get(owner, 0) + 1
    for owner, count in owners.items():
        names |= {owner + ".base_layer" * nested for nested in range(count)}
    return names


def load_hf_processor(ckpt: Path) -> ProcessorMixin:
    """A fresh instance of the family's own HF processor, loaded the way transformers documents it.

    Where the checkpoints ship no chat template (InstructBLIP), it gets the prompt format its spec documents
    (chat_template.template). Where the spec names an image processor backend (image.processor_backend), the
    image processor is that backend's, as in ours: both sides then run the same image processor class.
    """
    spec = _raw_spec(ckpt)
    processor = AutoProcessor.from_pretrained(ckpt)
    backend = spec["image"].get("processor_backend")
    if backend is not None:
        processor.image_processor = AutoImageProcessor.from_pretrained(ckpt, backend=backend)
    if not processor.chat_template:
        processor.chat_template = (spec.get("chat_template") or {}).get("template")
    stop_token = (spec.get("chat_template") or {}).get("stop_token")
    if stop_token is not None:
        processor.chat_template = with_stop_token(processor.chat_template, stop_token)
    # read by expected_supervision: the template writes every image before the first turn
    processor.images_lead = (spec.get("chat_template") or {}).get("images") == "leading"
    # read by hf_batch: training conversations render with TRL's training variant of the template
    if (spec.get("chat_template") or {}).get("training") == "trl":
        processor.training_chat_template = get_training_chat_template(processor) or processor.chat_template
    return processor


def with_stop_token(template: str, stop_token: str) -> str:
    """The template as a family with chat_template.stop_token is trained on: a conversation that ends with an
    answer ends with the stop token (mid-conversation, the next turn's marker already follows each answer)."""
    ending = "{%- if not add_generation_prompt and messages and messages[-1]['role'] == 'assistant' %}"
    return template + ending + stop_token + "{%- endif %}"


# -- references (HF only) ----------------------------------------------------------------------------


def hf_batch(
    hf: ProcessorMixin,
    conversations: list[list[Message]],
    add_generation_prompt: bool = False,
    training: bool | None = None,
) -> BatchFeature:
    """Tokenize HF-format conversations (images inside) with the HF processor, right padding. ``training`` (default:
    without a generation prompt) renders with the training template where the spec names one (training: trl)."""
    training = not add_generation_prompt if training is None else training
    template = getattr(hf, "training_chat_template", None) if training else None
    return hf.apply_chat_template(
        conversations,
        add_generation_prompt=add_generation_prompt,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs={"padding": True, "padding_side": "right"},
        **({"chat_template": template} if template else {}),
    )


def hf_ids(
    hf: ProcessorMixin, conversation: list[Message], add_generation_prompt: bool = False, training: bool | None = None
) -> list[int]:
    return hf_batch(hf, [conversation], add_generation_prompt, training)["input_ids"][0].tolist()


def is_blank_token(hf: ProcessorMixin, token_id: int) -> bool:
    return not hf.tokenizer.decode([token_id]).strip()


def _collapse_image_runs(ids: list[int], image_token_id: int | None) -> tuple[list[int], list[int]]:
    """``ids`` with every run of consecutive image tokens shortened to one, and each kept token's index."""
    kept: list[int] = []
    positions: list[int] = []
    for index, token in enumerate(ids):
        if token == image_token_id and index > 0 and ids[index - 1] == image_token_id:
            continue
        kept.append(token)
        positions.append(index)
    return kept, positions


def expected_supervision(
    hf: ProcessorMixin, conversation: list[Message], first: int = 0
) -> tuple[list[int], list[list[int]]]:
    """Token ids of the HF-format ``conversation`` and, per assistant turn at index >= ``first``, the
    positions that must be supervised.

    Turn k's positions run from the length of the prefix tokenized with the generation prompt
    (``conversation[:k]``) to the length of the prefix through turn k (``conversation[:k + 1]``), minus
    trailing whitespace-only tokens. Each prefix is tokenized by the HF processor, images included.

    Lengths are counted with each run of image tokens as one token: some processors expand an image into
    a number of tokens that depends on the images later in the conversation (LLaVA-OneVision tiles a lone
    image, but gives each of several images one tile), so a prefix's image runs may differ in length from
    the full conversation's. Every other token must still be a prefix.
    """
    full = hf_ids(hf, conversation)
    image_token_id = getattr(hf, "image_token_id", None)
    full_collapsed, full_positions = _collapse_image_runs(full, image_token_id)
    turns = []
    for k, message in enumerate(conversation):
        if message["role"] != "assistant" or k < first:
            continue
        before_ids = hf_ids(hf, _prefix(hf, conversation, k), add_generation_prompt=True, training=True)
        before, _ = _collapse_image_runs(before_ids, image_token_id)
        through, _ = _collapse_image_runs(hf_ids(hf, _prefix(hf, conversation, k + 1)), image_token_id)
        # The reconstruction is only meaningful if tokenization is prefix-stable; fail loudly otherwise.
        assert full_collapsed[: len(through)] == through, f"turn {k}: prefix through the turn is not a token prefix"
        end = len(through)
        while end and is_blank_token(hf, through[end - 1]):
            end -= 1
        if through[: len(before)] == before:
            start = len(before)
        else:  # the history opens the turn otherwise than the generation prompt (Molmo2): the answer's own tokens
            start = _answer_start(hf, through[:end], message)
        positions = [full_positions[i] for i in range(start, end)]
        assert positions, f"turn {k}: no tokens for the assistant answer"
        turns.append(positions)
    return full, turns


def _prefix(hf: ProcessorMixin, conversation: list[Message], length: int) -> list[Message]:
    """The first ``length`` messages; for a template that writes every image first, with the later messages' image
    parts added to the last user message (so the prefix starts as the whole conversation does)."""
    prefix = [dict(m) for m in conversation[:length]]
    if not getattr(hf, "images_lead", False):
        return prefix
    later = [p for m in conversation[length:] if not isinstance(m["content"], str) for p in m["content"]]
    later = [p for p in later if p["type"] == "image"]
    users = [m for m in prefix if m["role"] == "user"]
    if later and users:  # after the prefix's own images: the processor takes them in the order of their parts
        users[-1]["content"] = list(users[-1]["content"]) + later
    return prefix


def _answer_start(hf: ProcessorMixin, ids: list[int], message: Message) -> int:
    """Where the tokens at the end of ``ids`` that decode to the answer (and the stop token the test template
    writes after a last answer) start."""
    text = "".join(p["text"] for p in message["content"] if p["type"] == "text")
    for start in range(len(ids) - 1, -1, -1):
        tail = hf.tokenizer.decode(ids[start:])
        if tail.startswith(text):
            return start
    raise AssertionError(f"the answer {text!r} does not end its prefix's tokens")


def repeat_images(batch: dict[str, Any], processor: VLProcessor) -> dict[str, Any]:
    """Our DPO batch in TRL's layout: the prompt images repeated for chosen and rejected.

    Every image input (per_image, per_row, per_patch) and the grid (e.g. image_grid_thw) are
    concatenated with themselves along the first axis, as TRL's collator does by processing
    ``images * 2``.
    """
    names = set(processor.image_input_names())
    if processor.image_grid_input:
        names.add(processor.image_grid_input)
    return {k: (torch.cat([v, v]) if k in names else v) for k, v in batch.items()}


def takes(processor: VLProcessor, image_counts: list[int], system: bool = False) -> bool:
    """Whether the family takes rows with these numbers of images (spec image.multi_image, image.required), and
    with a system message where ``system`` (spec chat_template.system)."""
    if system and not processor.takes_system:
        return False
    return all((n > 0 or not processor.images_required) and (n <= 1 or processor.multi_image) for n in image_counts)


def takes_system(ckpt: Path) -> bool:
    """Whether the family of ``ckpt`` takes a system message (spec chat_template.system), for the shared rows."""
    return load_core_mapper(ckpt).processor.takes_system


def prompt_only_inputs(processor: VLProcessor) -> set[str]:
    return {item.name for item in processor.image_inputs if item.from_prompt}


def supervised_positions(row: torch.Tensor) -> list[int]:
    return (row != IGNORE_INDEX).nonzero().flatten().tolist()


def our_inference_batch(ckpt: Path) -> tuple[VLProcessor, ProcessorMixin, list[tuple[list[Message], list[Any]]], Any]:
    """Our processor in inference mode on :func:`helpers.rows.inference_rows` (generation prompts, left padding):
    ``(processor, the family's HF processor, the rows, our batch)``, for a comparison with the HF side."""
    from helpers.rows import inference_rows

    _, processor = load_adapter(ckpt)
    hf = load_hf_processor(ckpt)
    rows = inference_rows(processor.takes_system)
    processor.infer()
    texts = [processor.render_conversation(m, add_generation_prompt=True) for m, _ in rows]
    return processor, hf, rows, processor(text=texts, images=[list(images) for _, images in rows])
