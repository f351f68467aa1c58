"""GRPO (``resonance train grpo``, algorithms.grpo): learning, the command line, reward checks, family coverage,
and the GPU twin of the one-step test (marked gpu).

The reward functions are ``helpers.rewards``' (``--reward_funcs helpers.rewards:NAME``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any
from unittest.mock import patch

import pytest
import torch
from helpers import (
    FAMILIES,
    REWARDS,
    TARGET,
    make_image,
    one_bf16_step,
    run_resonance,
    save_png,
    train_argv,
    write_data,
)
from PIL import Image
from transformers import TrainerCallback

from resonance.algorithms import grpo
from resonance.algorithms.grpo import RewardFunctionError, load_reward_funcs
from resonance.base.model import unwrap
from resonance.base.registry import load_core_mapper
from resonance.commands.train import build_trainer, main, parse
from resonance.errors import UnsupportedModelError

# The families GRPO refuses, each for the reason resonance.algorithms.grpo.unsupported_reason gives (Molmo2: it
# needs image_grids and image_token_pooling, which TRL's GRPOTrainer does not pass to forward).
UNSUPPORTED = {"llama4", "molmo2", "ovis2"}


def _argv(ckpt: Path, tmp_path: Path, reward: str, **overrides: object) -> list[str]:
    """A quick GRPO run on the prompt rows (``helpers.write_data``) rewarded by ``helpers.rewards:REWARD``."""
    data = write_data(tmp_path, "prompt")
    return train_argv("grpo", ckpt, data, tmp_path / "out", reward_funcs=f"{REWARDS}:{reward}", **overrides)


# -------------------------------------------------------------------------------------------- learning


class _StopWhenLearned(TrainerCallback):
    """Ends training once the mean reward of the last 3 steps passes 0.6 (about 15 steps; 5 s on 2 idle cores)."""

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: D102
        rewards = [entry["reward"] for entry in state.log_history if "reward" in entry]
        if len(rewards) >= 5 and sum(rewards[-3:]) / 3 > 0.6:
            control.should_training_stop = True


def test_reward_rises(tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    """The mean reward (share of one chosen token in the completions) climbs from ~0 to most of the tokens.

    An update of the wrong sign drives the share to 0 (checked by hand: negating TRL's loss keeps every step's
    reward at 0 over 60 steps), so this fails for it.
    """
    ckpt = tiny_checkpoint("llava")
    mapper = load_core_mapper(ckpt)
    TARGET["id"] = mapper.processor(ckpt).tokenizer.convert_tokens_to_ids("a")
    overrides = {
        "max_steps": "60",
        "per_device_train_batch_size": "16",
        "num_generations": "16",
        "max_completion_length": "12",
        "learning_rate": "5e-2",
        "lr_scheduler_type": "constant",
        "lora_target_modules": "none",
    }
    model_args, data_args, config = parse("grpo", _argv(ckpt, tmp_path, "share_of_target", **overrides))
    trainer, _ = build_trainer("grpo", model_args, data_args, config)
    trainer.add_callback(_StopWhenLearned())
    trainer.train()
    rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
    assert all(math.isfinite(r) for r in rewards)
    first, last = sum(rewards[:5]) / 5, sum(rewards[-3:]) / 3
    assert first < 0.05, rewards  # a random model: about 1 token in 400
    assert last > 0.5 and last > first + 0.4, rewards  # stopped early (learned) or ran all 60 steps


# ------------------------------------------------------------------------------------------ command line


def test_cli_end_to_end(tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    """``resonance train grpo ...`` (the console script) trains LoRA and saves adapter + processor."""
    ckpt = tiny_checkpoint("llava")
    output_dir = tmp_path / "out"
    argv = _argv(ckpt, tmp_path, "constant_reward", max_steps=2, beta="0.04")
    result = run_resonance("train", "grpo", *argv, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    saved = {p.name for p in output_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "processor_config.json", "tokenizer.json"} <= saved
    assert f"saved to {output_dir.resolve()}" in result.stderr


# ---------------------------------------------------------------------------------------------- rewards


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("no_such_module_xyz:f", "--reward_funcs 'no_such_module_xyz:f': cannot import module"),
        (f"{REWARDS}:missing", f"--reward_funcs '{REWARDS}:missing': module '{REWARDS}' has no 'missing'"),
        (REWARDS, "write a reward function as 'module:function'"),
        (f"{REWARDS}:NOT_A_FUNCTION", "is not callable"),
        ("", "--reward_funcs is required"),
    ],
)
def test_bad_reward_name(name: str, message: str) -> None:
    with pytest.raises(RewardFunctionError, match=message.replace("(", r"\(")):
        load_reward_funcs(name)


def test_bad_reward_name_cli(tmp_path: Path, tiny_checkpoint: Callable[[str], Path], capsys) -> None:
    ckpt = tiny_checkpoint("llava")
    code = main("grpo", _argv(ckpt, tmp_path, "missing"))
    assert code == 2
    assert f"error: --reward_funcs '{REWARDS}:missing'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("reward", "message"),
    [
        ("nan_reward", r"returned nan for completion 3 of row .*prompts.jsonl:2: every reward must be a finite"),
        ("none_reward", r"returned None for completion 0 of row .*prompts.jsonl:1"),
        ("raising_reward", rf"{REWARDS}:raising_reward \(--reward_funcs\) raised KeyError: 'answer'"),
        ("short_reward", r"returned 1 rewards for 4 completions"),
    ],
)
def test_bad_reward_value_stops_before_update(
    reward: str, message: str, tmp_path: Path, tiny_checkpoint: Callable[[str], Path]
) -> None:
    """A NaN/None reward, a raising function or a wrong count is an error before any weight moves."""
    ckpt = tiny_checkpoint("llava")
    argv = _argv(ckpt, tmp_path, reward, shuffle_dataset=False)
    trainer, _ = build_trainer("grpo", *parse("grpo", argv))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    with pytest.raises(RewardFunctionError, match=message):
        trainer.train()
    after = dict(trainer.model.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in before.items())


# --------------------------------------------------------------------------------------------- families


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in UNSUPPORTED])
def test_one_step(family: str, tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    """One GRPO step (LoRA auto, frozen tower, KL to the adapter-disabled reference): LoRA B moves, the rest
    stays, the loss is finite."""
    ckpt = tiny_checkpoint(family)
    # Two prompts x 4 completions, rewarded so that different completions get different rewards: the step has
    # something to learn unless all 4 completions of both prompts are the same (checked below, not assumed).
    argv = _argv(ckpt, tmp_path, "completion_code", beta="0.04", per_device_train_batch_size=8, num_generations=4)
    trainer, _ = build_trainer("grpo", *parse("grpo", argv))
    model = trainer.model
    tower = load_core_mapper(ckpt).model.get_vision_tower(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    (logged,) = [entry for entry in trainer.state.log_history if "frac_reward_zero_std" in entry]
    assert logged["frac_reward_zero_std"] < 1, "every group's completions got equal rewards: nothing to learn"
    after = dict(model.named_parameters())
    lora_b = [n for n in before if ".lora_B." in n]
    assert lora_b
    assert any(not torch.equal(after[n], before[n]) for n in lora_b), "no LoRA weight trained"
    for name, value in before.items():
        if ".lora_" not in name:
            assert torch.equal(after[name], value), name
    assert not any(p.requires_grad for p in tower.parameters())
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses and all(math.isfinite(loss) for loss in losses)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "gemma3"])
def test_static_cache_completions(family: str, tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    """--cache_implementation static (what auto picks on a GPU, uncompiled here) samples the very completions of the
    dynamic cache (same seed, same draws: same rewards and lengths logged, same loss); auto on the CPU is dynamic."""
    ckpt = tiny_checkpoint(family)
    logged = {}
    for cache in ("static", "auto"):
        (tmp_path / cache).mkdir()
        argv = _argv(ckpt, tmp_path / cache, "completion_code", per_device_train_batch_size=8, num_generations=4)
        trainer, _ = build_trainer("grpo", *parse("grpo", [*argv, "--cache_implementation", cache]))
        trainer.train()
        (logged[cache],) = [entry for entry in trainer.state.log_history if "reward" in entry]
        base = trainer.accelerator.unwrap_model(trainer.model).get_base_model()
        if cache == "static":
            assert trainer.generation_config.cache_implementation == "static"
            assert not trainer.generation_config.disable_compile  # TRL turns it off; on a GPU the decode step compiles
            assert base._previous_max_cache_length % 256 == 0  # transformers' record of the static cache it made
        else:
            assert trainer.generation_config.cache_implementation is None
            assert not hasattr(base, "_previous_max_cache_length")
    for key in ("reward", "completions/mean_length", "completions/max_length"):
        assert logged["static"][key] == logged["auto"][key], key
    assert logged["static"]["loss"] == pytest.approx(logged["auto"]["loss"], abs=1e-5)


def test_auto_cache_is_static_on_a_gpu(
    tmp_path: Path, tiny_checkpoint: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """GRPO's auto is PPO's and ``resonance generate``'s: the static cache (and transformers' compiled decode step)
    where :func:`~resonance.generation.static_cache_by_default` says so (a GPU), dynamic where it does not."""
    import resonance.generation as generation

    argv = _argv(tiny_checkpoint("qwen2_5_vl"), tmp_path, "completion_code")
    for on_gpu, given, expected in ((True, "auto", "static"), (False, "auto", None), (True, "dynamic", None)):
        monkeypatch.setattr(generation, "static_cache_by_default", lambda model, kwargs, on_gpu=on_gpu: on_gpu)
        trainer, _ = build_trainer("grpo", *parse("grpo", [*argv, "--cache_implementation", given]))
        trainer._decode_settings(40)
        assert trainer.generation_config.cache_implementation == expected
        assert trainer.generation_config.disable_compile == (expected is None)


def test_one_embedding_hook_across_steps(tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    """TRL switches gradient checkpointing off and on around each generation; the input embeddings keep one hook
    (transformers 5.24 adds one per switch, and a compiled decode step recompiles for each: patches.input_grad_hooks),
    and the LoRA weights still get gradients through the checkpointed layers."""
    argv = _argv(tiny_checkpoint("qwen2_5_vl"), tmp_path, "completion_code", max_steps=3)
    trainer, _ = build_trainer("grpo", *parse("grpo", argv))
    embeddings = trainer.accelerator.unwrap_model(trainer.model).get_input_embeddings()
    counts = []

    class _Count(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # noqa: D102
            counts.append(len(embeddings._forward_hooks))

    trainer.add_callback(_Count())
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    assert counts == [1, 1, 1]
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters() if n in before)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava", "gemma3", "idefics3", "internvl"])
def test_group_prompt_encoded_and_prefilled_once(
    family: str, tmp_path: Path, tiny_checkpoint: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A group's prompt and images go through generation once (its num_generations completions sampled from one
    copy): the vision tower sees a quarter of the images it sees row by row, the prefill embeds a quarter of the
    rows, and the completions, rewards and loss are those of the row-by-row path (same seed, same draws)."""
    import resonance.algorithms.grpo as grpo

    ckpt = tiny_checkpoint(family)
    logged, encoded, prefilled = {}, {}, {}
    for grouped in (True, False):
        if not grouped:
            monkeypatch.setattr(grpo, "_group_size", lambda rows, size: 1)
        (tmp_path / str(grouped)).mkdir()
        argv = _argv(ckpt, tmp_path / str(grouped), "completion_code", per_device_train_batch_size=8, num_generations=4)
        trainer, _ = build_trainer("grpo", *parse("grpo", argv))
        tower = load_core_mapper(ckpt).model.get_vision_tower(trainer.model)
        sizes: list[int] = []
        tower.register_forward_pre_hook(
            lambda module, args, kwargs, sizes=sizes: sizes.append(_images_in(args, kwargs)), with_kwargs=True
        )
        rows: list[int] = []
        embeddings = unwrap(trainer.model).get_input_embeddings()
        embeddings.register_forward_hook(lambda module, args, output, rows=rows: rows.append(output.shape[0]))
        trainer.train()
        (logged[grouped],) = [entry for entry in trainer.state.log_history if "reward" in entry]
        encoded[grouped], prefilled[grouped] = sizes[0], rows[0]  # generation's passes come first
    assert encoded[True] * 4 == encoded[False]
    assert prefilled[True] * 4 == prefilled[False] == 8
    for key in ("reward", "completions/mean_length", "completions/max_length"):
        assert logged[True][key] == logged[False][key], key
    assert logged[True]["loss"] == pytest.approx(logged[False]["loss"], abs=1e-5)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava", "gemma3", "idefics3", "internvl"])
