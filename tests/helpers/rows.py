"""The rows the tests share: THE preference rows, the SFT cases, inference prompts, and the data files written
from them.

Rows are written once as canonical conversations (``helpers.messages``). The collator tests take them as
canonical rows with PNG paths (:func:`preference_rows`, :func:`sft_rows`); the training, generation and
command tests read them from a data file in the formats users write (:func:`write_data`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from helpers.images import make_image, row_images, save_png
from helpers.messages import (
    IMAGE,
    Message,
    assistant,
    count_images,
    system,
    to_text,
    to_user_format,
    user,
    without_system,
)

# -- preference rows ---------------------------------------------------------------------------------

# (columns, image sizes) per row: a single-image single-turn pair, a multi-turn prompt with a system message,
# two images in one turn, and a text-only pair.
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


def preference_rows(
    tmp_path: Path, images_required: bool = False, multi_image: bool = True, takes_system: bool = True
) -> list[dict[str, Any]]:
    """Canonical preference rows (images as PNG paths in ``tmp_path``).

    ``images_required``: only the rows with images, for a family whose processor needs one in every row
    (spec image.required, ``VLProcessor.images_required``). ``multi_image`` False: only rows with at most
    one image (spec image.multi_image). ``takes_system`` False: the multi-turn prompt without its system message, for
    a family whose template takes none (spec chat_template.system, ``VLProcessor.takes_system``). Refusing the
    others is checked by the SFT label tests.
    """
    rows = []
    for i, (columns, sizes) in enumerate(PREFERENCE_ROWS):
        assert count_images(columns["prompt"]) == len(sizes)
        if (images_required and not sizes) or (not multi_image and len(sizes) > 1):
            continue
        prompt = without_system(columns["prompt"], takes_system)
        rows.append({**columns, "prompt": prompt, "images": row_images(tmp_path, i, sizes), "source": f"pref:{i}"})
    return rows


# -- SFT conversations -------------------------------------------------------------------------------

# (messages, image sizes) per row of a batch: the label and length tests' cases.
SFT_CASES: dict[str, list[tuple[list[Message], list[tuple[int, int]]]]] = {
    "single_turn": [([user(IMAGE, "What is shown in this image?"), assistant("A cat on a red chair.")], [(40, 30)])],
    "multi_turn": [
        (
            [
                user(IMAGE, "Describe the picture in detail."),
                assistant("There is a dog and a person walking in the park."),
                user("What color is the dog?"),
                assistant("The dog is brown."),
                user("Is it a sunny day?"),
                assistant("Yes."),
            ],
            [(64, 48)],
        )
    ],
    "system": [
        (
            [
                system("You are a helpful assistant."),
                user(IMAGE, "How many people are in the photo?"),
                assistant("Two people."),
            ],
            [(40, 30)],
        )
    ],
    "padded_batch": [
        ([user(IMAGE, "What color is the car?"), assistant("Blue.")], [(40, 30)]),
        (
            [user(IMAGE, "Where was this photo taken?"), assistant("On a beach with white sand and a few boats.")],
            [(64, 48)],
        ),
        ([user(IMAGE, "Any text?"), assistant("Yes."), user("What does it say?"), assistant("Open.")], [(50, 50)]),
    ],
    "text_only_mixed": [
        ([user("Answer with a single word. Yes or no?"), assistant("Yes.")], []),
        ([user(IMAGE, "What is shown in this image?"), assistant("A small house.")], [(64, 48)]),
    ],
    "two_images": [
        (
            [
                user(IMAGE, "What is shown in this image?"),
                assistant("A cat."),
                user(IMAGE, "And in this one?"),
                assistant("A dog in the park."),
            ],
            [(64, 48), (40, 30)],
        )
    ],
}


def sft_rows(
    folder: Path, items: list[tuple[list[Message], list[tuple[int, int]]]], source: str = "case"
) -> list[dict[str, Any]]:
    """Canonical SFT rows of (messages, image sizes) items, images as PNG paths in ``folder``; row i's source is
    ``{source}:{i}``."""
    rows = []
    for i, (messages, sizes) in enumerate(items):
        assert count_images(messages) == len(sizes)
        rows.append({"messages": messages, "images": row_images(folder, i, sizes), "source": f"{source}:{i}"})
    return rows


# Batches of (messages, PIL images) for the processor parity tests, which pass images directly.
Case = list[tuple[list[Message], list[Image.Image]]]


def single_turn() -> Case:
    return [([user(IMAGE, "What is shown in this image?"), assistant("A cat on a red chair.")], [make_image(40, 30)])]


def multi_turn() -> Case:
    messages = [
        user(IMAGE, "Describe the picture in detail."),
        assistant("There is a dog and a person walking in the park."),
        user("What color is the dog?"),
        assistant("The dog is brown."),
        user("Is it a sunny day?"),
        assistant("Yes, it is a sunny day."),
    ]
    return [(messages, [make_image(64, 48, seed=1)])]


def with_system() -> Case:
    messages = [
        system("You are a helpful assistant. Please answer as well as you can."),
        user(IMAGE, "How many people are in the photo?"),
        assistant("Two people are standing near the door."),
    ]
    return [(messages, [make_image(40, 30, seed=2)])]


def batch_of_three() -> Case:
    return [
        ([user(IMAGE, "What color is the car?"), assistant("Blue.")], [make_image(40, 30, seed=3)]),
        (
            [
                user(IMAGE, "Where was this photo taken?"),
                assistant("It looks like a beach with white sand, blue water and a few boats."),
            ],
            [make_image(64, 48, seed=4)],
        ),
        (
            [user(IMAGE, "Is there any text?"), assistant("Yes."), user("What does it say?"), assistant("Open.")],
            [make_image(100, 72, seed=5)],
        ),
    ]


def text_only_mixed() -> Case:
    return [
        ([user("Answer the question with a single word. Yes or no?"), assistant("Yes.")], []),
        ([user(IMAGE, "What is shown in this image?"), assistant("A small house.")], [make_image(64, 48, seed=6)]),
    ]


def two_images_one_turn() -> Case:
    messages = [user(IMAGE, IMAGE, "Which picture is brighter?"), assistant("The first picture is brighter.")]
    return [(messages, [make_image(40, 30, seed=7), make_image(64, 48, seed=8)])]


def two_images_two_turns() -> Case:
    messages = [
        user(IMAGE, "What is shown in this image?"),
        assistant("A cat."),
        user(IMAGE, "And in this one?"),
        assistant("A dog in the park."),
    ]
    return [(messages, [make_image(64, 48, seed=9), make_image(40, 30, seed=10)])]


PARITY_CASES: dict[str, Callable[[], Case]] = {
    "single_turn": single_turn,
    "multi_turn": multi_turn,
    "system": with_system,
    "batch_of_three": batch_of_three,
    "text_only_mixed": text_only_mixed,
    "two_images_one_turn": two_images_one_turn,
    "two_images_two_turns": two_images_two_turns,
}


def inference_rows(takes_system: bool = True) -> list[tuple[list[Message], list[Image.Image]]]:
    """Two prompts to generate from (a single turn, and a multi-turn one with a system message, dropped where
    ``takes_system`` is False: spec chat_template.system), with images."""
    rows = [
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
    return [(without_system(messages, takes_system), images) for messages, images in rows]


# -- data files --------------------------------------------------------------------------------------


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    """Write rows one per line; a ``str`` row is written verbatim (raw line, blank line, broken JSON)."""
    path.write_text(
        "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows), encoding="utf-8"
    )
    return path


DATA_KINDS = ("sft", "dpo", "rm", "prompt")

# The SFT data file's conversations: about the same pictures as PREFERENCE_ROWS' first two rows, the second with
# two answers to learn.
SFT_FILE_ROWS: list[list[Message]] = [
    [user(IMAGE, "What colour is it?"), assistant("It is red.")],
    [
        user(IMAGE, "Describe the picture."),
        assistant("A green box on a table."),
        user("Are you sure?"),
        assistant("Yes."),
    ],
]


def write_data(folder: Path, kind: str, takes_system: bool = True) -> Path:
    """A data file for ``resonance train sft|dpo|rm`` or of prompts for ``train ppo|grpo``, in the formats users
    write, with its PNGs next to it under relative names (``row1.png``, ``row2.png``).

    Its two rows are about :data:`PREFERENCE_ROWS`' single-image ones (every family takes them): row 1 a
    single-turn question, row 2 a multi-turn conversation.

    * ``sft`` (``sft.jsonl``): :data:`SFT_FILE_ROWS` with the same images; row 1 in ShareGPT format (``image``,
      ``conversations`` of from/value), row 2 in ``messages`` format with ``images``.
    * ``dpo`` (``dpo.jsonl``): row 1 plain strings; row 2 a message-list prompt and chosen answer and a plain
      string rejected answer.
    * ``rm`` (``rm.jsonl``): the ``dpo`` rows, row 2 with ``margin`` 1.5.
    * ``prompt`` (``prompts.jsonl``): single-turn prompts, row 1 a plain string, row 2 a message list holding the
      question that opens row 2's conversation. (Not the whole multi-turn prompt: GRPO on PaliGemma fails on
      prompts of different token lengths, as TRL tokenizes them unpadded and PaliGemma's processor cannot
      take ragged rows; these two happen to tokenize to the same length there.)

    ``takes_system`` False: row 2's prompt without its system message, for a family whose template takes none (spec
    chat_template.system: :func:`helpers.references.takes_system`).
    """
    assert kind in DATA_KINDS, kind
    (first, first_sizes), (second, second_sizes) = PREFERENCE_ROWS[:2]
    # One image each, saved as row1.png and row2.png (seeds 1 and 2: some tests' sampled tokens depend on the pixels).
    images = [
        [Path(save_png(folder, f"row{i}.png", make_image(*sizes[0], seed=i))).name]
        for i, sizes in enumerate([first_sizes, second_sizes], start=1)
    ]
    if kind == "sft":
        rows: list[dict[str, Any]] = [
            {
                "image": images[0][0],
                "conversations": [
                    {"from": {"user": "human", "assistant": "gpt"}[m["role"]], "value": to_text(m)}
                    for m in SFT_FILE_ROWS[0]
                ],
            },
            {"images": images[1], "messages": to_user_format(SFT_FILE_ROWS[1])},
        ]
    elif kind == "prompt":
        question = next(message for message in second["prompt"] if message["role"] == "user")
        rows = [
            {"image": images[0][0], "prompt": to_text(first["prompt"][0])},
            {"images": images[1], "prompt": to_user_format([question])},
        ]
    else:
        rows = [
            {
                "images": images[0],
                "prompt": to_text(first["prompt"][0]),
                "chosen": to_text(first["chosen"][0]),
                "rejected": to_text(first["rejected"][0]),
            },
            {
                "images": images[1],
                "prompt": to_user_format(without_system(second["prompt"], takes_system)),
                "chosen": to_user_format(second["chosen"]),
                "rejected": to_text(second["rejected"][0]),
                **({"margin": 1.5} if kind == "rm" else {}),
            },
        ]
    return write_jsonl(folder / ("prompts.jsonl" if kind == "prompt" else f"{kind}.jsonl"), rows)
