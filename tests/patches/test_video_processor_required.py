"""Processors that cannot be built without a video processor (SmolVLM's), without torchvision; tiny config ids.

``video_processor_optional`` leaves video processors out when torchvision is missing. SmolVLM's processor
takes ``video_processor`` as a required argument and reads its ``num_frames``/``fps`` in every
``apply_chat_template`` call, so it also needs None while loading and a stand-in afterwards.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import transformers
from helpers import REPO
from transformers.utils import is_torchvision_available

from resonance.codegen.project import load_specs
from resonance.codegen.schema import TinyTokenizer
from resonance.patches.video_processor import (
    VideoProcessorUnavailable,
    video_processor_kwargs,
    video_processor_optional,
)
from resonance.tiny import TinyRecipe, _token_id, build_tiny, build_tokenizer, tiny_from_spec


def _tiny(family: str) -> TinyRecipe:
    ((_, spec),) = load_specs([REPO / "specs" / f"{family}.yaml"], REPO)
    return tiny_from_spec(spec)


def test_required_video_processor_build_save_load(tmp_path: Path) -> None:
    from_args = transformers.ProcessorMixin.__dict__["from_args_and_dict"]
    out_dir = build_tiny(_tiny("smolvlm"), tmp_path / "smolvlm")
    assert transformers.ProcessorMixin.__dict__["from_args_and_dict"] is from_args  # restored after the build
    with video_processor_optional():
        processor = transformers.AutoProcessor.from_pretrained(out_dir)
        processor.save_pretrained(tmp_path / "again")
        again = transformers.AutoProcessor.from_pretrained(tmp_path / "again")
    assert transformers.ProcessorMixin.__dict__["from_args_and_dict"] is from_args
    assert type(processor).__name__ == type(again).__name__ == "SmolVLMProcessor"
    saved = json.loads((tmp_path / "again" / "processor_config.json").read_text())
    if is_torchvision_available():  # the compat layer does nothing: a real video processor
        assert not isinstance(processor.video_processor, VideoProcessorUnavailable)
        return
    assert "video_processor" not in saved  # the stand-in is never saved
    assert "video_processor" not in vars(processor)
    # After the context too: the chat template reads the video defaults (unset) and renders as usual.
    stand_in = processor.video_processor
    assert isinstance(stand_in, VideoProcessorUnavailable)
    assert stand_in.num_frames is None and stand_in.fps is None
    with pytest.raises(ImportError, match="torchvision"):
        stand_in([])
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    assert again.apply_chat_template(messages, add_generation_prompt=True) == (
        "<|im_start|>User: Hi<end_of_utterance>\nAssistant:"
    )
    assert set(processor.model_input_names) == {"input_ids", "attention_mask", "pixel_values", "pixel_attention_mask"}


def test_optional_video_processor_is_left_alone(tmp_path: Path) -> None:
    """Processors whose video processor has a default (Qwen2-VL's) get no stand-in and no None argument."""
    assert video_processor_kwargs(transformers.Qwen2VLProcessor) == {}  # outside the context: nothing
    with video_processor_optional():
        assert video_processor_kwargs(transformers.Qwen2VLProcessor) == {}
        expected = {} if is_torchvision_available() else {"video_processor": None}
        assert video_processor_kwargs(transformers.SmolVLMProcessor) == expected
        processor = transformers.AutoProcessor.from_pretrained(build_tiny(_tiny("qwen2_vl"), tmp_path / "qwen"))
    if not is_torchvision_available():
        assert not hasattr(processor, "video_processor")


def test_config_token_ids_may_name_the_unk_token() -> None:
    """Mistral-based families (Idefics2) pad with <unk>: the unk token itself is a valid config id."""
    tokenizer = build_tokenizer(TinyTokenizer(vocab_size=300, bos_token="<s>", unk_token="<unk>", pad_token="<unk>"))
    assert _token_id(tokenizer, "<unk>") == tokenizer.unk_token_id == tokenizer.pad_token_id
    with pytest.raises(ValueError, match="not a single token"):
        _token_id(tokenizer, "<not_a_token>")
