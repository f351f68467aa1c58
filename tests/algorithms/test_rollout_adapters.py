"""LoRA rollouts from merged weights (``--rollout_adapters``, resonance.generation.adapters_merged): the merged
model's logits are the adapters' (float64), the base weights come back bit for bit (bf16 too, where PEFT's own
unmerge does not), what cannot be merged is said or refused by name, and PPO's and GRPO's rollouts decode merged
while every other pass runs through the adapters."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import REWARDS, train_argv, write_data
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import Linear as LoraLinear

import resonance.generation as generation
from resonance.base.registry import load_core_mapper
from resonance.commands.train import build_trainer, parse
from resonance.errors import ConfigError
from resonance.generation import adapters_merged, check_rollout_adapters


def _lora(ckpt: Path, dtype: torch.dtype, **lora: object) -> torch.nn.Module:
    """The tiny checkpoint in ``dtype`` with LoRA on the family's default targets, B drawn (not PEFT's zeros, which
    would make merged and separate the same trivially)."""
    vl_model = load_core_mapper(ckpt).model
    model = vl_model.from_pretrained(ckpt, dtype=dtype).eval()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=vl_model.lora_target_modules(vl_model.default_lora_target))
    for key, value in lora.items():
        setattr(config, key, value)
    model = get_peft_model(model, config)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    return model


def _base_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.arange(3, 40).reshape(1, -1)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def test_merged_logits_are_the_adapters(tiny_checkpoint: Callable[[str], Path]) -> None:
    model = _lora(tiny_checkpoint("qwen2_5_vl"), torch.float64)
    separate = _logits(model)
    with model.disable_adapter():
        plain = _logits(model)
    assert (separate - plain).abs().max() > 1e-2  # the adapters matter: merging them is not a no-op
    with adapters_merged(model, "merged") as merged:
        assert merged
        layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
        assert layers and all(m.merged for m in layers)
        torch.testing.assert_close(_logits(model), separate, rtol=1e-10, atol=1e-10)
    assert not any(m.merged for m in layers)
    torch.testing.assert_close(_logits(model), separate, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_base_weights_come_back_exactly(dtype: torch.dtype, tiny_checkpoint: Callable[[str], Path]) -> None:
    """Bit for bit, also after an error inside the block; PEFT's merge then unmerge does not give bf16 weights back,
    which is why the copy is kept."""
    model = _lora(tiny_checkpoint("llava"), dtype)
    before = _base_weights(model)
    with pytest.raises(RuntimeError, match="inside"), adapters_merged(model, "merged"):
        inside = _base_weights(model)
        raise RuntimeError("inside")
    changed = [n for n in before if not torch.equal(inside[n], before[n])]
    assert changed and all(".base_layer." in n for n in changed)
    after = _base_weights(model)
    assert all(torch.equal(after[n], before[n]) for n in before)
    assert not any(m.merged for m in model.modules() if isinstance(m, LoraLinear))
    if dtype == torch.bfloat16:
        model.merge_adapter()
        model.unmerge_adapter()
        assert any(not torch.equal(p, before[n]) for n, p in _base_weights(model).items())


def test_separate_and_models_without_adapters(tiny_checkpoint: Callable[[str], Path]) -> None:
    model = _lora(tiny_checkpoint("llava"), torch.float32)
    before = _base_weights(model)
    with adapters_merged(model, "separate") as merged:
        assert not merged
        assert all(torch.equal(p, before[n]) for n, p in _base_weights(model).items())
    with model.disable_adapter(), adapters_merged(model, "merged") as merged:
        assert not merged  # no adapter active: nothing to merge, and nothing refused
    plain = load_core_mapper(tiny_checkpoint("llava")).model.from_pretrained(tiny_checkpoint("llava"))
    with adapters_merged(plain, "merged") as merged:
        assert not merged


def test_what_cannot_be_merged(
    tiny_checkpoint: Callable[[str], Path], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DoRA: refused by name under merged, said once in the log under auto (which then decodes through the adapters);
    too little GPU memory for the copy: auto keeps the adapters separate."""
    monkeypatch.setattr(generation, "_said", set())
    model = _lora(tiny_checkpoint("llava"), torch.float32, use_dora=True)
    with pytest.raises(ConfigError, match=r"--rollout_adapters merged: .*DoRA.*pass --rollout_adapters auto"):
        with adapters_merged(model, "merged"):
            pass
    with caplog.at_level(logging.INFO, logger="resonance"):
        for _ in range(2):
            with adapters_merged(model, "auto") as merged:
                assert not merged
    said = [r.getMessage() for r in caplog.records if "DoRA" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("Rollouts go through the LoRA adapters' own layers"), said

    plain = _lora(tiny_checkpoint("llava"), torch.float32)
    monkeypatch.setattr(generation, "_room_for", lambda tensors: "no room on cuda:0 for a copy")
    with adapters_merged(plain, "auto") as merged:
        assert not merged
    with adapters_merged(plain, "merged") as merged:  # asked for: no memory guess stands in the way
        assert merged


def test_flag_values(tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    for value in ("auto", "merged", "separate"):
        check_rollout_adapters(value)
    with pytest.raises(ConfigError, match="--rollout_adapters fused: must be one of auto, merged, separate"):
        check_rollout_adapters("fused")
    data = write_data(tmp_path, "prompt")
    for algorithm in ("grpo", "ppo"):
        argv = train_argv(algorithm, tiny_checkpoint("llava"), data, tmp_path / "out", rollout_adapters="fused")
        with pytest.raises((ConfigError, SystemExit)):
            parse(algorithm, [*argv, "--reward_funcs", f"{REWARDS}:token_sum_reward"])


def _watch_rollouts(model: torch.nn.Module) -> list[tuple[bool, bool]]:
    """(inside generate, LoRA merged) for each forward pass of ``model``'s first LoRA layer."""
    layer = next(m for m in model.modules() if isinstance(m, LoraLinear))
    seen: list[tuple[bool, bool]] = []
    generating = [False]
    generate = model.generate

    def watched(*args, **kwargs):
        generating[0] = True
        try:
            return generate(*args, **kwargs)
        finally:
            generating[0] = False

    model.generate = watched
    layer.register_forward_pre_hook(lambda module, args: seen.append((generating[0], module.merged)))
    return seen


def _draw_lora_b(model: torch.nn.Module) -> None:
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_rollouts_decode_merged(algorithm: str, tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    """One step: every forward pass inside ``generate`` runs on merged weights, every other (log-probs, values, loss)
    through the adapters, and the frozen base weights are those the step started from, bit for bit."""
    data = write_data(tmp_path, "prompt")
    reward = f"{REWARDS}:token_sum_reward"
    argv = train_argv(algorithm, tiny_checkpoint("qwen2_5_vl"), data, tmp_path / "out", reward_funcs=reward)
    trainer, _ = build_trainer(algorithm, *parse(algorithm, [*argv, "--rollout_adapters", "merged"]))
    model = trainer.policy.model if algorithm == "ppo" else trainer.accelerator.unwrap_model(trainer.model)
    _draw_lora_b(model)
    before = _base_weights(model)
    seen = _watch_rollouts(model)
    trainer.train()
    assert {merged for generating, merged in seen if generating} == {True}
    assert {merged for generating, merged in seen if not generating} == {False}
    assert all(torch.equal(p, before[n]) for n, p in _base_weights(model).items() if n in before)


def test_expert_weights_stay_separate(tiny_checkpoint: Callable[[str], Path]) -> None:
    """LoRA on a mixture-of-experts decoder's 3-D expert weights (--lora_target_parameters auto) is PEFT's parameter
    wrapper, not a linear layer: refused by name under merged."""
    from resonance.algorithms.arguments import ModelArguments
    from resonance.algorithms.setup import apply_lora

    ckpt = tiny_checkpoint("qwen3_5_moe")
    vl_model = load_core_mapper(ckpt).model
    model = apply_lora(vl_model.from_pretrained(ckpt), vl_model, ModelArguments(model_name_or_path=str(ckpt)))
    with pytest.raises(ConfigError, match=r"--rollout_adapters merged: \S+ is a ParamWrapper"):
        with adapters_merged(model, "merged"):
            pass
    with adapters_merged(model, "auto") as merged:
        assert not merged
