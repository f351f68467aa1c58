"""chat_template.training: trl. Training conversations render with TRL's training variant of the template (for
thinking templates whose history renders otherwise than the last turn, Qwen3.5's); prompts keep the model's.

Shown on the tiny Qwen3-VL, whose template TRL 1.16 has a training variant of (prefix-preserving, with generation
markers); the reference is the HF processor rendering with that same variant (``helpers.load_hf_processor``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import (
    IGNORE_INDEX,
    SFT_CASES,
    expected_supervision,
    load_adapter,
    open_rgb,
    sft_rows,
    to_hf,
    with_template,
)
from trl.chat_template_utils import get_training_chat_template

from resonance.errors import ChatTemplateError


def test_training_renders_with_trl_s_variant(tiny_checkpoint: Callable[[str], Path], tmp_path: Path) -> None:
    ckpt = tiny_checkpoint("qwen3_vl")
    mapper, base = load_adapter(ckpt)

    class Trained(type(base)):
        trl_training_template = True

    processor = Trained(ckpt)
    training = processor.training_template_source()
    assert training.origin.startswith("TRL's training variant of ")
    assert training.source == get_training_chat_template(processor.hf) != processor.hf.chat_template
    rows = sft_rows(tmp_path, SFT_CASES["multi_turn"])
    batch = mapper.sft_collator(processor)(rows)
    hf = mapper.processor(ckpt).hf
    hf.training_chat_template = training.source  # as load_hf_processor sets it for a spec with training: trl
    conversation = to_hf(rows[0]["messages"], [open_rgb(p) for p in rows[0]["images"]])
    full, turns = expected_supervision(hf, conversation)
    assert batch["input_ids"][0].tolist() == full
    assert (batch["labels"][0] != IGNORE_INDEX).nonzero().flatten().tolist() == [p for t in turns for p in t]
    # prompts at inference: the model's template
    prompt = rows[0]["messages"][:1]
    assert processor.render_conversation(prompt, True) == base.render_conversation(prompt, True)


def test_a_template_trl_has_no_variant_of_is_named(tiny_checkpoint: Callable[[str], Path]) -> None:
    ckpt = tiny_checkpoint("qwen2_vl")
    _, plain = with_template(ckpt, "{% for m in messages %}{{ m['role'] }}: {{ m['content'][-1]['text'] }}{% endfor %}")

    class Trained(plain):
        trl_training_template = True

    with pytest.raises(ChatTemplateError, match=r"chat_template.training: trl, but TRL has no training variant of"):
        Trained(ckpt).training_template_source()
