"""Loading a checkpoint runs no layer code fetched from the Hub: transformers 5.25 turns hub kernels on by default
where the kernels package is installed, and each later ``train()``/``eval()`` on a GPU would fetch and run them."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from resonance.base.registry import load_core_mapper

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("kernels") is None, reason="transformers without the kernels package loads none"
)


def test_a_loaded_model_does_not_use_hub_kernels(tiny_checkpoint) -> None:
    ckpt = tiny_checkpoint("gemma3")  # Gemma 3's decoder layers and rotary embedding have hub-kernel mappings
    model = load_core_mapper(ckpt).model.from_pretrained(ckpt, dtype=torch.float32)
    assert model.use_kernels is False
    model.train()  # a mode change re-kernelizes a model that uses them
    assert model.use_kernels is False and model.kernels_mode is None
