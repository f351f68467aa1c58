"""VLModelWithValueHead: shapes and positions, rollout log-probs against generate(), save/reload, LoRA placement,
and one forward/backward per family."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import (
    FAMILIES,
    expected_lora_layers,
    load_adapter,
    make_image,
    preference_rows,
    repeat_images,
    save_png,
    write_jsonl,
)
from peft.tuners.lora import LoraLayer

from resonance.algorithms.arguments import ModelArguments
from resonance.algorithms.setup import apply_lora
from resonance.base.logprobs import token_log_probs
from resonance.base.model import VLModel, unwrap
from resonance.base.registry import ModelCoreMapper
from resonance.base.value import VALUE_CONFIG, VALUE_HEAD, VLModelWithValueHead
from resonance.data.rows import read_rows
from resonance.generation import generate_batch, generation_kwargs


def _value_model(ckpt: Path, lora: str = "auto") -> tuple[ModelCoreMapper, VLModelWithValueHead]:
    mapper, _ = load_adapter(ckpt)
    model = mapper.model.from_pretrained(ckpt, dtype=torch.float32)
    mapper.model.freeze_vision_tower(model)
    model = apply_lora(model, mapper.model, ModelArguments(model_name_or_path=str(ckpt), lora_target_modules=lora))
    return mapper, VLModelWithValueHead(model, vl_model=mapper.model)


def _perturb(value_model: VLModelWithValueHead) -> None:
    """Move every trainable weight (LoRA B starts at 0), so a reload that dropped any would differ."""
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in value_model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn_like(parameter))


def _batch(tmp_path: Path, ckpt: Path) -> dict[str, Any]:
    """Prompts with answers in the training layout (right padding), the images repeated for every row."""
    mapper, processor = load_adapter(ckpt)
    processor.train()
    rows = preference_rows(
        tmp_path,
        images_required=processor.images_required,
        multi_image=processor.multi_image,
        takes_system=processor.takes_system,
    )
    batch = repeat_images(mapper.dpo_collator(processor)(rows), processor)
    batch.pop("completion_mask")
    return batch


def test_shapes_positions_and_model_logits(tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    ckpt = tiny_checkpoint("llava")
    _, value_model = _value_model(ckpt)
    _perturb(value_model)
    value_model.eval()
    batch = _batch(tmp_path, ckpt)
    rows, length = batch["input_ids"].shape
    vocab = unwrap(value_model).get_output_embeddings().out_features
    with torch.no_grad():
        full = value_model(**batch)
        reference = unwrap(value_model.model)(**batch).logits
        response = value_model(**batch, response_length=5)
        hot = value_model(**batch, response_length=5, temperature=2.0, return_logits=False)
    assert full.logits.shape == (rows, length, vocab) and full.values.shape == (rows, length)
    assert full.values.dtype == torch.float32 and full.log_probs is None
    torch.testing.assert_close(full.logits, reference, rtol=0, atol=1e-5)  # the model's own logits
    # values differ along a row and between rows
    assert full.values[0].unique().numel() == length and not torch.allclose(full.values[0], full.values[1])

    # response_length R: positions L-R-1 .. L-2, which predict the last R tokens
    assert response.logits.shape == (rows, 5, vocab) and response.values.shape == response.log_probs.shape == (rows, 5)
    torch.testing.assert_close(response.logits, full.logits[:, length - 6 : length - 1], rtol=0, atol=0)
    torch.testing.assert_close(response.values, full.values[:, length - 6 : length - 1], rtol=0, atol=0)
    tokens = batch["input_ids"][:, length - 5 :]
    expected = torch.log_softmax(full.logits[:, length - 6 : length - 1], dim=-1).gather(-1, tokens[..., None])
    torch.testing.assert_close(response.log_probs, expected.squeeze(-1), rtol=0, atol=1e-6)
    assert hot.logits is None
    torch.testing.assert_close(hot.log_probs, token_log_probs(response.logits, tokens, temperature=2.0))
    assert not torch.allclose(hot.log_probs, response.log_probs)
    for bad in (0, length):
        with pytest.raises(ValueError, match="response_length"):
            value_model(**batch, response_length=bad)


def test_rollout_log_probs_match_generate(tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    """Left-padded rollouts from generate_batch: the log-probs of the generated tokens are generate()'s own."""
    ckpt = tiny_checkpoint("llava")
    mapper, value_model = _value_model(ckpt)
    _perturb(value_model)
    value_model.eval()
    _, processor = load_adapter(ckpt)
    prompts = [
        {"prompt": [{"role": "user", "content": "<image>\nWhat is it?"}], "image": "a.png"},
        {"prompt": "<image>\nDescribe the picture in a few more words, please.", "image": "a.png"},
    ]
    save_png(tmp_path, "a.png", make_image(40, 30, seed=3))
    rows = read_rows(
        write_jsonl(tmp_path / "p.jsonl", prompts), "prompt", image_placeholder=processor.image_placeholder
    ).rows
    model = value_model.model
    kwargs = generation_kwargs(mapper.model, model, {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False})
    rollout = generate_batch(model, processor, mapper.model, rows, kwargs)
    prompt_mask = rollout.inputs["attention_mask"]
    assert not prompt_mask[:, 0].all(), "the prompts must be left-padded"
    with torch.no_grad():
        reference = model.generate(**rollout.inputs, **kwargs, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(reference.sequences, rollout.sequences)
    generated = rollout.sequences[:, prompt_mask.shape[1] :]
    expected = token_log_probs(torch.stack(reference.logits, dim=1), generated)

    images = {k: v for k, v in rollout.inputs.items() if k not in ("input_ids", "attention_mask")}
    mask = torch.cat([prompt_mask, torch.ones_like(generated)], dim=1)
    with torch.no_grad():
        out = value_model(rollout.sequences, mask, response_length=generated.shape[1], **images)
    torch.testing.assert_close(out.log_probs, expected, rtol=0, atol=1e-4)
    assert out.values.shape == generated.shape


@pytest.mark.parametrize("lora", ["auto", "none"])
def test_save_reload_identical(lora: str, tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    ckpt = tiny_checkpoint("llava")
    mapper, value_model = _value_model(ckpt, lora)
    assert value_model.is_lora == (lora == "auto")
    _perturb(value_model)
    value_model.eval()
    batch = _batch(tmp_path, ckpt)
    with torch.no_grad():
        before = value_model(**batch, response_length=4)

    out = tmp_path / "value"
    value_model.save_pretrained(out)
    weights = {"adapter_model.safetensors", "adapter_config.json"} if lora == "auto" else {"model.safetensors"}
    assert weights | {VALUE_HEAD, VALUE_CONFIG} <= {p.name for p in out.iterdir()}
    description = json.loads((out / VALUE_CONFIG).read_text())
    assert description["format"] == "resonance-value-model" and description["head"] == VALUE_HEAD
    assert description["backbone"] == ("lora" if lora == "auto" else "full")
    assert description["hf_model_class"] == mapper.model.hf_model_class

    reloaded = VLModelWithValueHead.from_pretrained(out, dtype=torch.float32).eval()
    assert isinstance(reloaded, VLModelWithValueHead) and reloaded.family is mapper.model
    assert reloaded.is_lora == value_model.is_lora
    with torch.no_grad():
        after = reloaded(**batch, response_length=4)
    for name in ("logits", "log_probs", "values"):
        assert torch.equal(getattr(after, name), getattr(before, name)), name
    # Not vacuous: a fresh head gives other values, and the LoRA/full weights moved the logits.
    with torch.no_grad():
        fresh = VLModelWithValueHead(reloaded.model, vl_model=mapper.model)(**batch, response_length=4)
        base = mapper.model.from_pretrained(ckpt, dtype=torch.float32)
        original = VLModelWithValueHead(base, vl_model=mapper.model)(**batch, response_length=4)
    assert not torch.allclose(fresh.values, before.values)
    assert not torch.allclose(original.logits, before.logits)

    with pytest.raises(FileNotFoundError, match="not a value model"):
        VLModelWithValueHead.from_pretrained(ckpt)


def test_needs_the_family(tiny_checkpoint: Callable[[str], Path]) -> None:
    mapper, _ = load_adapter(tiny_checkpoint("llava"))
    model = mapper.model.from_pretrained(tiny_checkpoint("llava"), dtype=torch.float32)
    with pytest.raises(TypeError, match="needs the family's VLModel class"):
        VLModelWithValueHead(model)
    with pytest.raises(ValueError, match="value model head is 3->1"):
        VLModelWithValueHead(model, vl_model=mapper.model, v_head=torch.nn.Linear(3, 1))


def _check_lora_and_grads(value_model: VLModelWithValueHead, vl_model: type[VLModel]) -> None:
    """LoRA sits only under the language model (on the spec's targets); after a backward, the value head and
    the LoRA weights have gradients, the vision tower none."""
    base = unwrap(value_model)
    language_model = "model.base_model.model." + vl_model.language_model_path + "."
    lora_modules = [name for name, module in value_model.named_modules() if isinstance(module, LoraLayer)]
    assert lora_modules and all(name.startswith(language_model) for name in lora_modules)
    expected = {"model.base_model.model." + name for name in expected_lora_layers(base, vl_model)}
    assert set(lora_modules) == expected
    grad = value_model.v_head.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    lora_grads = [p.grad for n, p in value_model.named_parameters() if "lora_" in n and p.grad is not None]
    assert lora_grads and any(g.abs().sum() > 0 for g in lora_grads)
    trainable = {n for n, p in value_model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in trainable if "lora_" in n} | {"v_head.weight", "v_head.bias"}
    assert all(p.grad is None for p in vl_model.get_vision_tower(base).parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_backward_every_family(family: str, tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    ckpt = tiny_checkpoint(family)
    mapper, value_model = _value_model(ckpt)
    _perturb(value_model)
    value_model.eval()  # no LoRA dropout: the same logits as the reference pass below
    batch = _batch(tmp_path, ckpt)
    length = batch["input_ids"].shape[1]
    out = value_model(**batch, response_length=3)
    assert out.values.shape == out.log_probs.shape == (batch["input_ids"].shape[0], 3)
    assert out.values.dtype == out.log_probs.dtype == torch.float32
    with torch.no_grad():  # the LM head as the model applies it (soft-capping and all)
        reference = unwrap(value_model.model)(**batch).logits[:, length - 4 : length - 1]
    torch.testing.assert_close(out.logits.detach(), reference, rtol=0, atol=1e-4)
    longest = int(batch["attention_mask"][:, -1].argmax())  # a row whose last 3 tokens are real, not padding
    assert batch["attention_mask"][longest, -1] and out.values[longest].unique().numel() == 3
    (out.values.pow(2).mean() - out.log_probs.mean()).backward()
    _check_lora_and_grads(value_model, mapper.model)


@pytest.mark.parametrize("family", ["gemma3", "paligemma"])
def test_logits_soft_capping_as_the_model(family: str, tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    """Gemma text configs may cap the final logits (``tanh(x / c) * c``); the value model caps where the model does."""
    ckpt = tiny_checkpoint(family)
    _, value_model = _value_model(ckpt, "none")
    value_model.eval()
    batch = _batch(tmp_path, ckpt)
    base = unwrap(value_model.model)
    with torch.no_grad():
        uncapped = value_model(**batch).logits
        base.config.get_text_config().final_logit_softcapping = 0.05
        capped = value_model(**batch).logits
        reference = base(**batch).logits
    torch.testing.assert_close(capped, reference, rtol=0, atol=1e-6)
    assert uncapped.abs().max() > 0.05
    if family == "paligemma":  # PaliGemmaForConditionalGeneration caps; Gemma3ForConditionalGeneration does not
        assert capped.abs().max() <= 0.05
    else:
        torch.testing.assert_close(capped, uncapped, rtol=0, atol=0)


def test_gradient_checkpointing_with_lora(tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    """Checkpointed blocks under LoRA (frozen embeddings) still give gradients, with Trainer's own options."""
    ckpt = tiny_checkpoint("llava")
    mapper, value_model = _value_model(ckpt)
    value_model.gradient_checkpointing_enable({"use_reentrant": True}, every_n_layers=1)
    assert unwrap(value_model).is_gradient_checkpointing
    out = value_model(**_batch(tmp_path, ckpt), response_length=2)
    (out.values.mean() - out.log_probs.mean()).backward()
    _check_lora_and_grads(value_model, mapper.model)
    value_model.gradient_checkpointing_disable()
    assert not unwrap(value_model).is_gradient_checkpointing
