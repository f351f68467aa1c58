"""Mixture-of-experts families (spec lora.parameters, moe): LoRA reaches every expert weight and never a router,
a step trains the expert adapters and leaves the routers and base weights alone, the router loss follows the spec
default and TRL's --router_aux_loss_coef, and the expert flags that cannot work are refused by name."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import FAMILIES, REWARDS, read_spec, train_argv, write_data

from resonance.algorithms.rm import bradley_terry
from resonance.base.model import unwrap
from resonance.base.registry import load_core_mapper
from resonance.commands.train import build_trainer, parse
from resonance.errors import ConfigError

MOE_FAMILIES = [f for f in FAMILIES if (read_spec(f).get("moe") or {}).get("router")]
AUX_FAMILIES = [f for f in MOE_FAMILIES if read_spec(f)["moe"].get("aux_loss")]  # the router loss on by default


def _trainer(family: str, ckpt: Path, tmp_path: Path, **flags: object):
    argv = train_argv("sft", ckpt, write_data(tmp_path, "sft"), tmp_path / "out", **flags)
    return build_trainer("sft", *parse("sft", argv))[0]


def test_there_are_mixture_of_experts_families() -> None:
    assert MOE_FAMILIES and AUX_FAMILIES  # the tests below would otherwise test nothing


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_lora_trains_every_expert_and_no_router(
    family: str, tmp_path: Path, tiny_checkpoint: Callable[[str], Path]
) -> None:
    ckpt = tiny_checkpoint(family)
    vl_model = load_core_mapper(ckpt).model
    trainer = _trainer(family, ckpt, tmp_path, learning_rate="1e-2")
    model, base = trainer.model, unwrap(trainer.model)

    # the parameters by their names before peft wrapped their owners (adding .base_layer)
    plain = {n.replace(".base_layer", "") for n, _ in base.named_parameters() if ".lora_" not in n}
    prefix, endings = vl_model.language_model_path + ".", vl_model.default_lora_parameters
    experts = {n for n in plain if n.startswith(prefix) and any(n.endswith("." + e) for e in endings)}
    assert experts and experts == set(model.base_model.targeted_parameter_names)
    routers = vl_model.router_modules(base)
    assert routers
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert not [n for n in trainable if any(f".{router}." in f".{n}" for router in routers)]
    for module in model.modules():  # peft's LoRA on a parameter has no dropout: 0 where it reaches experts
        dropout = getattr(module, "lora_dropout", None)
        if dropout is not None and "default" in dropout:
            assert not isinstance(dropout["default"], torch.nn.Dropout) or dropout["default"].p == 0.0

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    after = dict(model.named_parameters())
    moved = [n for n in trainable if not torch.equal(before[n], after[n])]
    expert_lora = [n for n in moved if ".experts." in n and "lora_" in n]
    assert expert_lora, "the expert adapters must train"
    frozen = [n for n in before if n not in trainable]
    assert all(torch.equal(before[n], after[n]) for n in frozen), "base weights, routers included, stay"
    # the router loss as the spec says (TRL adds it where the coefficient is not 0)
    wanted = bool(read_spec(family)["moe"].get("aux_loss", False))
    assert trainer.aux_loss_enabled == wanted
    assert wanted or trainer.args.router_aux_loss_coef == 0.0


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_expert_flags(family: str, tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    ckpt = tiny_checkpoint(family)
    with pytest.raises(ConfigError, match=r"--lora_dropout 0.1 with LoRA on expert weights"):
        _trainer(family, ckpt, tmp_path, lora_dropout="0.1")
    with pytest.raises(ConfigError, match=r"'experts.nothing' ends no parameter name .* more than two dimensions"):
        _trainer(family, ckpt, tmp_path, lora_target_parameters="experts.nothing")
    with pytest.raises(ConfigError, match=r"--lora_target_parameters none with --lora_target_modules none"):
        _trainer(family, ckpt, tmp_path, lora_target_parameters="none", lora_target_modules="none")
    plain = _trainer(family, ckpt, tmp_path, lora_target_parameters="none", lora_dropout="0.1")
    assert not plain.model.base_model.targeted_parameter_names
    if family in AUX_FAMILIES:
        coefficient = _trainer(family, ckpt, tmp_path, router_aux_loss_coef="0.01")
        assert coefficient.args.router_aux_loss_coef == 0.01
    else:  # a model without the load-balancing loss TRL computes (its config has no num_experts)
        with pytest.raises(ConfigError, match=r"--router_aux_loss_coef 0.01: .* has no load-balancing loss"):
            _trainer(family, ckpt, tmp_path, router_aux_loss_coef="0.01")


@pytest.mark.parametrize("family", AUX_FAMILIES)
def test_reward_model_adds_the_router_loss(family: str, tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    """RM adds the routers' load-balancing loss as TRL's trainers do: by default where the spec's moe.aux_loss is
    on, weighted by --router_aux_loss_coef (0 turns it off). The loss is the pairwise loss plus the coefficient
    times the load-balancing loss transformers' own forward of the model returns for the same batch."""
    ckpt = tiny_checkpoint(family)
    data = write_data(tmp_path, "rm")

    def reward_trainer(**flags: object):
        argv = train_argv("rm", ckpt, data, tmp_path / "out", **flags)
        return build_trainer("rm", *parse("rm", argv))[0]

    assert reward_trainer().aux_loss_enabled
    assert not reward_trainer(router_aux_loss_coef="0").aux_loss_enabled
    trainer = reward_trainer(router_aux_loss_coef="0.5")
    assert trainer.aux_loss_enabled
    batch = next(iter(trainer.get_train_dataloader()))
    model = trainer.model
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)
        chosen, rejected = trainer.rewards(model, batch)
        router_loss = trainer.router_loss
        inputs = {k: v for k, v in batch.items() if k != "margin"}  # the images once: given to both rows
        inputs = trainer._image_model_inputs(model.model, inputs, copies=2)
        reference = model.model(**inputs, output_router_logits=True, use_cache=False).aux_loss
    assert router_loss > 0
    torch.testing.assert_close(router_loss, reference)
    pairwise, _ = bradley_terry(chosen, rejected, batch.get("margin"))
    torch.testing.assert_close(loss, pairwise + 0.5 * reference)


