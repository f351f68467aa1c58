"""spec image.features_input: frozen images encoded once and passed to forward under the model's own name.

Mllama has no get_image_features / mm_encoder_outputs; its forward takes the projected vision states as
``cross_attention_states`` instead of pixel_values.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from helpers import IMAGE, REPO, assistant, load_adapter, make_image, user

from resonance.algorithms.image_features import ImageEncodingMixin


def _batch(processor: Any) -> dict[str, torch.Tensor]:
    rows = [
        ([user(IMAGE, "What is shown in this image?"), assistant("A cat.")], [make_image(64, 48, seed=1)]),
        (
            [user(IMAGE, IMAGE, "Which one is brighter?"), assistant("The first.")],
            [make_image(32, 32), make_image(40, 30)],
        ),
    ]
    return dict(processor.process_batch_conv([m for m, _ in rows], [i for _, i in rows]))


def test_forward_with_encoded_images_equals_forward_with_pixels(tiny_checkpoint: Callable[[str], Path]) -> None:
    mapper, processor = load_adapter(tiny_checkpoint("mllama"))
    model_cls = mapper.model
    assert model_cls.image_features_input == "cross_attention_states"
    model = model_cls.from_pretrained(tiny_checkpoint("mllama")).eval()
    assert model_cls.reuses_image_features(model)
    batch = _batch(processor)
    names = processor.image_input_names()
    text = {k: v for k, v in batch.items() if k not in names and k != "labels"}
    with torch.no_grad():
        expected = model(**text, **{k: batch[k] for k in names}).logits
        features = model_cls.encode_images(model, {k: batch[k] for k in names})
        got = model(**text, cross_attention_states=features).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    with torch.no_grad():  # and the images matter (the tiny checkpoint's cross-attention gates are open)
        assert not torch.allclose(model(**text, cross_attention_states=features * 0).logits, expected)


class _Encoder(ImageEncodingMixin):
    pass


def test_trainer_inputs_encode_once_and_keep_row_inputs(tiny_checkpoint: Callable[[str], Path]) -> None:
    mapper, processor = load_adapter(tiny_checkpoint("mllama"))
    model_cls = mapper.model
    model = model_cls.from_pretrained(tiny_checkpoint("mllama"))
    model.requires_grad_(False)  # as with LoRA: tower and projector frozen
    batch = _batch(processor)
    names = set(processor.image_input_names())
    calls = []
    handle = model_cls.get_vision_tower(model).register_forward_hook(lambda *_: calls.append(1))
    encoder = _Encoder()
    encoder._bind_adapter(model_cls, processor)
    try:
        inputs = encoder._image_model_inputs(model, batch, copies=2)
    finally:
        handle.remove()
    assert calls == [1]
    assert not names & set(inputs), "the image inputs are replaced by their features"
    assert torch.equal(inputs["cross_attention_mask"], batch["cross_attention_mask"])  # per text row: untouched
    features = inputs["cross_attention_states"]
    rows = batch["input_ids"].shape[0]
    assert features.shape[0] == 2 * rows and not features.requires_grad
    assert torch.equal(features[:rows], features[rows:])


def test_without_the_argument_the_tower_runs_in_forward(tiny_checkpoint: Callable[[str], Path]) -> None:
    mapper, _ = load_adapter(tiny_checkpoint("mllama"))
    model = mapper.model.from_pretrained(tiny_checkpoint("mllama"))

    class NoSuchArgument(mapper.model):  # type: ignore[misc,valid-type]
        image_features_input = "precomputed_vision_states"

    assert not NoSuchArgument.reuses_image_features(model)


def test_generated_adapters_write_it_only_when_set() -> None:
    generated = REPO / "generated"
    assert 'image_features_input = "cross_attention_states"' in (generated / "mllama" / "__init__.py").read_text()
    assert "image_features_input" not in (generated / "llava" / "__init__.py").read_text()
