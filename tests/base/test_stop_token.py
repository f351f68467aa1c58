"""chat_template.stop_token: a template that writes no end-of-turn token after an answer (GLM-4V's) still teaches
the model to stop. Each answer is supervised through the stop token after it: the next turn's marker where the
rendering has one, or one written after the conversation's last answer; nothing else changes.

The family under test is the tiny Qwen2-VL with a GLM-like template in Qwen's tokens (each turn opens with
<|im_start|> and nothing closes an answer), so <|im_start|> plays GLM's <|user|>. The reference is the HF processor
with the same template ending a conversation that ends with an answer in the stop token
(``helpers.with_stop_token``), labelled by ``helpers.expected_supervision``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import (
    IGNORE_INDEX,
    SFT_CASES,
    expected_supervision,
    load_hf_processor,
    open_rgb,
    preference_rows,
    sft_rows,
    to_hf,
    with_stop_token,
    with_template,
)
from pydantic import ValidationError

from resonance.codegen.schema import ChatTemplate
from resonance.errors import SpecMismatchError

GLM_LIKE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}{{ '\\n' }}"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for part in m['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant{{ '\\n' }}{% endif %}"
)
STOP = "<|im_start|>"


@pytest.fixture
def adapter(tiny_checkpoint: Callable[[str], Path]):
    """The Qwen2-VL adapter, its processor class with the GLM-like template, the checkpoint and the reference."""
    ckpt = tiny_checkpoint("qwen2_vl")
    mapper, glm_like = with_template(ckpt, GLM_LIKE)
    hf = load_hf_processor(ckpt)
    hf.chat_template = with_stop_token(GLM_LIKE, STOP)
    return mapper, glm_like, ckpt, hf


def test_answers_are_supervised_through_the_stop_token(adapter, tmp_path: Path) -> None:
    mapper, glm_like, ckpt, hf = adapter

    class Stopped(glm_like):
        stop_token = STOP

    processor = Stopped(ckpt)
    stop_id = processor.tokenizer.convert_tokens_to_ids(STOP)
    rows = sft_rows(tmp_path, SFT_CASES["multi_turn"] + SFT_CASES["padded_batch"])
    batch = mapper.sft_collator(processor)(rows)
    plain = mapper.sft_collator(glm_like(ckpt))(rows)
    for i, row in enumerate(rows):
        conversation = to_hf(row["messages"], [open_rgb(p) for p in row["images"]])
        full, turns = expected_supervision(hf, conversation)
        length = int(batch["attention_mask"][i].sum())
        ids = batch["input_ids"][i, :length].tolist()
        assert ids == full
        supervised = [p for p in range(length) if batch["labels"][i, p] != IGNORE_INDEX]
        assert supervised == [p for turn in turns for p in turn]
        # every answer ends in a supervised stop token: the next turn's marker, or the one written at the end
        assert [ids[turn[-1]] for turn in turns] == [stop_id] * len(turns)
        assert ids[-1] == stop_id and ids.count(stop_id) == len(row["messages"]) + 1  # one added, none doubled
        # without the field, the same rows supervise the answers' text alone: nothing teaches the model to stop
        plain_length = int(plain["attention_mask"][i].sum())
        plain_ids = plain["input_ids"][i, :plain_length].tolist()
        assert plain_ids == ids[:-1]
        plain_supervised = [p for p in range(plain_length) if plain["labels"][i, p] != IGNORE_INDEX]
        assert plain_supervised == [p for turn in turns for p in turn[:-1]]


def test_preference_completions_end_in_the_stop_token(adapter, tmp_path: Path) -> None:
    mapper, glm_like, ckpt, hf = adapter

    class Stopped(glm_like):
        stop_token = STOP

    processor = Stopped(ckpt)
    rows = preference_rows(tmp_path)
    batch = mapper.dpo_collator(processor)(rows)
    half = len(rows)
    for i in range(2 * half):
        row = rows[i % half]
        answer = row["chosen"] if i < half else row["rejected"]
        conversation = to_hf(row["prompt"] + answer, [open_rgb(p) for p in row["images"]])
        full, turns = expected_supervision(hf, conversation, len(row["prompt"]))
        length = int(batch["attention_mask"][i].sum())
        assert batch["input_ids"][i, :length].tolist() == full
        completion = batch["completion_mask"][i, :length].nonzero().flatten().tolist()
        assert completion == [p for turn in turns for p in turn]
        assert full[completion[-1]] == processor.tokenizer.convert_tokens_to_ids(STOP)


def test_a_stop_token_that_is_no_token_is_named(adapter) -> None:
    _, glm_like, ckpt, _ = adapter

    class Misspelt(glm_like):
        stop_token = "<|im_stat|>"

    with pytest.raises(SpecMismatchError, match=r"chat_template.stop_token: '<\|im_stat\|>' is not a token.*im_start"):
        Misspelt(ckpt)


def test_not_with_suffix_answers() -> None:
    with pytest.raises(ValidationError, match="stop_token: not with answer: suffix"):
        ChatTemplate(answer="suffix", stop_token="<eos>")
    assert ChatTemplate(stop_token="<|user|>").stop_token == "<|user|>"