def test_loss_pass_images_encoded_once(
    family: str, tmp_path: Path, tiny_checkpoint: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loss pass takes the frozen tower's features encoded without gradients (TRL's forward would run the tower in
    the autograd graph, forward and backward): no tower call with gradients on, and the loss and gradient norm those of
    TRL's own path (which does run it with gradients: the test can tell them apart)."""
    from resonance.algorithms.grpo import VLGRPOTrainer

    ckpt = tiny_checkpoint(family)
    logged, with_grad = {}, {}
    for once in (True, False):
        if not once:
            monkeypatch.setattr(VLGRPOTrainer, "_images_encoded_once_each_forward", lambda *args: nullcontext())
        (tmp_path / str(once)).mkdir()
        # no LoRA dropout: the two runs may lay out the loss pass differently (Qwen's pixels run as rows, the
        # features over shared prompts), so they draw different dropout masks
        argv = _argv(
            ckpt, tmp_path / str(once), "completion_code", per_device_train_batch_size=8, num_generations=4,
            lora_dropout=0.0,
        )  # fmt: skip
        trainer, _ = build_trainer("grpo", *parse("grpo", argv))
        tower = load_core_mapper(ckpt).model.get_vision_tower(trainer.model)
        modes: list[bool] = []
        tower.register_forward_pre_hook(lambda module, args, modes=modes: modes.append(torch.is_grad_enabled()))
        trainer.train()
        (logged[once],) = [entry for entry in trainer.state.log_history if "loss" in entry]
        with_grad[once] = any(modes)
    assert not with_grad[True] and with_grad[False]
    assert logged[True]["loss"] == pytest.approx(logged[False]["loss"], abs=1e-5)
    assert logged[True]["grad_norm"] == pytest.approx(logged[False]["grad_norm"], rel=1e-4)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava", "gemma3", "idefics3", "internvl"])
