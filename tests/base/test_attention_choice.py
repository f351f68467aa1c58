"""The attention implementation asked of transformers: one name for the model, eager for a sub-model without it."""

from __future__ import annotations

from transformers import Gemma4Config, Qwen2VLConfig

from resonance.base.model import per_submodel


def test_a_sub_model_without_the_kernel_gets_eager_and_the_rest_keep_the_choice() -> None:
    # Gemma 4's audio tower (Gemma4AudioModel) has neither sdpa nor flash-attention; its text and vision models have
    gemma4 = Gemma4Config(vision_config={}, audio_config={})
    assert per_submodel(gemma4, "sdpa") == {"": "sdpa", "audio_config": "eager"}
    assert per_submodel(gemma4, "flash_attention_2") == {"": "flash_attention_2", "audio_config": "eager"}
    assert per_submodel(gemma4, "eager") == "eager"
    # without an audio config (Gemma 4's image-only checkpoints) there is nothing to fall back for
    assert per_submodel(Gemma4Config(vision_config={}, audio_config=None), "sdpa") == "sdpa"
    assert per_submodel(Qwen2VLConfig(), "sdpa") == "sdpa"
