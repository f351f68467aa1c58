"""``--compile_layers``: decoder layers and vision blocks compiled in place train exactly like eager ones.

Two optimizer steps through the training entry point, once eager and once compiled, from the same seed:
the logged losses and the trained LoRA weights agree (to float reordering), the blocks really ran as
compiled graphs, and the model keeps its module names (what saving and loading rely on). Gradient
checkpointing is on, as in the benchmarks: the compiled block runs inside transformers' checkpoint. The GPU
twin (marked gpu) compares in bf16 on CUDA, where inductor emits Triton kernels.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import train_argv, write_data
from torch._dynamo.utils import counters

from resonance.algorithms.arguments import ModelArguments
from resonance.base.model import unwrap
from resonance.commands.train import build_trainer, parse
from resonance.errors import ConfigError
from resonance.patches.compile_layers import blocks_eager, compile_blocks

COMPILED_LOG = r"step 1: [\d.]+ s compiling \(torch.compile; [\d.]+ s in all\)"  # CompileTimeLog's line


def _eager_fallbacks() -> list[str]:
    """The graph breaks that ran a whole compiled block eagerly: a side effect dynamo refuses under gradient
    checkpointing (transformers 5.25's kernels layers set a context variable in every decoder layer's forward)."""
    return [reason for reason in counters["graph_break"] if "side effect" in reason.lower()]


def _train(algorithm: str, ckpt: Path, data: Path, out: Path, compiled: bool):
    argv = train_argv(
        algorithm, ckpt, data, out,
        max_steps=2, learning_rate="1e-3", lora_dropout=0, gradient_checkpointing=True, compile_layers=compiled,
    )  # fmt: skip
    model_args, data_args, config = parse(algorithm, argv)
    trainer, _ = build_trainer(algorithm, model_args, data_args, config)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    lora = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if ".lora_B." in name}
    return trainer.model, losses, lora


@pytest.mark.parametrize(("family", "algorithm"), [("qwen2_5_vl", "dpo"), ("llava", "sft")])
def test_compiled_layers_train_like_eager(
    family: str, algorithm: str, tmp_path: Path, tiny_checkpoint: Callable[[str], Path], caplog
) -> None:
    ckpt = tiny_checkpoint(family)
    data = write_data(tmp_path, algorithm)
    _, eager_losses, eager_lora = _train(algorithm, ckpt, data, tmp_path / "eager", compiled=False)
    torch._dynamo.reset()
    counters.clear()
    with caplog.at_level(logging.INFO, logger="resonance"):
        model, losses, lora = _train(algorithm, ckpt, data, tmp_path / "compiled", compiled=True)
    assert re.search(COMPILED_LOG, caplog.text)

    base = unwrap(model)
    blocks = [m for m in base.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    layers = base.config.get_text_config().num_hidden_layers
    assert len(blocks) >= layers  # every decoder layer, plus the vision blocks
    assert counters["stats"]["unique_graphs"] > 0, "the blocks ran eagerly"
    assert not _eager_fallbacks()
    assert not counters["recompile_limit"], "a block fell back to eager after too many recompiles"
    assert all(".lora_B." in name for name in lora) and lora.keys() == eager_lora.keys()  # names unchanged

    assert len(losses) == len(eager_losses) == 2 and all(math.isfinite(loss) for loss in losses)
    assert losses == pytest.approx(eager_losses, rel=1e-5)
    for name, weight in eager_lora.items():
        assert (lora[name] - weight).norm() <= 1e-4 * weight.norm() + 1e-8, name


@pytest.mark.parametrize("compiled", [False, True])
def test_dpo_reference_runs_as_the_policy_when_compiled(
    compiled: bool, tmp_path: Path, tiny_checkpoint: Callable[[str], Path]
) -> None:
    """Compiled, the reference forward runs in the policy's compiled variant (gradients on, checkpointing kept), so
    at step 0 it reproduces the policy's log-probs in any precision; eager, it runs under ``no_grad`` as TRL's does.
    Either way the first loss is log 2 and the update is the same."""
    argv = train_argv(
        "dpo", tiny_checkpoint("qwen2_5_vl"), write_data(tmp_path, "dpo"), tmp_path / "out",
        max_steps=1, lora_dropout=0, gradient_checkpointing=True, compile_layers=compiled,
    )  # fmt: skip
    torch._dynamo.reset()
    trainer, _ = build_trainer("dpo", *parse("dpo", argv))
    layer = unwrap(trainer.model).model.language_model.layers[0]
    seen: list[tuple[bool, bool]] = []
    layer.register_forward_pre_hook(
        lambda module, args: seen.append((torch.is_grad_enabled(), module.gradient_checkpointing))
    )
    trainer.train()
    policy, reference = seen  # TRL runs the policy's forward first (checkpointing recomputes it without the hook)
    assert policy == (True, True)
    assert reference == ((True, True) if compiled else (False, False))
    (loss,) = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert loss == pytest.approx(math.log(2), abs=1e-6)
    assert not any(p.grad is not None for n, p in trainer.model.named_parameters() if ".ref." in n)


def test_compile_blocks_is_idempotent(tiny_checkpoint: Callable[[str], Path]) -> None:
    from resonance.base.registry import load_core_mapper

    ckpt = tiny_checkpoint("qwen2_5_vl")
    model = load_core_mapper(ckpt).model.from_pretrained(ckpt, dtype=torch.float32)
    first = compile_blocks(model)
    config = model.config
    assert first == config.text_config.num_hidden_layers + config.vision_config.depth
    assert compile_blocks(model) == 0


def test_blocks_eager_restores_the_compiled_blocks(tiny_checkpoint: Callable[[str], Path]) -> None:
    from resonance.base.registry import load_core_mapper

    ckpt = tiny_checkpoint("qwen2_5_vl")
    model = load_core_mapper(ckpt).model.from_pretrained(ckpt, dtype=torch.float32)
    compile_blocks(model)
    calls = {name: m._compiled_call_impl for name, m in model.named_modules() if m._compiled_call_impl is not None}
    assert calls
    with pytest.raises(RuntimeError, match="inside"), blocks_eager(model):
        assert all(m._compiled_call_impl is None for m in model.modules())
        raise RuntimeError("inside")
    assert {name: m._compiled_call_impl for name, m in model.named_modules() if m._compiled_call_impl} == calls


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_rollouts_generate_eager_and_train_compiled(
    algorithm: str, tmp_path: Path, tiny_checkpoint: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    """PPO and GRPO with --compile_layers: generation runs every block eagerly (a compiled block would compile once
    per layer, guarding on its KV-cache entry), the scoring and update passes run the compiled blocks, and the run
    samples the same answers and takes the same update as an eager one."""
    from transformers import GenerationMixin

    ckpt, data = tiny_checkpoint("qwen2_5_vl"), write_data(tmp_path, "prompt")
    generate = GenerationMixin.generate
    compiled_in_generate: list[int] = []

    def counted(self, *args, **kwargs):
        compiled_in_generate.append(sum(m._compiled_call_impl is not None for m in self.modules()))
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", counted)
    runs = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        argv = train_argv(
            algorithm, ckpt, data, tmp_path / f"out{compiled}",
            lora_dropout=0, gradient_checkpointing=True, compile_layers=compiled,
            learning_rate="1e-3", reward_funcs="helpers.rewards:token_sum_reward",
        )  # fmt: skip
        trainer, _ = build_trainer(algorithm, *parse(algorithm, argv))
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="resonance"):
            trainer.train()
        assert bool(re.search(COMPILED_LOG, caplog.text)) is compiled  # PPO's own loop logs it too
        history = trainer.log_history if algorithm == "ppo" else trainer.state.log_history
        losses = [entry[key] for entry in history for key in ("loss", "policy_loss", "value_loss") if key in entry]
        lora = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if ".lora_B." in n}
        runs[compiled] = losses, lora
        if compiled:
            assert counters["stats"]["unique_graphs"] > 0, "the blocks ran eagerly in training too"
            assert not _eager_fallbacks()
            assert not counters["recompile_limit"]
            blocks = [m for m in unwrap(trainer.model).modules() if m._compiled_call_impl is not None]
            assert len(blocks) >= unwrap(trainer.model).config.get_text_config().num_hidden_layers
    assert compiled_in_generate and not any(compiled_in_generate)
    (losses, lora), (eager_losses, eager_lora) = runs[True], runs[False]
    assert losses and all(math.isfinite(loss) for loss in losses)
    assert losses == pytest.approx(eager_losses, rel=1e-4, abs=1e-6)
    assert lora.keys() == eager_lora.keys() and any(weight.norm() > 0 for weight in eager_lora.values())  # trained
    for name, weight in eager_lora.items():
        assert (lora[name] - weight).norm() <= 1e-4 * weight.norm() + 1e-8, name


@pytest.mark.parametrize("algorithm", ["sft", "dpo", "rm", "ppo", "grpo"])
def test_compile_layers_auto(algorithm: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default, auto: on a CUDA GPU (padded to 8 as when asked, where the config pads), off on the CPU, with
    --use_cpu and with quantised layers; never refused."""
    argv = ["--model_name_or_path", "m", "--data_path", "d", "--reward_funcs", "m:f"]
    argv = argv if algorithm in ("ppo", "grpo") else argv[:4]
    model_args, _, config = parse(algorithm, argv)
    assert model_args.compile_layers == "auto" and not model_args.compiles_layers(use_cpu=False)
    assert getattr(config, "pad_to_multiple_of", None) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert model_args.compiles_layers(use_cpu=False)
    assert not model_args.compiles_layers(use_cpu=True)
    model_args.load_in_4bit = True
    assert not model_args.compiles_layers(use_cpu=False)
    monkeypatch.undo()
    # compiled by auto, the batches are padded as when asked (PPO's config has no such flag)
    monkeypatch.setattr(ModelArguments, "compiles_layers", lambda self, use_cpu: True)
    assert getattr(parse(algorithm, argv)[2], "pad_to_multiple_of", 8) == 8