def test_images_encoded_once_a_step(
    family: str, tmp_path: Path, tiny_checkpoint: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a reference pass (beta > 0) and an old-policy pass (two iterations over each generation batch), the
    images go through the vision tower once, for generation: the old-policy, reference and loss passes of both
    steps take the features generation encoded. The rewards, KL and losses are those of passes that encode their
    own, which run the tower in every pass (the test can tell them apart). The families of EACH_ROW_ENCODED encode
    in every pass."""
    ckpt = tiny_checkpoint(family)
    logged, calls = {}, {}
    for kept in (True, False):
        if not kept:
            monkeypatch.setattr(grpo.GroupFeatures, "inputs_of_rows", lambda *args: None)
        (tmp_path / str(kept)).mkdir()
        argv = _argv(
            ckpt, tmp_path / str(kept), "completion_code", per_device_train_batch_size=8, num_generations=4,
            beta=0.1, num_iterations=2, max_steps=2, lora_dropout=0.0,
        )  # fmt: skip
        trainer, _ = build_trainer("grpo", *parse("grpo", argv))
        tower = load_core_mapper(ckpt).model.get_vision_tower(trainer.model)
        seen: list[int] = []
        tower.register_forward_pre_hook(lambda module, args, kw, seen=seen: seen.append(1), with_kwargs=True)
        trainer.train()
        logged[kept] = [entry for entry in trainer.state.log_history if "loss" in entry]
        calls[kept] = len(seen)
    if family in EACH_ROW_ENCODED:  # features per tile: each pass encodes its rows' images
        assert calls[True] == calls[False] > 3
    else:
        assert calls[True] == 1 and calls[False] > 3  # generation; then old policy, reference and two loss passes
    assert len(logged[True]) == len(logged[False]) == 2
    assert logged[True][0]["reward"] == logged[False][0]["reward"]  # one generation batch, for both steps
    assert logged[False][1]["kl"] > 0  # the second step's policy is not the reference
    for ours, theirs in zip(logged[True], logged[False], strict=True):
        for key in ("loss", "kl", "entropy", "grad_norm"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-7), key


def _images_in(args: tuple, kwargs: dict) -> int:
    """The leading size of the pixels a vision tower's forward gets (images, tiles or patch rows)."""
    pixels = kwargs.get("pixel_values", args[0] if args else None)
    return int(pixels.shape[0])


@pytest.mark.parametrize("family", sorted(UNSUPPORTED))
def test_unsupported_family(family: str, tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    ckpt = tiny_checkpoint(family)
    argv = _argv(ckpt, tmp_path, "constant_reward")
    with pytest.raises(UnsupportedModelError, match="GRPO: .*TRL's GRPOTrainer"):
        build_trainer("grpo", *parse("grpo", argv))


def test_paligemma_completion_is_causal(tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    """PaliGemma's completion log-probs do not see later completion tokens (TRL marks them prefix: bidirectional)."""
    ckpt = tiny_checkpoint("paligemma")
    argv = _argv(ckpt, tmp_path, "constant_reward")
    trainer, processor = build_trainer("grpo", *parse("grpo", argv))
    prompt = processor.render_conversation(
        [{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "Caption."}]}],
        add_generation_prompt=True,
    )
    inputs = processor(text=[prompt], images=[[make_image(40, 30, seed=1)]])
    model = trainer.model
    logps = []
    first, second, third, other = processor.tokenizer("a b c d", add_special_tokens=False)["input_ids"][:4]
    assert processor.image_token_id not in (first, second, third, other)
    for last in (third, other):
        ids = torch.cat([inputs["input_ids"], torch.tensor([[first, second, last]])], dim=1)
        token_type_ids = torch.cat([inputs["token_type_ids"], torch.zeros(1, 3, dtype=torch.long)], dim=1)  # as TRL
        with torch.no_grad():
            out, _, _ = trainer._get_per_token_logps_and_entropies(
                model,
                ids,
                torch.ones_like(ids),
                3,
                pixel_values=inputs["pixel_values"],
                token_type_ids=token_type_ids,
                num_images=[1],
            )
        logps.append(out)
    torch.testing.assert_close(logps[0][:, :2], logps[1][:, :2])


def _two_prompts(folder: Path) -> tuple[list[dict[str, str]], Path]:
    """Two prompt rows of different lengths, each with an image of its own size, and their data file."""
    save_png(folder, "a.png", make_image(40, 30, seed=1))
    save_png(folder, "b.png", make_image(24, 48, seed=2))
    rows = [
        {"image": "a.png", "prompt": "<image>\nWhat shape is it?"},
        {"image": "b.png", "prompt": "<image>\nName every colour in this picture, then count the shapes in it."},
    ]
    data = folder / "prompts.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return rows, data


@pytest.mark.parametrize("family", ["mllama", "instructblip"])
def test_inputs_trl_drops_are_carried(family: str, tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    """Mllama's cross-attention mask and aspect ratios and InstructBLIP's Q-Former prompt, which TRL's trainer does not
    pass to its log-prob forward passes, reach them with each row (shuffled and split as TRL splits the batch): for
    prompts of different lengths, the loss pass's log-probs of each completion are those of a forward pass of its
    row alone, unpadded, on the processor's own inputs (the cross-attention mask extended over the completion as
    generate extends it)."""
    rows, data = _two_prompts(tmp_path)
    argv = train_argv(
        "grpo", tiny_checkpoint(family), data, tmp_path / "out", reward_funcs=f"{REWARDS}:completion_code",
        per_device_train_batch_size=4, num_generations=2, max_steps=1, beta=0.04, learning_rate="1e-30",
    )  # fmt: skip
    trainer, _ = build_trainer("grpo", *parse("grpo", argv))
    seen: list[tuple[dict, torch.Tensor]] = []
    compute_loss = trainer._compute_loss

    def spied(model, inputs):
        per_token = trainer._get_per_token_logps_and_entropies

        def record(*args, **kwargs):
            out = per_token(*args, **kwargs)
            seen.append((dict(inputs), out[0].detach()))
            return out

        trainer._get_per_token_logps_and_entropies = record
        try:
            return compute_loss(model, inputs)
        finally:
            del trainer._get_per_token_logps_and_entropies

    trainer._compute_loss = spied
    trainer.train()
    ((inputs, logps),) = seen
    (entry,) = [e for e in trainer.state.log_history if "kl" in e]
    assert entry["kl"] == pytest.approx(0, abs=1e-6)  # the reference pass (TRL's scoring inputs) agrees too

    hf, model = trainer.processing_class, trainer.model
    lengths = set()
    for row in range(inputs["prompt_ids"].shape[0]):
        prompt = inputs["prompt_ids"][row][inputs["prompt_mask"][row].bool()]
        completion = inputs["completion_ids"][row][inputs["completion_mask"][row].bool()]
        alone = None
        for source in rows:
            image = Image.open(tmp_path / source["image"]).convert("RGB")
            text = source["prompt"].replace("<image>\n", "")
            content = [{"type": "image", "image": image}, {"type": "text", "text": text}]
            candidate = hf.apply_chat_template(
                [{"role": "user", "content": content}],
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
                return_tensors="pt",
            )
            if torch.equal(candidate["input_ids"][0], prompt):
                alone = candidate
        assert alone is not None, "no prompt row renders to this row's prompt ids"
        lengths.add(len(prompt))
        forward = {k: v for k, v in alone.items() if k not in ("input_ids", "attention_mask")}
        if "cross_attention_mask" in forward:
            mask = forward["cross_attention_mask"]
            forward["cross_attention_mask"] = torch.cat([mask, mask[:, -1:].expand(-1, len(completion), -1, -1)], 1)
        ids = torch.cat([prompt, completion])[None]
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **forward).logits[
                0, len(prompt) - 1 : -1
            ]
        expected = torch.log_softmax(logits.float(), dim=-1).gather(1, completion[:, None])[:, 0]
        torch.testing.assert_close(logps[row, : len(completion)], expected, rtol=0, atol=2e-4)
    assert len(lengths) == 2  # prompts of two lengths in the batch: the padding was exercised


# one family per layout of the image inputs (per image, per patch, per row, per tile) and Gemma 3's token_type_ids
MIXED_BATCH_FAMILIES = ["llava", "qwen2_vl", "idefics3", "internvl", "gemma3"]


@pytest.mark.parametrize("family", MIXED_BATCH_FAMILIES)
def test_prompts_with_and_without_images_in_one_batch(
    family: str, tmp_path: Path, tiny_checkpoint: Callable[[str], Path]
) -> None:
    """A batch holding a prompt with an image and one without trains (TRL 1.16 marked the one without None and
    its processor call for the scoring inputs refused that: an internal error)."""
    save_png(tmp_path, "shape.png", make_image(40, 30, seed=1))
    rows = [{"image": "shape.png", "prompt": "<image>\nWhat shape is it?"}, {"prompt": "What is two plus two?"}]
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    argv = train_argv(
        "grpo",
        tiny_checkpoint(family),
        data,
        tmp_path / "out",
        reward_funcs=f"{REWARDS}:completion_code",
        per_device_train_batch_size=4,
        num_generations=2,
        max_steps=1,
    )
    trainer, _ = build_trainer("grpo", *parse("grpo", argv))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if ".lora_B." in n}
    trainer.train()
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters() if n in before)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses and all(math.isfinite(loss) for loss in losses)


