"""One optimizer step of SFT and DPO per family through the training entry point, then save, reload, generate.

The trainer is built with ``resonance.commands.train.parse`` + ``build_trainer`` (what ``resonance.commands.train.main``
runs) so its weights can be inspected; ``test_cli_end_to_end`` runs the installed ``resonance`` command. The GPU
twin (marked gpu) trains the same step in bf16 on CUDA.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import (
    FAMILIES,
    IMAGE,
    expected_lora_layers,
    make_image,
    one_bf16_step,
    run_resonance,
    takes_system,
    train_argv,
    user,
    write_data,
)
from peft.tuners.lora import LoraLayer

from resonance.base.model import unwrap
from resonance.base.registry import load_core_mapper
from resonance.commands.train import build_trainer, parse

PREFIX = "base_model.model."  # PEFT's prefix before the transformers model's module names


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


@pytest.mark.parametrize("algorithm", ["sft", "dpo"])
@pytest.mark.parametrize("family", FAMILIES)
def test_one_step_save_reload_generate(
    family: str, algorithm: str, tmp_path: Path, tiny_checkpoint: Callable[[str], Path]
) -> None:
    ckpt = tiny_checkpoint(family)
    output_dir = tmp_path / "out"
    argv = train_argv(algorithm, ckpt, write_data(tmp_path, algorithm, takes_system(ckpt)), output_dir)
    model_args, data_args, config = parse(algorithm, argv)
    trainer, processor = build_trainer(algorithm, model_args, data_args, config)
    model_cls = load_core_mapper(ckpt).model
    model = trainer.model

    # LoRA sits on the language model's target leaves only: never on the vision tower or projector.
    base = unwrap(model)
    lm_path = model_cls.language_model_path
    lora_modules = {name for name, module in model.named_modules() if isinstance(module, LoraLayer)}
    expected = {PREFIX + name for name in expected_lora_layers(base, model_cls)}
    assert lora_modules and lora_modules == expected
    excluded = [model_cls.vision_tower_path] + ([model_cls.projector_path] if model_cls.projector_path else [])
    for name in lora_modules:
        assert name.startswith(PREFIX + lm_path + ".")
        assert not any(name.startswith(PREFIX + path + ".") for path in excluded), name

    tower = model_cls.get_vision_tower(model)
    assert not any(p.requires_grad for p in tower.parameters())
    tower_before = _snapshot(tower)
    params_before = _snapshot(model)
    lora_b = [name for name in params_before if ".lora_B.default." in name]
    assert lora_b

    trainer.train()

    # The vision tower (and every other base weight) is bit-identical; every trained LoRA B moved.
    for name, param in tower.named_parameters():
        assert torch.equal(param, tower_before[name]), name
    params_after = dict(model.named_parameters())
    for name, before in params_before.items():
        if ".lora_" not in name:
            assert torch.equal(params_after[name], before), name
        elif ".ref." in name:  # TRL's frozen reference adapter (DPO on a PEFT model) stays put
            assert torch.equal(params_after[name], before), name
    for name in lora_b:
        assert not torch.equal(params_after[name], params_before[name]), f"{name} did not train"

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 1 and all(math.isfinite(loss) for loss in losses)
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])

    trainer.save_model(config.output_dir)
    processor.save_pretrained(config.output_dir)
    saved = {p.name for p in output_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "processor_config.json", "tokenizer.json"} <= saved

    # Reload the output folder the way users do: base model + adapter, processor from the same folder.
    mapper = load_core_mapper(output_dir)
    assert mapper.model is model_cls
    reloaded = model_cls.from_pretrained(output_dir).eval()
    reloaded_params = dict(reloaded.named_parameters())
    for name in lora_b:
        assert torch.equal(reloaded_params[name], params_after[name].detach()), name
    reloaded_tower = dict(model_cls.get_vision_tower(reloaded).named_parameters())
    for name, param in tower_before.items():
        assert torch.equal(reloaded_tower[name], param), name

    infer_processor = mapper.processor(output_dir)
    infer_processor.infer()
    conversations = [
        [user(IMAGE, "What is shown in this image?")],
        [user(IMAGE, "Describe the picture in detail. Is there any text in the image?")],
    ]
    texts = [infer_processor.render_conversation(c, add_generation_prompt=True) for c in conversations]
    inputs = infer_processor(text=texts, images=[[make_image(40, 30, seed=3)], [make_image(64, 48, seed=4)]])
    mask = inputs["attention_mask"]
    # Rows end together, the shorter one padded (before its text; InstructBLIP's query tokens stay first).
    assert mask[:, -1].all() and not mask.all(), "inference batches must be left-padded"

    kwargs = model_cls.prepare_default_generation_kwargs(reloaded.generation_config)
    # min_new_tokens: a random tiny model may pick EOS first; the test is about the pipeline, not the text.
    kwargs.update(max_new_tokens=3, min_new_tokens=3)
    with torch.no_grad():
        generated = reloaded.generate(**inputs, **kwargs)
    length = inputs["input_ids"].shape[1]
    assert generated.shape == (2, length + 3)
    assert torch.equal(generated[:, :length], inputs["input_ids"])


def test_cli_end_to_end(tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    """``resonance train sft ...`` (the installed console script) trains and saves adapter + processor."""
    family = "llava"
    assert family in FAMILIES
    ckpt = tiny_checkpoint(family)
    output_dir = tmp_path / "out"
    result = run_resonance(
        "train", "sft", *train_argv("sft", ckpt, write_data(tmp_path, "sft"), output_dir), cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-4000:]

    saved = {p.name for p in output_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= saved
    assert {"processor_config.json", "tokenizer.json", "tokenizer_config.json"} <= saved
    assert "chat_template.jinja" in saved or "chat_template.json" in saved
    adapter = json.loads((output_dir / "adapter_config.json").read_text())
    model_cls = load_core_mapper(ckpt).model
    assert Path(adapter["base_model_name_or_path"]).resolve() == Path(ckpt).resolve()
    assert adapter["target_modules"] == model_cls.lora_target_modules(model_cls.default_lora_target)
    assert f"saved to {output_dir.resolve()}" in result.stderr


def test_dpo_evaluation_reports_reward_accuracy_and_margins(
    tmp_path: Path, tiny_checkpoint: Callable[[str], Path]
) -> None:
    """--eval_data_path with --eval_strategy steps: DPO's eval metrics are the algorithm's (reward accuracy and
    margins), computed on the eval pairs, and consistent with each other."""
    ckpt = tiny_checkpoint("llava")
    data = write_data(tmp_path, "dpo")
    argv = train_argv(
        "dpo", ckpt, data, tmp_path / "out",
        eval_data_path=data, eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=2, max_steps=2,
    )  # fmt: skip
    trainer, _ = build_trainer("dpo", *parse("dpo", argv))
    trainer.train()
    evals = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    assert len(evals) == 2
    for entry in evals:
        assert 0.0 <= entry["eval_rewards/accuracies"] <= 1.0
        assert entry["eval_rewards/margins"] == pytest.approx(
            entry["eval_rewards/chosen"] - entry["eval_rewards/rejected"], abs=1e-5
        )
    assert evals[1]["eval_rewards/margins"] != evals[0]["eval_rewards/margins"]  # measured after each step


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("algorithm", ["sft", "dpo"])
def test_one_bf16_step_on_cuda(family: str, algorithm: str, tiny_checkpoint, tmp_path: Path) -> None:
    """The GPU twin of test_one_step_save_reload_generate: one step in bf16 with gradient checkpointing on CUDA."""
    ckpt = tiny_checkpoint(family)
    one_bf16_step(algorithm, ckpt, write_data(tmp_path, algorithm, takes_system(ckpt)), tmp_path / "out")
