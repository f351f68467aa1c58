"""Conversations in Resonance's canonical row format, and their conversions.

Conversations are written once in the canonical format (what ``resonance.data.rows`` produces and the collators
consume: image parts ``{"type": "image", "text": None}``) and converted to the format the family's own HF
processor documents (:func:`to_hf`, image parts carrying the PIL image), to TRL's (:func:`to_trl`), or to the
message lists users write in data files (:func:`to_user_format`).
"""

from __future__ import annotations

from typing import Any

from PIL import Image

IMAGE = object()  # marks an image part in user(...)

Message = dict[str, Any]


def _parts(items: tuple[Any, ...]) -> list[dict[str, str | None]]:
    return [{"type": "image", "text": None} if item is IMAGE else {"type": "text", "text": item} for item in items]


def user(*items: Any) -> Message:
    """A canonical user message; pass :data:`IMAGE` for an image part, strings for text parts."""
    return {"role": "user", "content": _parts(items)}


def assistant(text: str) -> Message:
    return {"role": "assistant", "content": _parts((text,))}


def system(text: str) -> Message:
    return {"role": "system", "content": _parts((text,))}


def has_system(messages: list[Message]) -> bool:
    return any(message["role"] == "system" for message in messages)


def without_system(messages: list[Message], takes_system: bool = False) -> list[Message]:
    """``messages`` without their system messages, unless ``takes_system`` (the family takes one: spec
    chat_template.system); the shared rows keep their other turns for a family whose template refuses one."""
    return list(messages) if takes_system else [message for message in messages if message["role"] != "system"]


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


def to_text(message: Message, placeholder: str = "<image>\n") -> str:
    """A canonical message's content as users write it in a string: ``placeholder`` for each image part."""
    return "".join(placeholder if part["type"] == "image" else part["text"] for part in message["content"])


def to_user_format(messages: list[Message]) -> list[dict[str, str]]:
    """Canonical messages -> the message list users write in data files: each ``content`` a string, with an
    ``<image>`` placeholder for each image part."""
    return [{"role": message["role"], "content": to_text(message)} for message in messages]


def prompt_of(conversation: list[Message], first: int = 0) -> list[Message]:
    """The turns before the first assistant turn at index >= ``first``: what a row's prompt-only inputs
    (spec image.inputs source: prompt) are computed from, rendered with the generation prompt."""
    answer = next((i for i, m in enumerate(conversation) if i >= first and m["role"] == "assistant"), None)
    return conversation if answer is None else conversation[:answer]
