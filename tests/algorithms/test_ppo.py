"""PPO (``resonance train ppo``, algorithms.ppo): learning, rollout log-probs, one step per family, rewards from
functions and reward models, resume, evaluation, the command line and bad input, and the GPU twin of the
one-step test (marked gpu).

The reward functions are ``helpers.rewards``' (``--reward_funcs helpers.rewards:NAME``).
"""

from __future__ import annotations

import collections
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path

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
    write_jsonl,
)

from resonance.algorithms.arguments import ModelArguments
from resonance.algorithms.ppo.config import VLPPOConfig
from resonance.algorithms.ppo.math import masked_whiten
from resonance.algorithms.ppo.rewards import REWARD_ADAPTER
from resonance.algorithms.ppo.rollout import extend_per_token_inputs, whiten_across
from resonance.algorithms.ppo.trainer import VLPPOTrainer
from resonance.algorithms.setup import apply_lora
from resonance.base.logprobs import token_log_probs
from resonance.base.model import unwrap
from resonance.base.registry import load_core_mapper
from resonance.base.reward import VLRewardModel
from resonance.base.value import VALUE_CONFIG, VALUE_HEAD, VLModelWithValueHead
from resonance.commands.train import build_trainer, main, parse
from resonance.errors import ConfigError, RewardFunctionError
from resonance.generation import generate_batch


def _argv(ckpt: Path, data: Path, output_dir: Path, reward: str | None, **overrides: object) -> list[str]:
    """A quick PPO run rewarded by ``helpers.rewards:REWARD`` (None: no reward function)."""
    reward_funcs = f"{REWARDS}:{reward}" if reward else None
    return train_argv("ppo", ckpt, data, output_dir, reward_funcs=reward_funcs, **overrides)


def _trainable(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.policy.named_parameters() if p.requires_grad}


# -------------------------------------------------------------------------------------------- learning