def test_router_coefficient_needs_a_mixture_of_experts(tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    argv = train_argv("rm", tiny_checkpoint("llava"), write_data(tmp_path, "rm"), tmp_path / "out")
    with pytest.raises(ConfigError, match=r"--router_aux_loss_coef 0.5: this model is not a mixture of experts"):
        build_trainer("rm", *parse("rm", [*argv, "--router_aux_loss_coef", "0.5"]))


@pytest.mark.parametrize("family", AUX_FAMILIES)
def test_ppo_adds_the_router_loss(family: str, tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    """PPO adds the routers' load-balancing loss to its update as RM does (the same loss, checked there against
    transformers'): the model config's coefficient by default, --router_aux_loss_coef's when given, 0 = off."""
    ckpt = tiny_checkpoint(family)
    data = write_data(tmp_path, "prompt")

    def ppo_trainer(**flags: object):
        argv = train_argv("ppo", ckpt, data, tmp_path / "out", reward_funcs=f"{REWARDS}:token_sum_reward", **flags)
        return build_trainer("ppo", *parse("ppo", argv))[0]

    config = load_core_mapper(ckpt).model.from_pretrained(ckpt).config.get_text_config()
    assert ppo_trainer().router_aux_loss_coef == config.router_aux_loss_coef > 0
    off = ppo_trainer(router_aux_loss_coef="0", max_steps=1)
    off.train()
    assert "aux_loss" not in off.log_history[-1]
    trainer = ppo_trainer(router_aux_loss_coef="0.5", max_steps=1)
    trainer.train()
    (entry,) = trainer.log_history
    assert entry["aux_loss"] > 0 and math.isfinite(entry["policy_loss"])
