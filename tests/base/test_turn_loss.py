"""Per-turn supervision: an assistant message marked ``"train": False`` is context, like a user turn.

Canonical messages carry ``train``: None (the default: today's labels) or False (ms-swift's ``"loss": false``,
axolotl's ``"training": false``, a prompt-completion row's prompt turns). The reference is the same as
test_labels.py's (``helpers.expected_supervision``: the family's own HF processor, turn by turn): an unlearned
turn's positions are exactly the ones that reference gives that turn, and they lose their labels while every
other turn keeps its own. ``chat_template.answer: suffix`` families (PaliGemma) learn only the last turn, so
only a ``train: False`` last turn changes anything there: it is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset
from helpers import (
    FAMILIES,
    IGNORE_INDEX,
    SFT_CASES,
    SUFFIX_FAMILIES,
    TEMPLATE_FAMILIES,
    Message,
    expected_supervision,
    hf_batch,
    load_adapter,
    load_hf_processor,
    make_image,
    open_rgb,
    preference_rows,
    prompt_only_inputs,
    sft_rows,
    supervised_positions,
    system,
    to_hf,
)

from resonance.algorithms.lengths import fit_rows
from resonance.errors import DataError, RowError

# test_labels.py's multi-turn conversation: three answers, at indices 1, 3 and 5.
((CONVERSATION, _),) = SFT_CASES["multi_turn"]
ANSWERS = [1, 3, 5]


def flagged(messages: list[Message], unlearned: Collection[int] = ()) -> list[Message]:
    """``messages`` as the loader writes them, with a ``train`` key on each: False at the indices in
    ``unlearned``, None (the default) elsewhere."""
    return [{**m, "train": False if i in unlearned else None} for i, m in enumerate(messages)]


def _turn_positions(hf: Any, messages: list[Message], images: list[Any], text_as_string: bool) -> list[list[int]]:
    """Per assistant turn, the positions the HF reference supervises when every turn is learned."""
    _, turns = expected_supervision(hf, to_hf(messages, images, text_as_string))
    return turns


@pytest.mark.parametrize("family", TEMPLATE_FAMILIES)
def test_unlearned_turn_loses_only_its_labels(
    family: str, tmp_path: Path, tiny_checkpoint: Callable[[str], Path]
) -> None:
    """Through the SFT collator: with the first answer unlearned, exactly the later answers are labelled, with the
    labels they have when every answer is learned; tokens and image inputs stay as they were, except inputs
    computed from the prompt, which now end before the first answer to learn."""
    ckpt = tiny_checkpoint(family)
    mapper, processor = load_adapter(ckpt)
    hf = load_hf_processor(ckpt)
    collate = mapper.sft_collator(processor)
    plain = sft_rows(tmp_path, [(CONVERSATION, [(64, 48)])])
    images = [open_rgb(p) for p in plain[0]["images"]]

    learned = collate(plain)
    # The default, written out (what the loader produces), is today's batch bit for bit.
    explicit = collate([{**plain[0], "messages": flagged(CONVERSATION)}])
    assert learned.keys() == explicit.keys()
    for key, value in learned.items():
        assert torch.equal(explicit[key], value), key

    unlearned = collate([{**plain[0], "messages": flagged(CONVERSATION, {1})}])
    turns = _turn_positions(hf, CONVERSATION, images, processor.text_messages_as_string)
    assert len(turns) == len(ANSWERS)
    assert supervised_positions(learned["labels"][0]) == sorted(p for turn in turns for p in turn)
    assert supervised_positions(unlearned["labels"][0]) == sorted(turns[1] + turns[2])
    expected = learned["labels"].clone()
    expected[0, turns[0]] = IGNORE_INDEX
    assert torch.equal(unlearned["labels"], expected)

    from_prompt = prompt_only_inputs(processor)
    for key, value in learned.items():
        if key != "labels" and key not in from_prompt:
            assert torch.equal(unlearned[key], value), key
    if from_prompt:  # InstructBLIP's Q-Former text: the turns before the first answer to learn (turn 3)
        reference = hf_batch(hf, [to_hf(CONVERSATION[:3], images)], add_generation_prompt=True)
        for name in from_prompt:
            assert torch.equal(unlearned[name], reference[name]), name
            assert not torch.equal(learned[name], reference[name]), f"{name}: the test does not tell the prompts apart"


# (first_supervised, unlearned turns) -> the turns labelled
SUPERVISION_CASES = [
    (0, set(), [1, 3, 5]),
    (0, {3}, [1, 5]),
    (2, set(), [3, 5]),
    (2, {3}, [5]),
    (4, {1, 3}, [5]),  # unlearned turns inside the prompt change nothing
    (2, {1, 5}, [3]),
]


@pytest.mark.parametrize("family", TEMPLATE_FAMILIES)
def test_first_supervised_and_train_together(family: str, tiny_checkpoint: Callable[[str], Path]) -> None:
    """DPO's ``first_supervised`` (the prompt's length) and ``train`` flags: labelled are the assistant turns at
    index >= first_supervised not marked train: False, in one batch of differently flagged rows. Inputs
    computed from the prompt end before each row's first labelled turn."""
    ckpt = tiny_checkpoint(family)
    _, processor = load_adapter(ckpt)
    hf = load_hf_processor(ckpt)
    image = make_image(64, 48, seed=1)
    conversations = [flagged(CONVERSATION, unlearned) for _, unlearned, _ in SUPERVISION_CASES]
    firsts = [first for first, _, _ in SUPERVISION_CASES]
    batch = processor.process_batch_conv(conversations, [[image]] * len(conversations), firsts)

    turns = dict(
        zip(ANSWERS, _turn_positions(hf, CONVERSATION, [image], processor.text_messages_as_string), strict=True)
    )
    for row, (_, _, labelled) in enumerate(SUPERVISION_CASES):
        expected = sorted(p for turn in labelled for p in turns[turn])
        assert supervised_positions(batch["labels"][row]) == expected, (row, SUPERVISION_CASES[row])
    from_prompt = prompt_only_inputs(processor)
    if from_prompt:
        prompts = [to_hf(CONVERSATION[: labelled[0]], [image]) for _, _, labelled in SUPERVISION_CASES]
        reference = hf_batch(hf, prompts, add_generation_prompt=True)
        for name in from_prompt:
            assert torch.equal(batch[name], reference[name]), name


