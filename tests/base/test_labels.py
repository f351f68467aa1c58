"""Labels supervise exactly the assistant answers and their end-of-turn tokens; DPO masks only the answers.

Independent reconstruction (HF processor only, see ``helpers.expected_supervision``): for assistant turn
k, the HF processor tokenizes the conversation prefix ``[:k]`` with the generation prompt and the prefix
``[:k + 1]``, images included; the tokens between the two lengths, minus trailing whitespace-only tokens
(such as the "\\n" after an end-of-turn marker), must be supervised, and every other position (system,
user, image tokens, generation prompts, padding) must be -100.

The collators read images from files, so the rows' images are PNGs written to ``tmp_path``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import (
    FAMILIES,
    IGNORE_INDEX,
    SFT_CASES,
    TEMPLATE_FAMILIES,
    Message,
    expected_supervision,
    has_system,
    hf_batch,
    load_adapter,
    load_hf_processor,
    open_rgb,
    preference_rows,
    prompt_only_inputs,
    sft_rows,
    supervised_positions,
    takes,
    to_hf,
)

from resonance.errors import RowError


def _check_row(
    hf: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    supervised: torch.Tensor,
    conversation: list[Message],
    first: int = 0,
) -> list[list[int]]:
    """One batch row against the reconstruction; ``supervised`` is a bool row. Returns the turns."""
    full, turns = expected_supervision(hf, conversation, first)
    length = int(attention_mask.sum())
    assert length == len(full)
    assert attention_mask[:length].all() and not attention_mask[length:].any(), "not right-padded"
    assert input_ids[:length].tolist() == full, "input_ids differ from the HF processor's"
    expected = torch.zeros_like(supervised)
    for positions in turns:
        expected[positions] = True

    def show(positions: torch.Tensor) -> list[tuple[int, str]]:
        return [(p, hf.tokenizer.decode([full[p]])) for p in positions.nonzero().flatten().tolist()]

    assert supervised.tolist() == expected.tolist(), (
        f"supervised but should not be: {show(supervised & ~expected)}; "
        f"should be supervised but is not: {show(expected & ~supervised)}"
    )
    return turns


@pytest.mark.parametrize("case", list(SFT_CASES))
@pytest.mark.parametrize("family", TEMPLATE_FAMILIES)
def test_sft_labels(family: str, case: str, tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    ckpt = tiny_checkpoint(family)
    mapper, processor = load_adapter(ckpt)
    hf = load_hf_processor(ckpt)
    rows = sft_rows(tmp_path, SFT_CASES[case])
    if not takes(processor, [len(row["images"]) for row in rows], any(has_system(row["messages"]) for row in rows)):
        # Rows the family cannot take (spec image.multi_image: false, image.required, chat_template.system: false)
        # are errors naming the row.
        with pytest.raises(RowError, match=r"case:\d+: .*(image|a system message)"):
            mapper.sft_collator(processor)(rows)
        return

    batch = mapper.sft_collator(processor)(rows)
    labels = batch["labels"]
    assert labels.shape == batch["input_ids"].shape

    tokenizer = hf.tokenizer
    for i, row in enumerate(rows):
        conversation = to_hf(row["messages"], [open_rgb(p) for p in row["images"]], processor.text_messages_as_string)
        supervised = labels[i] != IGNORE_INDEX
        turns = _check_row(hf, batch["input_ids"][i], batch["attention_mask"][i], supervised, conversation)
        # Supervised tokens carry their own ids, and each turn decodes to that turn's answer.
        positions = supervised_positions(labels[i])
        assert torch.equal(labels[i, positions], batch["input_ids"][i, positions])
        answers = [m["content"][0]["text"] for m in row["messages"] if m["role"] == "assistant"]
        assert len(turns) == len(answers)
        for answer, turn in zip(answers, turns, strict=True):
            decoded = tokenizer.decode(batch["input_ids"][i, turn].tolist())
            # the answer, after what the generation prompt leaves open (Qwen3.5's "\n</think>\n\n") if anything
            assert answer in decoded and decoded[: decoded.index(answer)].strip() in ("", "</think>"), (decoded, answer)
            # The end-of-turn marker, where the template writes one, is learned too.
            if tokenizer.eos_token and tokenizer.eos_token in decoded:
                assert batch["input_ids"][i, turn[-1]].item() == tokenizer.eos_token_id

    # Never supervised: image tokens and padding.
    assert not (labels == processor.image_token_id).any()
    assert (labels[batch["attention_mask"] == 0] == IGNORE_INDEX).all()


@pytest.mark.parametrize("family", TEMPLATE_FAMILIES)
def test_dpo_completion_mask(family: str, tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    ckpt = tiny_checkpoint(family)
    mapper, processor = load_adapter(ckpt)
    hf = load_hf_processor(ckpt)
    rows = preference_rows(tmp_path, processor.images_required, processor.multi_image, processor.takes_system)
    batch = mapper.dpo_collator(processor)(rows)

    half = len(rows)
    mask = batch["completion_mask"]
    assert mask.shape == batch["input_ids"].shape and mask.shape[0] == 2 * half
    for i in range(2 * half):
        row = rows[i % half]
        answer = row["chosen"] if i < half else row["rejected"]
        images = [open_rgb(p) for p in row["images"]]
        conversation = to_hf(row["prompt"] + answer, images, processor.text_messages_as_string)
        turns = _check_row(
            hf, batch["input_ids"][i], batch["attention_mask"][i], mask[i].bool(), conversation, len(row["prompt"])
        )
        assert len(turns) == len(answer)
        # Earlier assistant turns inside a multi-turn prompt are context, not completion.
        _, all_turns = expected_supervision(hf, conversation)
        for earlier in all_turns[: -len(answer)]:
            assert not mask[i, earlier].any()
    assert not (batch["input_ids"][mask.bool()] == processor.image_token_id).any()

    # Image inputs: the prompts' images once (the chosen half), as the HF processor makes them.
    chosen = [
        to_hf(r["prompt"] + r["chosen"], [open_rgb(p) for p in r["images"]], processor.text_messages_as_string)
        for r in rows
    ]
    reference = hf_batch(hf, chosen)
    # ...and prompt-only inputs (spec source: prompt) from the prompts, the same for chosen and rejected.
    prompts = [to_hf(r["prompt"], [open_rgb(p) for p in r["images"]], processor.text_messages_as_string) for r in rows]
    from_prompts = hf_batch(hf, prompts, add_generation_prompt=True)
    reference.update({name: from_prompts[name] for name in prompt_only_inputs(processor)})
    for name in processor.image_input_names():
        assert torch.equal(batch[name], reference[name]), name


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_to_a_multiple_only_adds_padding(
    family: str, tmp_path: Path, tiny_checkpoint: Callable[[str], Path]
) -> None:
    """``pad_to_multiple_of`` (TRL's flag, 8 under --compile_layers) lengthens the batch with padding only:
    the tokens, labels, masks and image inputs of the unpadded batch stay as they were."""
    mapper, processor = load_adapter(tiny_checkpoint(family))
    single = sft_rows(tmp_path, SFT_CASES["single_turn"])
    dpo_rows = preference_rows(tmp_path, processor.images_required, processor.multi_image, processor.takes_system)
    for collator_cls, rows in ((mapper.sft_collator, single), (mapper.dpo_collator, dpo_rows)):
        plain = collator_cls(processor)(rows)
        padded = collator_cls(processor, pad_to_multiple_of=8)(rows)
        assert plain.keys() == padded.keys()
        count, length = plain["input_ids"].shape
        assert padded["input_ids"].shape[1] % 8 == 0 and padded["input_ids"].shape[1] >= length
        for key, value in plain.items():
            if not isinstance(value, torch.Tensor):
                continue
            if value.dim() >= 2 and value.shape[:2] == (count, length):  # per token: a prefix, then padding
                assert padded[key].shape[1] == padded["input_ids"].shape[1], key
                assert torch.equal(padded[key][:, :length], value), key
                tail = padded[key][:, length:]
                if key in ("attention_mask", "completion_mask"):
                    assert not tail.any(), key
                if key == "labels":
                    assert (tail == IGNORE_INDEX).all()
            else:
                assert torch.equal(padded[key], value), key
