"""Gradient checkpointing switched off and on, as TRL's trainers do around each generation, leaves a PEFT model's
input embeddings with one hook, which still makes them require gradients (resonance.patches.input_grad_hooks)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from resonance.generation import load_for_generation
from resonance.patches import input_grad_hooks


def test_one_hook_however_often_checkpointing_is_switched_on(tiny_checkpoint: Callable[[str], Path]) -> None:
    input_grad_hooks.install()
    input_grad_hooks.install()  # twice: still one wrapper
    _, model, _ = load_for_generation(tiny_checkpoint("qwen2_5_vl"), "cpu")
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    embeddings = model.get_input_embeddings()
    for _ in range(3):
        model.gradient_checkpointing_enable({"use_reentrant": True})
        model.gradient_checkpointing_disable()
    model.gradient_checkpointing_enable({"use_reentrant": True})
    assert len(embeddings._forward_hooks) == 1
    model.train()
    ids = torch.randint(10, 100, (1, 6))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()  # reentrant checkpointing: LoRA gradients only if the embeddings' output requires them
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]  # lora_A: zero while B starts at zero
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