def test_reward_rises(tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    """The mean reward (share of one token in the responses) climbs from a few percent to most tokens.

    Full training with kl_coef 0 (no reference, so no frozen copy). The target is the token the untrained model
    samples most, about 1 token in 70. Negating the policy advantages keeps the share at 0-1% over the same 40
    steps (checked by hand), so an update of the wrong sign fails this test.
    """
    ckpt = tiny_checkpoint("llava")
    overrides = {
        "max_steps": "40",
        "per_device_train_batch_size": "16",
        "num_mini_batches": "1",
        "response_length": "12",
        "learning_rate": "3e-3",
        "lr_scheduler_type": "constant",
        "lora_target_modules": "none",
        "kl_coef": "0",
    }
    trainer, processor = build_trainer(
        "ppo",
        *parse("ppo", _argv(ckpt, write_data(tmp_path, "prompt"), tmp_path / "out", "share_of_target", **overrides)),
    )
    assert trainer.ref_model is None  # kl_coef 0: no frozen copy
    torch.manual_seed(123)
    rows = [trainer.train_dataset[i % 2] for i in range(32)]
    sample = generate_batch(trainer.policy.model, processor, None, rows, trainer.generation_kwargs)
    counts = collections.Counter(token for ids in sample.token_ids for token in ids)
    TARGET["id"] = counts.most_common(1)[0][0]
    while trainer.global_step < trainer.total_steps:  # stops once learned (about 25 steps, 2.5 s on 2 cores)
        trainer.log(trainer.step())
        trainer.global_step += 1
        rewards = [entry["reward"] for entry in trainer.log_history]
        if len(rewards) >= 5 and sum(rewards[-3:]) / 3 > 0.6:
            break
    assert all(math.isfinite(r) for r in rewards)
    first, last = sum(rewards[:5]) / 5, sum(rewards[-3:]) / 3
    assert first < 0.05, rewards
    assert last > 0.5 and last > first + 0.4, rewards


# ---------------------------------------------------------------------------------------------- families


@pytest.mark.parametrize("family", FAMILIES)
def test_rollout_and_one_step(family: str, tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    """Per family, LoRA auto and a frozen tower:

    * the rollout's log-probs are those of ``generate``'s own logits (so the response's per-token inputs, the
      images encoded once and the left padding reproduce what generation saw), and the reference's equal them
      before any update (LoRA B = 0);
    * one PPO step moves LoRA and the value head only, gives the vision tower no gradient, logs finite metrics.
    """
    ckpt = tiny_checkpoint(family)
    argv = _argv(ckpt, write_data(tmp_path, "prompt"), tmp_path / "out", "token_sum_reward")
    trainer, processor = build_trainer("ppo", *parse("ppo", argv))
    _check_rollout(trainer)

    model = trainer.policy
    tower = load_core_mapper(ckpt).model.get_vision_tower(unwrap(model))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    after = dict(model.named_parameters())
    assert any(not torch.equal(after[n], before[n]) for n in before if ".lora_B." in n), "no LoRA weight trained"
    assert not torch.equal(after["v_head.weight"], before["v_head.weight"])
    for name, value in before.items():
        if ".lora_" not in name and not name.startswith("v_head."):
            assert torch.equal(after[name], value), name
    assert not any(p.requires_grad or p.grad is not None for p in tower.parameters())
    (entry,) = trainer.log_history
    for key in ("reward", "kl", "entropy", "clip_fraction", "value_error", "policy_loss", "value_loss"):
        assert math.isfinite(entry[key]), (key, entry)
    assert entry["entropy"] > 0 and entry["response_length"] == 4


def _check_rollout(trainer) -> None:
    """A greedy rollout of two rows through the trainer's engine and settings: its sequences and log-probs are those
    of transformers' plain ``generate`` (dynamic cache) on the same batch, its reference's equal its own."""
    greedy = {**trainer.generation_kwargs, "do_sample": False, "min_new_tokens": 4}
    sampling, trainer.generation_kwargs = trainer.generation_kwargs, greedy
    rows = [trainer.train_dataset[0], trainer.train_dataset[1]]
    rollout, counts = trainer.generate_and_score(rows)
    trainer.generation_kwargs = sampling
    batch = trainer.data_collator(rows)
    inputs = {k: v for k, v in batch["inputs"].items() if k != "labels"}
    plain = {k: v for k, v in greedy.items() if k != "cache_implementation"}
    policy, training = trainer.policy.model, trainer.policy.model.training
    policy.eval()  # as the rollout generates (resonance.generation): Molmo2 asks for training inputs in training
    with torch.no_grad():
        reference = policy.generate(**inputs, **plain, output_logits=True, return_dict_in_generate=True)
    policy.train(training)
    assert torch.equal(reference.sequences, rollout.sequences)
    response = rollout.sequences[:, inputs["input_ids"].shape[1] :]
    logits = torch.stack(reference.logits, dim=1)
    logits[..., trainer.suppressed_tokens] = -math.inf
    torch.testing.assert_close(rollout.logprobs, token_log_probs(logits, response), rtol=0, atol=2e-4)
    torch.testing.assert_close(rollout.ref_logprobs, rollout.logprobs, rtol=0, atol=1e-5)
    assert counts["rows"] == 2 and rollout.mask.all()


def _four_prompts(tmp_path: Path, ckpt: Path) -> tuple[VLPPOTrainer, list[dict]]:
    """A PPO trainer (two micro-batches of two rows, greedy) and four prompt rows of different lengths and image
    sizes, the first micro-batch's prompts padded less alone than with the others."""
    questions = ["What is it?", "Why?", "Describe the colours of this picture, one by one.", "Count the shapes."]
    for i in range(4):
        save_png(tmp_path, f"p{i}.png", make_image(24 + 8 * i, 32, seed=i))
    data = write_jsonl(
        tmp_path / "p.jsonl", [{"prompt": f"<image>\n{q}", "images": [f"p{i}.png"]} for i, q in enumerate(questions)]
    )
    argv = _argv(ckpt, data, tmp_path / "out", "token_sum_reward", num_mini_batches=2)
    trainer, _ = build_trainer("ppo", *parse("ppo", argv))
    trainer.generation_kwargs = {**trainer.generation_kwargs, "do_sample": False}
    rows = [trainer.train_dataset[i] for i in range(4)]
    lengths = [trainer.data_collator([row])["inputs"]["input_ids"].shape[1] for row in rows]
    assert max(lengths[:2]) != max(lengths)
    return trainer, rows


def test_no_reference_without_a_kl_penalty(
    tmp_path: Path, tiny_checkpoint: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--kl_coef 0 scores no reference: under LoRA the adapters are never disabled, the rollouts hold no reference
    log-probs, no ``kl`` is logged, and the step still trains. A frozen copy passed for nothing is refused."""
    ckpt = tiny_checkpoint("qwen2_5_vl")
    data = write_data(tmp_path, "prompt")
    trainer, _ = build_trainer("ppo", *parse("ppo", _argv(ckpt, data, tmp_path / "out", "token_sum_reward", kl_coef=0)))
    assert trainer.policy.is_lora and trainer.ref_model is None
    disabled: list[int] = []
    disable = trainer.policy.model.disable_adapter
    monkeypatch.setattr(trainer.policy.model, "disable_adapter", lambda: disabled.append(1) or disable())
    scored: list = []
    score = trainer.generate_and_score
    monkeypatch.setattr(trainer, "generate_and_score", lambda rows: scored.append(score(rows)) or scored[-1])
    before = _trainable(trainer)
    metrics = trainer.step()
    assert not disabled and scored and all(rollout.ref_logprobs is None for rollout, _ in scored)
    assert "kl" not in metrics and math.isfinite(metrics["policy_loss"])
    assert any(not torch.equal(before[n], p) for n, p in _trainable(trainer).items())
    trainer.args.kl_coef = 0.05  # the same trainer with a penalty disables the adapters for its reference
    trainer.step()
    assert disabled
    config = VLPPOConfig(output_dir=str(tmp_path / "other"), reward_funcs="x:y", kl_coef=0.0, bf16=False)
    with pytest.raises(ValueError, match="kl_coef 0 nothing reads a reference"):
        VLPPOTrainer(
            trainer.policy,
            config,
            trainer.train_dataset,
            vl_model=trainer.vl_model,
            vl_processor=trainer.vl_processor,
            reward_funcs=[lambda *a, **k: [0.0]],
            ref_model=torch.nn.Linear(1, 1),
        )


# Families whose step's batch does not split by row, so that each micro-batch is collated (and its images encoded)
# again for scoring: InstructBLIP's query tokens come before the left padding; InternVL's features are per tile,
# Ovis2's and Molmo2's in runs that are neither per row nor per image.
COLLATED_AGAIN = ["instructblip", "internvl", "molmo2", "ovis2"]


@pytest.mark.parametrize("family", FAMILIES)
def test_step_rollouts_equal_micro_batches_alone(
    family: str, tmp_path: Path, tiny_checkpoint: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step's rows are sampled in one generate call and scored per micro-batch: greedy, each micro-batch's
    sequences, log-probs, values and reference log-probs are those of generating it alone (its own prompt padding,
    its responses cut to its longest). Where the batch splits by row (all but COLLATED_AGAIN), the images are encoded
    once for the step, before generation, and no micro-batch is collated again."""
    trainer, rows = _four_prompts(tmp_path, tiny_checkpoint(family))
    collated: list[int] = []
    collate = trainer.data_collator
    monkeypatch.setattr(trainer, "data_collator", lambda batch: collated.append(len(batch)) or collate(batch))
    base = unwrap(trainer.policy.model)
    encodings: list[int] = []
    encode = getattr(base, "get_image_features", None)  # Mllama encodes through its spec's features_input
    if encode is not None:
        monkeypatch.setattr(base, "get_image_features", lambda *a, **k: encodings.append(1) or encode(*a, **k))
    whole = trainer.generate(rows)
    for start in (0, 2):
        trainer.sampled = (whole, start)
        shared, _ = trainer.generate_and_score(rows[start : start + 2])
        assert trainer.sampled is None
        alone, _ = trainer.generate_and_score(rows[start : start + 2])
        assert torch.equal(shared.sequences, alone.sequences) and torch.equal(shared.mask, alone.mask)
        for key in ("logprobs", "values", "ref_logprobs", "scores"):
            torch.testing.assert_close(getattr(shared, key), getattr(alone, key), rtol=0, atol=1e-6)
    if family in COLLATED_AGAIN:
        assert collated == [4, 2, 2, 2, 2], collated
    else:  # the step's batch collated once and its images encoded once; each micro-batch alone: once each
        assert collated == [4, 2, 2], collated
        assert len(encodings) == (0 if encode is None else 3), encodings


def test_step_samples_in_one_generate_call(
    tmp_path: Path, tiny_checkpoint: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step samples its rows in one generate call (decoding 4 rows takes about as long as 2); --generation_batch_size
    2 is one call per micro-batch again, and so is a project's own generate_and_score (PPOTrainerHooks)."""
    trainer, _ = _four_prompts(tmp_path, tiny_checkpoint("qwen2_5_vl"))
    calls: list[int] = []
    generate = trainer.engine.generate
    monkeypatch.setattr(trainer.engine, "generate", lambda *a: calls.append(len(a[2]["prompts"])) or generate(*a))
    trainer.step()
    assert calls == [4]
    trainer.args.generation_batch_size = 2
    calls.clear()
    trainer.step()
    assert calls == [2, 2]
    trainer.args.generation_batch_size = None
    base = type(trainer)
    trainer.__class__ = type(
        "Hooked", (base,), {"generate_and_score": lambda self, rows: base.generate_and_score(self, rows)}
    )
    calls.clear()
    trainer.step()
    assert calls == [2, 2]
    with pytest.raises(ConfigError, match="--generation_batch_size 3: must be a multiple of"):
        VLPPOConfig(
            output_dir=str(tmp_path),
            reward_funcs="x:y",
            per_device_train_batch_size=2,
            generation_batch_size=3,
            bf16=False,
        )


def test_workers_collate_the_steps_ahead(tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    """--dataloader_num_workers 2: each step's rows are read and collated in worker processes, ahead of the step (the
    training process collates none of them), and the run is the same as with the rows collated in the training
    process (the default, 0)."""
    ckpt, data = tiny_checkpoint("qwen2_5_vl"), write_data(tmp_path, "prompt")
    runs = {}
    for workers in (0, 2):
        argv = _argv(
            ckpt, data, tmp_path / str(workers), "token_sum_reward", max_steps=3, dataloader_num_workers=workers
        )
        trainer, _ = build_trainer("ppo", *parse("ppo", argv))
        collated: list[int] = []  # in this process
        collate = trainer.data_collator
        trainer.data_collator = lambda rows, collate=collate, collated=collated: (
            collated.append(len(rows)) or collate(rows)
        )
        trainer.train()
        assert collated == ([] if workers else [4, 4, 4])
        runs[workers] = trainer
    assert [e["reward"] for e in runs[2].log_history] == [e["reward"] for e in runs[0].log_history]
    for (name, a), (_, b) in zip(runs[0].policy.named_parameters(), runs[2].policy.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


# Sliding-window and chunked attention (gemma4, llama4), linear attention (qwen3_5), 3-D rope (qwen2_5_vl),
# cross-attention (mllama) and a plain decoder (llava): the static cache's layer kinds.
STATIC_CACHE_FAMILIES = ["llava", "qwen2_5_vl", "gemma4", "llama4", "qwen3_5", "mllama"]


@pytest.mark.parametrize("family", STATIC_CACHE_FAMILIES)
def test_static_cache_rollout(family: str, tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    """--cache_implementation static (what auto picks on a GPU, uncompiled here): the rollout's tokens and log-probs
    are those of the dynamic cache's ``generate``, the static cache sized for the prompt and response in buckets."""
    ckpt = tiny_checkpoint(family)
    argv = _argv(ckpt, write_data(tmp_path, "prompt"), tmp_path / "out", "token_sum_reward")
    trainer, _ = build_trainer("ppo", *parse("ppo", [*argv, "--cache_implementation", "static"]))
    assert trainer.generation_kwargs["cache_implementation"] == "static"
    _check_rollout(trainer)
    base = trainer.policy.model.get_base_model()
    assert base._previous_max_cache_length % 256 == 0  # transformers' record of the static cache it made


# ------------------------------------------------------------------------------------------ reward models


def _reward_model_folder(ckpt: Path, out: Path, lora: bool) -> Path:
    mapper = load_core_mapper(ckpt)
    model = mapper.model.from_pretrained(ckpt, dtype=torch.float32)
    if lora:
        model = apply_lora(model, mapper.model, ModelArguments(model_name_or_path=str(ckpt)))
        torch.manual_seed(5)
        with torch.no_grad():  # LoRA B starts at 0: move it, so the reward adapter differs from the base
            for name, parameter in model.named_parameters():
                if ".lora_B." in name:
                    parameter.normal_(std=0.5)
    reward_model = mapper.reward_model(model)
    reward_model.save_pretrained(out)
    mapper.processor(ckpt).save_pretrained(out)
    return out


@pytest.mark.parametrize("shared", [True, False])
def test_reward_model_scores(shared: bool, tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    """--reward_model_path: a LoRA reward model on the policy's base becomes a second adapter on the policy
    (``shared``); a full one loads as its own model. Either way the scores are the reward model's own, and the
    policy's adapter stays the trainable one."""
    ckpt = tiny_checkpoint("llava")
    folder = _reward_model_folder(ckpt, tmp_path / "rm", lora=shared)
    argv = _argv(ckpt, write_data(tmp_path, "prompt"), tmp_path / "out", None, reward_model_path=str(folder))
    trainer, _ = build_trainer("ppo", *parse("ppo", argv))
    (scorer,) = trainer.rewards
    peft_model = trainer.policy.model
    assert (REWARD_ADAPTER in peft_model.peft_config) == shared
    assert (scorer.reward_model.model is peft_model) == shared

    rows = [trainer.train_dataset[0], trainer.train_dataset[1]]
    texts = ["A red square.", "Green"]
    scores = scorer(rows, texts, [[1], [2]], [[], []])
    standalone = VLRewardModel.from_pretrained(folder, dtype=torch.float32).eval()
    collator = load_core_mapper(ckpt).sft_collator(scorer.collator.processor, max_length=None)
    features = [
        {"messages": [*row["prompt"], {"role": "assistant", "content": [{"type": "text", "text": text}]}],
         "images": row["images"], "source": row["source"]}
        for row, text in zip(rows, texts, strict=True)
    ]  # fmt: skip
    with torch.no_grad():
        expected = standalone(**collator(features))
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-5)
    with torch.no_grad():  # not vacuous: the base model with a fresh head scores otherwise
        other = VLRewardModel(unwrap(standalone.model), vl_model=standalone.family)(**collator(features))
    assert not torch.allclose(other, expected)

    # after scoring, the policy's adapter is active and trainable again; the reward adapter is frozen
    assert peft_model.active_adapter == "default"
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if f".{REWARD_ADAPTER}." in n}
    trainer.train()
    assert all(torch.equal(p, before[n]) for n, p in peft_model.named_parameters() if n in before)
    trainer.save_model(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(ckpt)
    assert not (tmp_path / "out" / REWARD_ADAPTER).exists()  # only the policy's adapter is saved


def test_functions_and_model_are_summed(tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    ckpt = tiny_checkpoint("llava")
    folder = _reward_model_folder(ckpt, tmp_path / "rm", lora=False)
    argv = _argv(ckpt, write_data(tmp_path, "prompt"), tmp_path / "out", "source_reward", reward_model_path=str(folder))
    trainer, _ = build_trainer("ppo", *parse("ppo", argv))
    functions, model = trainer.rewards
    rows = [trainer.train_dataset[0], trainer.train_dataset[1]]
    images = [trainer.data_collator([row])["images"][0] for row in rows]
    torch.testing.assert_close(functions(rows, ["a", "b"], [[1], [2]], images), torch.tensor([0.0, 1.0]))
    trainer.train()
    assert math.isfinite(trainer.log_history[0]["reward"])


# ------------------------------------------------------------------------------------------------ resume


def test_resume_mid_run_matches_uninterrupted(tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    """4 steps in one go, and 2 steps + a checkpoint + resume to 4: the same weights and the same logs."""
    ckpt = tiny_checkpoint("qwen2_vl")
    data = write_data(tmp_path, "prompt")
    flags = {"max_steps": "4", "save_strategy": "steps", "save_steps": "2", "save_total_limit": "1"}

    straight, _ = build_trainer("ppo", *parse("ppo", _argv(ckpt, data, tmp_path / "a", "token_sum_reward", **flags)))
    straight.train()
    assert sorted(p.name for p in (tmp_path / "a").glob("checkpoint-*")) == ["checkpoint-4"]  # save_total_limit

    first, _ = build_trainer("ppo", *parse("ppo", _argv(ckpt, data, tmp_path / "b", "token_sum_reward", **flags)))
    first.total_steps = 2  # interrupted after step 2 (its learning-rate schedule still spans 4 steps)
    first.train()
    checkpoint = tmp_path / "b" / "checkpoint-2"
    assert {"adapter_model.safetensors", VALUE_HEAD, VALUE_CONFIG, "ppo_state.pt", "trainer_state.json"} <= {
        p.name for p in checkpoint.iterdir()
    }
    assert not (tmp_path / "b" / ".partial").exists()  # no temporary folder left behind
    resumed, _ = build_trainer(
        "ppo",
        *parse(
            "ppo",
            _argv(ckpt, data, tmp_path / "b", "token_sum_reward", **flags, resume_from_checkpoint=str(checkpoint)),
        ),
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.global_step == 4
    assert [e["reward"] for e in resumed.log_history] == [e["reward"] for e in straight.log_history]
    for (name, a), (_, b) in zip(straight.policy.named_parameters(), resumed.policy.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        resumed.train(resume_from_checkpoint=str(tmp_path))


# ---------------------------------------------------------------------------------------- command line


def test_cli_end_to_end_with_eval_then_generate(tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    """``resonance train ppo`` (the console script) with an eval set logs eval_reward and saves a folder that
    ``resonance generate`` and VLModelWithValueHead.from_pretrained load."""
    ckpt = tiny_checkpoint("llava")
    output_dir = tmp_path / "out"
    data = write_data(tmp_path, "prompt")
    argv = _argv(
        ckpt, data, output_dir, "constant_reward", max_steps="2",
        eval_data_path=str(data), eval_strategy="steps", eval_steps="1", per_device_eval_batch_size="2",
    )  # fmt: skip
    result = run_resonance("train", "ppo", *argv, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "eval_reward=1 " in result.stderr and "step 2/2: reward=1 " in result.stderr
    saved = {p.name for p in output_dir.iterdir()}
    assert {
        "adapter_model.safetensors",
        VALUE_HEAD,
        VALUE_CONFIG,
        "processor_config.json",
        "trainer_state.json",
    } <= saved
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and any("eval_reward" in e for e in state["log_history"])
    assert isinstance(VLModelWithValueHead.from_pretrained(output_dir), VLModelWithValueHead)

    from resonance.commands import generate

    answers = tmp_path / "answers.jsonl"
    assert generate.main(str(output_dir), str(data), str(answers), ["--max_new_tokens", "3"]) == 0
    assert len(answers.read_text().splitlines()) == 2


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("reward", "message"),
    [
        ("nan_reward", r"returned nan for completion 1 of row .*prompts.jsonl:\d: every reward must be a finite"),
        ("raising_reward", rf"{REWARDS}:raising_reward \(--reward_funcs\) raised KeyError: 'answer'"),
    ],
)
def test_bad_reward_stops_before_update(reward: str, message: str, tmp_path: Path, tiny_checkpoint) -> None:
    ckpt = tiny_checkpoint("llava")
    trainer, _ = build_trainer(
        "ppo", *parse("ppo", _argv(ckpt, write_data(tmp_path, "prompt"), tmp_path / "out", reward))
    )
    before = _trainable(trainer)
    with pytest.raises(RewardFunctionError, match=message):
        trainer.train()
    assert all(torch.equal(p, before[n]) for n, p in trainer.policy.named_parameters() if n in before)


def test_empty_generations_are_counted_and_skipped(tmp_path: Path, tiny_checkpoint, caplog) -> None:
    """A response that is only an end-of-sequence token is not scored and not trained on; a rollout of nothing
    else skips its update, counted in the logs."""
    ckpt = tiny_checkpoint("llava")
    argv = _argv(ckpt, write_data(tmp_path, "prompt"), tmp_path / "out", "raising_reward", max_steps="2")
    trainer, _ = build_trainer("ppo", *parse("ppo", argv))
    eos = trainer.generation_kwargs["eos_token_id"]
    eos = eos if isinstance(eos, int) else eos[0]
    head = unwrap(trainer.policy).get_output_embeddings()
    with torch.no_grad():  # every hidden state now picks EOS first
        head.weight[eos] = 0
        head.bias = torch.nn.Parameter(torch.zeros(head.out_features)) if head.bias is None else head.bias
        head.bias[eos] = 1e4
    before = _trainable(trainer)
    with caplog.at_level(logging.WARNING, logger="resonance"):
        trainer.train()  # the raising reward function is never called: nothing to score
    assert all(torch.equal(p, before[n]) for n, p in trainer.policy.named_parameters() if n in before)
    assert [e["empty_generations"] for e in trainer.log_history] == [4.0, 4.0]
    assert trainer.log_history[-1]["skipped_updates"] == 2 and trainer.counters["empty_generations"] == 8
    assert "empty generation for" in caplog.text and "update skipped (2 skipped so far)" in caplog.text


def test_prompt_without_its_image(tmp_path: Path, tiny_checkpoint, capsys) -> None:
    ckpt = tiny_checkpoint("llava")
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "<image>\nWhat is it?"}])
    assert main("ppo", _argv(ckpt, data, tmp_path / "out", "constant_reward")) == 2
    err = capsys.readouterr().err
    assert "p.jsonl:1" in err and "image" in err


def test_no_reward_or_bad_settings(tmp_path: Path, tiny_checkpoint, capsys) -> None:
    ckpt = tiny_checkpoint("llava")
    assert main("ppo", _argv(ckpt, write_data(tmp_path, "prompt"), tmp_path / "out", None)) == 2
    assert "PPO needs a reward: --reward_funcs" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--kl_estimator must be k1, k2 or k3"):
        VLPPOConfig(output_dir=str(tmp_path), reward_funcs="x:y", kl_estimator="k4", bf16=False)
    missing = _argv(
        ckpt, write_data(tmp_path, "prompt"), tmp_path / "out", None, reward_model_path=str(tmp_path / "nope")
    )
    assert main("ppo", missing) == 2
    assert "--reward_model_path" in capsys.readouterr().err


def test_a_lora_folder_that_is_not_a_reward_model(tmp_path: Path, tiny_checkpoint, capsys) -> None:
    """Before: a plain FileNotFoundError traceback (exit 3) for a LoRA folder on the policy's base without a head."""
    ckpt = tiny_checkpoint("llava")
    folder = _reward_model_folder(ckpt, tmp_path / "rm", lora=True)
    mapper = load_core_mapper(ckpt)
    (folder / mapper.reward_model.config_file).unlink()
    argv = _argv(ckpt, write_data(tmp_path, "prompt"), tmp_path / "out", None, reward_model_path=str(folder))
    assert main("ppo", argv) == 2
    err = capsys.readouterr().err
    assert f"--reward_model_path {folder}: no {mapper.reward_model.config_file}" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------- helpers


def test_extend_per_token_inputs() -> None:
    inputs = {
        "input_ids": torch.ones(2, 3, dtype=torch.long),
        "attention_mask": torch.ones(2, 3, dtype=torch.long),
        "token_type_ids": torch.tensor([[0, 0, 0], [1, 0, 0]]),
        "cross_attention_mask": torch.arange(2 * 3 * 2).reshape(2, 3, 1, 2),
        "pixel_values": torch.zeros(2, 3, 4),  # an image input shaped like the ids: never extended
        "image_sizes": torch.zeros(2, 2),
    }
    out = extend_per_token_inputs(inputs, 2, {"pixel_values", "image_sizes"}, prefix_lm=False)
    assert set(out) == {"token_type_ids", "cross_attention_mask"}
    assert out["token_type_ids"].tolist() == [[0, 0, 0, 0, 0], [1, 0, 0, 0, 0]]
    assert torch.equal(out["cross_attention_mask"][:, 3], inputs["cross_attention_mask"][:, 2])
    assert torch.equal(out["cross_attention_mask"][:, 4], inputs["cross_attention_mask"][:, 2])
    prefix = extend_per_token_inputs(inputs, 2, {"pixel_values"}, prefix_lm=True)
    assert prefix["token_type_ids"][:, 3:].tolist() == [[1, 1], [1, 1]]


def test_whiten_across_micro_batches() -> None:
    torch.manual_seed(0)
    a, b = torch.randn(2, 3), torch.randn(3, 5)
    mask_a, mask_b = (
        torch.tensor([[1, 1, 0], [1, 1, 1]]),
        torch.tensor([[1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]),
    )
    out_a, out_b = whiten_across([a, b], [mask_a, mask_b], shift_mean=True)
    padded = torch.cat([torch.nn.functional.pad(a, (0, 2)), b])
    expected = masked_whiten(padded, torch.cat([torch.nn.functional.pad(mask_a, (0, 2)), mask_b]).bool())
    torch.testing.assert_close(out_a, expected[:2, :3])
    torch.testing.assert_close(out_b, expected[2:])


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_one_bf16_step_on_cuda(family: str, tiny_checkpoint, tmp_path: Path) -> None:
    """The GPU twin of test_rollout_and_one_step: one PPO step in bf16 with gradient checkpointing, rollouts on the
    GPU."""
    data = write_data(tmp_path, "prompt")
    reward = f"{REWARDS}:token_sum_reward"
    one_bf16_step("ppo", tiny_checkpoint(family), data, tmp_path / "out", reward_funcs=reward, learning_rate="1e-3")
