"""algorithms.image_features._reusable_features: encoder outputs repeated for chosen + rejected, in image order.

Qwen3-VL's ``get_image_features`` returns ``pooler_output`` as one tensor per image and
``deepstack_features`` as, per DeepStack layer, one tensor per image. The model concatenates each
layer's tensors in order and adds them at the image tokens, so every layer must list the images in
the same order as ``pooler_output``: chosen images, then the same images again for rejected.
"""

from __future__ import annotations

import torch
from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

from resonance.algorithms.image_features import _reusable_features


def test_deepstack_layers_of_per_image_tensors_follow_the_image_order() -> None:
    a, b = torch.full((4, 2), 1.0), torch.full((2, 2), 2.0)  # image A: 4 tokens, image B: 2 tokens
    layers = [(a + 10, b + 10), (a + 20, b + 20)]
    encoded = BaseModelOutputWithDeepstackFeatures(
        last_hidden_state=torch.zeros(24, 3), pooler_output=(a, b), deepstack_features=layers
    )
    kept = _reusable_features(encoded, copies=2)
    assert kept.last_hidden_state is None  # the pooled output is what the model reads
    order = torch.cat(kept.pooler_output)[:, 0].tolist()
    assert order == [1.0] * 4 + [2.0] * 2 + [1.0] * 4 + [2.0] * 2
    assert len(kept.deepstack_features) == 2
    for offset, layer in zip((10, 20), kept.deepstack_features, strict=True):
        assert torch.cat(layer)[:, 0].tolist() == [v + offset for v in order]


def test_deepstack_layers_as_one_tensor_each_are_repeated_along_the_batch() -> None:
    flat = [torch.arange(6.0).reshape(3, 2), torch.arange(6.0, 12.0).reshape(3, 2)]
    encoded = BaseModelOutputWithDeepstackFeatures(pooler_output=torch.zeros(3, 2), deepstack_features=flat)
    kept = _reusable_features(encoded, copies=2)
    assert kept.pooler_output.shape == (6, 2)
    for layer, original in zip(kept.deepstack_features, flat, strict=True):
        assert torch.equal(layer, torch.cat([original, original]))
