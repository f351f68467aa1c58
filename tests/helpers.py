"""Shared by the parity, label, DPO-loss and train-step tests: images, conversations, references.

Conversations are written once in Resonance's canonical row format (what ``resonance.data.rows`` produces and
the collators consume: image parts ``{"type": "image", "text": None}``) and converted to the format the
family's own HF processor documents (image parts carrying the PIL image) for the reference side.

The references never use Resonance code: :func:`hf_batch` and :func:`expected_supervision` call the HF
processor's ``apply_chat_template`` only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml
from PIL import Image
from transformers import AutoProcessor, BatchFeature, ProcessorMixin

from resonance.base.processor import VLProcessor
from resonance.base.registry import ModelCoreMapper, load_core_mapper
from resonance.patches.video_processor import video_processor_optional

IGNORE_INDEX = -100
IMAGE = object()  # marks an image part in user(...)

Message = dict[str, Any]


# -- images ------------------------------------------------------------------------------------------


def make_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A deterministic RGB image of ``width`` x ``height``; different seeds give different pixels."""
    pixels = bytes(
        (x * (7 + seed) + y * (3 + 2 * seed) + c * 50 + 31 * seed) % 256
        for y in range(height)
        for x in range(width)
        for c in range(3)
    )
    return Image.frombytes("RGB", (width, height), pixels)


def save_png(folder: Path, name: str, image: Image.Image) -> str:
    """Save ``image`` losslessly as ``folder/name`` and return the absolute path."""
    path = folder / name
    image.save(path, format="PNG")
    return str(path.resolve())


def open_rgb(path: str) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


# -- canonical messages ------------------------------------------------------------------------------


def _parts(items: tuple[Any, ...]) -> list[dict[str, str | None]]:
    return [{"type": "image", "text": None} if item is IMAGE else {"type": "text", "text": item} for item in items]


def user(*items: Any) -> Message:
    """A canonical user message; pass :data:`IMAGE` for an image part, strings for text parts."""
    return {"role": "user", "content": _parts(items)}


def assistant(text: str) -> Message:
    return {"role": "assistant", "content": _parts((text,))}


def system(text: str) -> Message:
    return {"role": "system", "content": _parts((text,))}


def count_images(messages: list[Message]) -> int:
    return sum(part["type"] == "image" for message in messages for part in message["content"])


def to_hf(messages: list[Message], images: list[Image.Image], text_as_string: bool = False) -> list[Message]:
    """Canonical messages -> the HF processors' documented format, images placed in their parts.

    ``text_as_string``: messages without images carry their text as a plain string (what templates
    such as Llama 3.2 Vision's expect for the system message; spec chat_template.text_messages: string).
    """
    assert count_images(messages) == len(images), "test bug: image parts and images differ in number"
    pending = iter(images)
    converted = []
    for message in messages:
        content = []
        for part in message["content"]:
            if part["type"] == "image":
                content.append({"type": "image", "image": next(pending)})
            else:
                content.append({"type": "text", "text": part["text"]})
        if text_as_string and all(part["type"] == "text" for part in content):
            converted.append({"role": message["role"], "content": "".join(part["text"] or "" for part in content)})
        else:
            converted.append({"role": message["role"], "content": content})
    return converted


def to_trl(messages: list[Message]) -> list[Message]:
    """Canonical messages -> TRL's conversational format (image parts without data, filled by TRL)."""
    return [
        {
            "role": message["role"],
            "content": [
                {"type": "image"} if part["type"] == "image" else {"type": "text", "text": part["text"]}
                for part in message["content"]
            ],
        }
        for message in messages
    ]


def row_images(tmp_path: Path, row: int, sizes: list[tuple[int, int]]) -> list[str]:
    """Save a row's images (of these (width, height) sizes) as PNGs in ``tmp_path``; absolute paths."""
    return [
        save_png(tmp_path, f"row{row}_img{j}.png", make_image(w, h, seed=10 * row + j))
        for j, (w, h) in enumerate(sizes)
    ]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# -- loading -----------------------------------------------------------------------------------------


def load_adapter(ckpt: Path) -> tuple[ModelCoreMapper, VLProcessor]:
    """The family's adapter and our processor for ``ckpt`` (video processor optional: no torchvision here)."""
    mapper = load_core_mapper(ckpt)
    with video_processor_optional():
        processor = mapper.processor(ckpt)
    return mapper, processor


def load_hf_processor(ckpt: Path) -> ProcessorMixin:
    """A fresh instance of the family's own HF processor, loaded the way transformers documents it.

    Where the checkpoints ship no chat template (InstructBLIP), it gets the prompt format its spec documents
    (chat_template.template of the spec that lists the checkpoint's architecture), read from the YAML.
    """
    with video_processor_optional():
        processor = AutoProcessor.from_pretrained(ckpt)
    if not processor.chat_template:
        architecture = json.loads((Path(ckpt) / "config.json").read_text())["architectures"][0]
        for path in sorted((Path(__file__).resolve().parent.parent / "specs").glob("*.yaml")):
            spec = yaml.safe_load(path.read_text())
            if architecture in spec["architectures"]:
                processor.chat_template = (spec.get("chat_template") or {}).get("template")
    return processor