@pytest.mark.parametrize(("value", "choice"), [(True, "true"), ("False", "false"), ("yes", "true"), ("0", "false")])
def test_compile_layers_values(value: object, choice: str) -> None:
    assert ModelArguments(model_name_or_path="m", compile_layers=value).compile_layers == choice
    with pytest.raises(ConfigError, match="--compile_layers sometimes: expected auto, true or false"):
        ModelArguments(model_name_or_path="m", compile_layers="sometimes")


@pytest.mark.parametrize("algorithm", ["sft", "dpo", "rm"])
def test_compile_layers_pads_batches_to_a_multiple_of_8_unless_told(algorithm: str) -> None:
    """Compiled attention specialises on lengths that are multiples of 8 (sdpa's mask alignment)."""
    argv = ["--model_name_or_path", "m", "--data_path", "d"]
    assert parse(algorithm, argv)[2].pad_to_multiple_of is None
    assert parse(algorithm, [*argv, "--compile_layers", "True"])[2].pad_to_multiple_of == 8
    assert parse(algorithm, [*argv, "--compile_layers", "True", "--pad_to_multiple_of=16"])[2].pad_to_multiple_of == 16


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava", "gemma3"])
def test_compiled_layers_match_eager_in_bf16_on_cuda(family: str, tiny_checkpoint, tmp_path: Path) -> None:
    """The GPU twin of test_compiled_layers_train_like_eager: --compile_layers on CUDA (inductor's Triton kernels),
    DPO losses as eager ones, to bf16 precision."""
    ckpt, data = tiny_checkpoint(family), write_data(tmp_path, "dpo")
    losses = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        argv = train_argv(
            "dpo", ckpt, data, tmp_path / f"out{compiled}",
            max_steps=3, learning_rate="1e-3", lora_dropout=0, bf16=True, gradient_checkpointing=True,
            compile_layers=compiled,
        )  # fmt: skip
        trainer, _ = build_trainer("dpo", *parse("dpo", argv))
        trainer.train()
        losses[compiled] = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        if compiled:
            assert counters["stats"]["unique_graphs"] > 0 and not counters["recompile_limit"]
    assert len(losses[True]) == 3
    assert losses[True] == pytest.approx(losses[False], rel=2e-2, abs=2e-3)
