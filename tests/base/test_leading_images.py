"""chat_template.images: leading, and answers found by their own text: a Molmo2-like template.

Molmo2's template writes every image of the conversation before the first turn, whichever message holds it, writes
a turn's opening in the history as " <|im_start|>assistant" where the generation prompt has no space, and writes an
answer's end-of-turn marker at the start of the next user turn (chat_template.stop_token supervises it). The family
under test is the tiny Qwen2-VL with such a template in Qwen's tokens; the reference is the HF processor with the same
template, ending a conversation that ends with an answer in the stop token.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import (
    IGNORE_INDEX,
    SFT_CASES,
    hf_ids,
    load_hf_processor,
    open_rgb,
    sft_rows,
    to_hf,
    with_stop_token,
    with_template,
)

IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
MOLMO_LIKE = (
    "{% for m in messages %}{% if m['content'] is not string %}{% for part in m['content'] %}"
    "{% if part['type'] == 'image' %}" + IMAGE + "{% endif %}{% endfor %}{% endif %}{% endfor %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}{% if not loop.first %}<|im_end|>{{ '\\n' }}{% endif %}"
    "<|im_start|>user{{ '\\n' }}"
    "{% for part in m['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>{{ '\\n' }}"
    "{% else %} <|im_start|>assistant{{ '\\n' }}{% for part in m['content'] %}{{ part['text'] }}{% endfor %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant{{ '\\n' }}{% endif %}"
)
STOP = "<|im_end|>"


def test_answers_of_a_template_that_writes_images_first(tiny_checkpoint: Callable[[str], Path], tmp_path: Path) -> None:
    ckpt = tiny_checkpoint("qwen2_vl")
    mapper, molmo_like = with_template(ckpt, MOLMO_LIKE)

    class Inline(molmo_like):
        stop_token = STOP

    class Leading(Inline):
        images_lead = True

    # two images, the second in the second user turn: the prefix through the first answer has one image fewer
    messages = [
        *SFT_CASES["multi_turn"][0][0][:2],
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this one?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
    ]
    rows = sft_rows(tmp_path, [(messages, [(40, 30), (64, 48)])])
    with pytest.raises(ValueError, match="does not render conversations prefix-stably"):
        mapper.sft_collator(Inline(ckpt))(rows)

    processor = Leading(ckpt)
    batch = mapper.sft_collator(processor)(rows)
    hf = load_hf_processor(ckpt)
    hf.chat_template = with_stop_token(MOLMO_LIKE, STOP)
    conversation = to_hf(rows[0]["messages"], [open_rgb(p) for p in rows[0]["images"]])
    assert batch["input_ids"][0].tolist() == hf_ids(hf, conversation)  # right-padded batch of one: no padding
    labels = batch["labels"][0]
    supervised = (labels != IGNORE_INDEX).nonzero().flatten().tolist()
    # runs of consecutive supervised positions
    runs = [[p for _, p in run] for _, run in itertools.groupby(enumerate(supervised), lambda ip: ip[1] - ip[0])]
    answers = [m["content"][0]["text"] for m in messages if m["role"] == "assistant"]
    decoded = [processor.tokenizer.decode(batch["input_ids"][0, run].tolist()) for run in runs]
    assert decoded == [answer + STOP for answer in answers]  # each answer and the marker after it, nothing else
