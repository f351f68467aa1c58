"""resonance.tiny: ``tokenizer.named_special_tokens``, model-specific special tokens read by attribute name.

Processors such as InternVL's read ``tokenizer.context_image_token`` / ``tokenizer.start_image_token_id``;
a real checkpoint's tokenizer_config carries them by name, and so must the tiny tokenizer, after a save
and reload too.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import transformers

from resonance.codegen.schema import TinyTokenizer
from resonance.tiny import build_tokenizer

NAMED = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>"}


def _spec(**extra: object) -> TinyTokenizer:
    return TinyTokenizer.model_validate(
        {"vocab_size": 300, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", **extra}
    )


def test_named_tokens_are_attributes_with_ids_and_survive_a_reload(tmp_path: Path) -> None:
    tokenizer = build_tokenizer(_spec(special_tokens=["<|im_start|>", "<img>"], named_special_tokens=NAMED))
    # bos/eos/pad/unk, then special_tokens, then the named tokens not listed before: fixed ids.
    assert [tokenizer.convert_tokens_to_ids(t) for t in ["<|im_end|>", "<|endoftext|>", "<|im_start|>"]] == [0, 1, 2]
    assert tokenizer.start_image_token_id == 3  # listed in special_tokens: keeps its place
    assert (tokenizer.end_image_token_id, tokenizer.context_image_token_id) == (4, 5)
    for name, token in NAMED.items():
        assert getattr(tokenizer, name) == token
    # Special: never split, dropped by skip_special_tokens.
    ids = tokenizer("a<img><IMG_CONTEXT></img>b", add_special_tokens=False)["input_ids"]
    assert ids[1:4] == [3, 5, 4]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "ab"

    tokenizer.save_pretrained(tmp_path)
    again = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for name, token in NAMED.items():
        assert getattr(again, name) == token
        assert getattr(again, f"{name}_id") == getattr(tokenizer, f"{name}_id")


def test_without_named_tokens_nothing_changes() -> None:
    plain = build_tokenizer(_spec(special_tokens=["<img>"]))
    assert plain.get_vocab() == build_tokenizer(_spec(special_tokens=["<img>"], named_special_tokens={})).get_vocab()
    with pytest.raises(AttributeError):
        _ = plain.context_image_token