@pytest.mark.gpu
@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in UNSUPPORTED])
def test_one_bf16_step_on_cuda(family: str, tiny_checkpoint, tmp_path: Path) -> None:
    """The GPU twin of test_one_step: one GRPO step in bf16 with gradient checkpointing, rollouts on the GPU."""
    data = write_data(tmp_path, "prompt")
    reward = f"{REWARDS}:token_sum_reward"
    one_bf16_step("grpo", tiny_checkpoint(family), data, tmp_path / "out", reward_funcs=reward, learning_rate="1e-3")


def _loss_pass_of_two_groups(tmp_path: Path, ckpt: Path) -> tuple[Any, tuple, dict]:
    """A GRPO trainer after one step on two prompts of different lengths, three completions each, and the
    positional and keyword arguments of its loss pass's log-prob call (on TRL's shuffled rows)."""
    _, data = _two_prompts(tmp_path)
    argv = train_argv(
        "grpo", ckpt, data, tmp_path / "out", reward_funcs=f"{REWARDS}:completion_code",
        per_device_train_batch_size=6, num_generations=3, max_steps=1, learning_rate="1e-30",
    )  # fmt: skip
    trainer, _ = build_trainer("grpo", *parse("grpo", argv))
    calls: list[tuple[tuple, dict]] = []
    per_token = trainer._get_per_token_logps_and_entropies

    def record(*args, **kwargs):
        calls.append((args, kwargs))
        return per_token(*args, **kwargs)

    trainer._get_per_token_logps_and_entropies = record
    trainer.train()
    del trainer._get_per_token_logps_and_entropies
    trainer._rollout_features = None  # the tests call the passes on the recorded pixels, in their own dtype
    return trainer, *calls[-1]


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in UNSUPPORTED])
def test_groups_share_their_prompt(family: str, tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    """A group's completions run as one row over one copy of their prompt in the log-prob and loss passes
    (``--shared_prompt``, families whose attention is plain causal): in float64, the loss pass's log-probs,
    entropies and LoRA gradients for TRL's shuffled batch of two groups, prompts of two lengths, equal those of a row
    per completion, for fewer tokens. The others (spec shared_prompt: false, or a router loss) run a row per
    completion. (Groups that TRL's shuffle interleaves: test_shared_prompt.)"""
    trainer, (model, ids, mask, keep), kwargs = _loss_pass_of_two_groups(tmp_path, tiny_checkpoint(family))
    assert sorted(trainer._groups.tolist()) == [0, 0, 0, 1, 1, 1]  # TRL's shuffled rows (interleaved or not)
    layouts = []
    plan = grpo.plan_groups

    def planned(*args, **kw):
        layouts.append(plan(*args, **kw))
        return layouts[-1]

    def log_probs(shared: bool) -> tuple:
        trainer.args.shared_prompt = shared
        model.zero_grad(set_to_none=True)
        with patch.object(grpo, "plan_groups", planned):
            logps, entropy, _ = trainer._get_per_token_logps_and_entropies(model, ids, mask, keep, **kwargs)
        (logps.double() * weights).sum().backward()  # the gradient of a loss that weighs each completion token
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        return logps.detach(), entropy.detach(), grads

    weights = torch.randn(mask.shape[0], keep, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    weights = weights * mask[:, -keep:]
    if not trainer.vl_model.shares_prompt or trainer.aux_loss_enabled:  # (the router loss reads the rows' mask)
        log_probs(True)
        assert layouts == []
        return
    model.double()
    for module in model.modules():  # LoRA dropout: the same masks for both layouts' gradients
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    kwargs = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kwargs.items()}
    trainer._carried = {k: v.double() if v.is_floating_point() else v for k, v in trainer._carried.items()}
    rows_seen: list[int] = []  # the rows each forward pass embeds: the shared rows, not the batch's
    hook = unwrap(model).get_input_embeddings().register_forward_hook(lambda m, i, o: rows_seen.append(o.shape[0]))
    results = {shared: log_probs(shared) for shared in (False, True)}
    hook.remove()
    assert rows_seen == [len(ids), 2]
    (layout,) = layouts
    assert layout is not None, "every row of the batch shares its prompt with its group"
    assert layout.groups == 2 and layout.tokens < int(mask.sum())
    (rows_logps, rows_entropy, rows_grads), (shared_logps, shared_entropy, shared_grads) = results[False], results[True]
    completion = mask[:, -keep:].bool()
    assert bool((rows_logps[completion] != 0).all()) and bool((rows_entropy[completion] != 0).all())
    # The model runs in float64; TRL's fused head returns float32: the two layouts' hidden states agree to float64
    # rounding, so their log-probs to float32's, within a few units in the last place.
    tolerance = 4 * torch.finfo(rows_logps.dtype).eps
    torch.testing.assert_close(shared_logps[completion], rows_logps[completion], rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(shared_entropy[completion], rows_entropy[completion], rtol=tolerance, atol=tolerance)
    # The gradients go back through the fused head's float32 log-probs: equal to float32's precision, as whole
    # tensors relative to their norm (the shared prompt adds its completions' gradients in another order).
    assert rows_grads.keys() == shared_grads.keys() and any(".lora_B." in name for name in rows_grads)
    for name, grad in rows_grads.items():
        error, norm = (shared_grads[name] - grad).norm().item(), grad.norm().item()
        assert norm > 0 and error <= 100 * tolerance * norm, f"{name}: {error / norm:.1e} of its norm"


# Families whose loss pass encodes every row's images, not each group's once: their image inputs are laid out per tile
# (InternVL), their features are not one entry per image (Ovis2's, Molmo2's; Idefics3's and SmolVLM's too where an
# image is split into sub-images, which the tiny test images are not), or the spec gives the tower's output to the
# forward itself (Mllama's image.features_input).
EACH_ROW_ENCODED = ["internvl", "mllama", "molmo2", "ovis2"]
# Mixture-of-experts families, whose grouped matrix products take no float64: compared in float32.
FLOAT32_ONLY = ["qwen3_5_moe", "qwen3_vl_moe"]


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in UNSUPPORTED])
def test_loss_pass_encodes_each_groups_images_once(
    family: str, tmp_path: Path, tiny_checkpoint: Callable[[str], Path]
) -> None:
    """In the log-prob and loss passes a group's images are encoded once, for its first row, and its other rows take
    those features: in float64, for TRL's shuffled batch of two groups of three run a row per completion (so that
    every row reads its copy), the log-probs and entropies equal those of every row's images encoded, and the vision
    tower sees a third of the images (or patches). The families of EACH_ROW_ENCODED encode every row's."""
    trainer, (model, ids, mask, keep), kwargs = _loss_pass_of_two_groups(tmp_path, tiny_checkpoint(family))
    dtype = torch.float32 if family in FLOAT32_ONLY else torch.float64
    model.to(dtype)
    kwargs = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kwargs.items()}
    trainer._carried = {k: v.to(dtype) if v.is_floating_point() else v for k, v in trainer._carried.items()}
    tower = load_core_mapper(tiny_checkpoint(family)).model.get_vision_tower(unwrap(model))
    seen: list[int] = []
    tower.register_forward_pre_hook(lambda module, args, kw: seen.append(_images_in(args, kw)), with_kwargs=True)
    trainer.args.shared_prompt = False  # a row per completion: each row reads its own copy of the group's features
    results, images = {}, {}
    for by_group in (False, True):
        seen.clear()
        each_row = patch.object(
            type(trainer),
            "_image_model_inputs_by_group",
            lambda self, model, inputs, groups, images: self._image_model_inputs(model, inputs, copies=1),
        )
        with torch.no_grad(), nullcontext() if by_group else each_row:
            results[by_group] = trainer._get_per_token_logps_and_entropies(model, ids, mask, keep, **kwargs)[:2]
        images[by_group] = sum(seen)
    assert sorted(trainer._groups.tolist()) == [0, 0, 0, 1, 1, 1]
    if family in EACH_ROW_ENCODED:
        assert images[True] == images[False] > 0
    else:
        assert images[True] * 3 == images[False] > 0
    completion = mask[:, -keep:].bool()
    tolerance = 4 * torch.finfo(torch.float32).eps  # TRL's fused head returns float32
    for ours, theirs in zip(results[True], results[False], strict=True):
        assert bool((theirs[completion] != 0).all())
        torch.testing.assert_close(ours[completion], theirs[completion], rtol=tolerance, atol=tolerance)