# -- references (HF only) ----------------------------------------------------------------------------


def hf_batch(
    hf: ProcessorMixin, conversations: list[list[Message]], add_generation_prompt: bool = False
) -> BatchFeature:
    """Tokenize HF-format conversations (images inside) with the HF processor, right padding."""
    return hf.apply_chat_template(
        conversations,
        add_generation_prompt=add_generation_prompt,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs={"padding": True, "padding_side": "right"},
    )


def hf_ids(hf: ProcessorMixin, conversation: list[Message], add_generation_prompt: bool = False) -> list[int]:
    return hf_batch(hf, [conversation], add_generation_prompt)["input_ids"][0].tolist()


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
        before, _ = _collapse_image_runs(hf_ids(hf, conversation[:k], add_generation_prompt=True), image_token_id)
        through, _ = _collapse_image_runs(hf_ids(hf, conversation[: k + 1]), image_token_id)
        # The reconstruction is only meaningful if tokenization is prefix-stable; fail loudly otherwise.
        assert through[: len(before)] == before, f"turn {k}: generation-prompt prefix is not a token prefix"
        assert full_collapsed[: len(through)] == through, f"turn {k}: prefix through the turn is not a token prefix"
        positions = [full_positions[i] for i in range(len(before), len(through))]
        while positions and is_blank_token(hf, full[positions[-1]]):
            positions.pop()
        assert positions, f"turn {k}: no tokens for the assistant answer"
        turns.append(positions)
    return full, turns


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


def takes(processor: VLProcessor, image_counts: list[int]) -> bool:
    """Whether the family takes rows with these numbers of images (spec image.multi_image, image.required)."""
    return all((n > 0 or not processor.images_required) and (n <= 1 or processor.multi_image) for n in image_counts)


def prompt_of(conversation: list[Message], first: int = 0) -> list[Message]:
    """The turns before the first assistant turn at index >= ``first``: what a row's prompt-only inputs
    (spec image.inputs source: prompt) are computed from, rendered with the generation prompt."""
    answer = next((i for i, m in enumerate(conversation) if i >= first and m["role"] == "assistant"), None)
    return conversation if answer is None else conversation[:answer]


def prompt_only_inputs(processor: VLProcessor) -> set[str]:
    return {item.name for item in processor.image_inputs if item.from_prompt}


def supervised_positions(row: torch.Tensor) -> list[int]:
    return (row != IGNORE_INDEX).nonzero().flatten().tolist()


# -- preference rows ---------------------------------------------------------------------------------

PREFERENCE_ROWS: list[tuple[dict[str, list[Message]], list[tuple[int, int]]]] = [
    (
        {
            "prompt": [user(IMAGE, "What colour is it?")],
            "chosen": [assistant("Red.")],
            "rejected": [assistant("It is blue, I think.")],
        },
        [(40, 30)],
    ),
    (
        {
            "prompt": [
                system("You are a helpful assistant."),
                user(IMAGE, "Describe the picture."),
                assistant("A green box on a table."),
                user("Are you sure?"),
            ],
            "chosen": [assistant("Yes, the box is green.")],
            "rejected": [assistant("No.")],
        },
        [(64, 48)],
    ),
    (
        {
            "prompt": [user(IMAGE, IMAGE, "Which picture is brighter?")],
            "chosen": [assistant("The first one.")],
            "rejected": [assistant("The second picture is brighter than the first.")],
        },
        [(40, 30), (50, 50)],
    ),
    (
        {
            "prompt": [user("Answer with a single word. Is the sky blue?")],
            "chosen": [assistant("Yes.")],
            "rejected": [assistant("Maybe, I do not know.")],
        },
        [],
    ),
]


def preference_rows(tmp_path: Path, images_required: bool = False, multi_image: bool = True) -> list[dict[str, Any]]:
    """Canonical preference rows (images as PNG paths in ``tmp_path``).

    ``images_required``: only the rows with images, for a family whose processor needs one in every row
    (spec image.required, ``VLProcessor.images_required``). ``multi_image`` False: only rows with at most
    one image (spec image.multi_image). Refusing the others is checked by the SFT label tests.
    """
    rows = []
    for i, (columns, sizes) in enumerate(PREFERENCE_ROWS):
        assert count_images(columns["prompt"]) == len(sizes)
        if (images_required and not sizes) or (not multi_image and len(sizes) > 1):
            continue
        rows.append({**columns, "images": row_images(tmp_path, i, sizes), "source": f"pref:{i}"})
    return rows


def inference_rows() -> list[tuple[list[Message], list[Image.Image]]]:
    """Two prompts to generate from (a single turn, and a multi-turn one with a system message), with images."""
    return [
        ([user(IMAGE, "What is shown in this image?")], [make_image(40, 30, seed=11)]),
        (
            [
                system("You are a helpful assistant."),
                user(IMAGE, "Describe the picture."),
                assistant("A dog."),
                user("Is there any text in the image? Please read it."),
            ],
            [make_image(100, 72, seed=12)],
        ),
    ]