@pytest.mark.parametrize("family", TEMPLATE_FAMILIES)
def test_nothing_to_learn_is_refused(family: str, tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    """A conversation whose every answer is train: False is a RowError naming that row (not its batch mates),
    from the collator by FILE:LINE, from the processor alone by its index in the batch."""
    mapper, processor = load_adapter(tiny_checkpoint(family))
    rows = sft_rows(tmp_path, [(CONVERSATION, [(64, 48)]), (flagged(CONVERSATION, set(ANSWERS)), [(40, 30)])])
    message = r"every assistant message is marked train: false \(indices 1, 3, 5, counting from 0\), so the row has"
    with pytest.raises(RowError, match=f"^case:1: {message}") as caught:
        mapper.sft_collator(processor)(rows)
    assert "case:0" not in str(caught.value)

    images = [[make_image(64, 48)], [make_image(40, 30)]]
    with pytest.raises(ValueError, match=f"^row 1: {message}"):
        processor.process_batch_conv([r["messages"] for r in rows], images)
    # After the prompt: the answers from first_supervised on are what counts.
    with pytest.raises(
        ValueError, match=r"^row 0: every assistant message from index 4 on is marked train: false \(indices 5,"
    ):
        processor.process_batch_conv([flagged(CONVERSATION, {5})], images[:1], [4])


@pytest.mark.parametrize("family", TEMPLATE_FAMILIES)
def test_preference_rows_with_train_flags(family: str, tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    """The DPO collator: train flags in the prompt change nothing (its turns are context anyway); a chosen or
    rejected answer marked train: false is refused, naming the row and the half."""
    mapper, processor = load_adapter(tiny_checkpoint(family))
    collate = mapper.dpo_collator(processor)
    rows = preference_rows(tmp_path, processor.images_required, processor.multi_image, processor.takes_system)
    multi_turn = next(i for i, r in enumerate(rows) if any(m["role"] == "assistant" for m in r["prompt"]))
    # the prompt's own answer (after its system message, where the family takes one)
    answer = next(k for k, m in enumerate(rows[multi_turn]["prompt"]) if m["role"] == "assistant")
    flagged_rows = [
        {
            **r,
            "prompt": flagged(r["prompt"], {answer}),
            "chosen": flagged(r["chosen"]),
            "rejected": flagged(r["rejected"]),
        }
        for r in rows
    ]
    plain, with_flags = collate(rows), collate(flagged_rows)
    assert plain.keys() == with_flags.keys()
    for key, value in plain.items():
        assert torch.equal(with_flags[key], value), key

    refused = {**rows[0], "rejected": flagged(rows[0]["rejected"], {0})}
    source = rows[0]["source"]
    with pytest.raises(RowError, match=f"^{source}: rejected: every assistant message from index 1 on is"):
        collate([refused, rows[1]])


@pytest.mark.parametrize("family", SUFFIX_FAMILIES)
def test_suffix_families_learn_the_last_turn_only(
    family: str, tmp_path: Path, tiny_checkpoint: Callable[[str], Path]
) -> None:
    """chat_template.answer: suffix: earlier answers are prompt whatever their flag; a train: False last answer
    leaves nothing to learn, refused by the collator (FILE:LINE) and, before any step, by fit_rows."""
    mapper, processor = load_adapter(tiny_checkpoint(family))
    collate = mapper.sft_collator(processor)
    rows = sft_rows(tmp_path, [(CONVERSATION, [(64, 48)])])
    plain = collate(rows)
    earlier = collate([{**rows[0], "messages": flagged(CONVERSATION, {1, 3})}])
    assert plain.keys() == earlier.keys()
    for key, value in plain.items():
        assert torch.equal(earlier[key], value), key

    last = [{**rows[0], "messages": flagged(CONVERSATION, {5})}]
    message = (
        r"learns only the last message \(the answer, given as a suffix\), and it is marked train: false \(index 5,"
    )
    with pytest.raises(RowError, match=f"^case:0: .*{message}"):
        collate(last)
    with pytest.raises(DataError, match=f"case:0: .*{message}"):
        fit_rows(Dataset.from_list(last), collate, skip_invalid_rows=False)


# -- rendering ---------------------------------------------------------------------------------------


KEY_DUMPING_TEMPLATE = "{% for message in messages %}{{ message }}\n{% endfor %}"


@pytest.mark.parametrize("family", FAMILIES)
def test_train_flags_never_reach_the_chat_template(family: str, tiny_checkpoint: Callable[[str], Path]) -> None:
    """Rendering with train keys (None or False) equals rendering without them: with the family's template, and
    with a template that prints every key of every message (a template may loop over a message's items)."""
    _, processor = load_adapter(tiny_checkpoint(family))
    # a system message first, where the family's template takes one (spec chat_template.system)
    head = [system("Be brief.")] if processor.takes_system else []
    conversation = [*head, *CONVERSATION]
    everything = range(len(conversation))
    answers = {len(head) + answer for answer in ANSWERS}
    variants = [flagged(conversation), flagged(conversation, answers), flagged(conversation, everything)]

    def renders(messages: list[Message]) -> list[str]:
        """Every prefix from the first question on (Qwen3.5's template refuses a conversation without one), those
        ending with a question with the generation prompt."""
        first = next(k for k, m in enumerate(messages, 1) if m["role"] == "user")
        return [
            processor.render_conversation(messages[:k], add_generation_prompt=messages[k - 1]["role"] == "user")
            for k in range(first, len(messages) + 1)
        ]

    for template in (None, KEY_DUMPING_TEMPLATE):
        if template is not None:
            processor.hf.chat_template = template
        expected = renders(conversation)
        assert all(expected)
        for variant in variants:
            assert renders(variant) == expected
    assert "train" not in renders(flagged(conversation, everything))[-1]
