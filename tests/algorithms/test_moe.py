"""Mixture-of-experts families (spec lora.parameters, moe): LoRA reaches every expert weight and never a router,
a step trains the expert adapters and leaves the routers and base weights alone, the router loss follows the spec
default and TRL's --router_aux_loss_coef, and the expert flags that cannot work are refused by name."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import FAMILIES, read_spec, train_argv, write_data

from resonance.base.model import unwrap
from resonance.base.registry import load_core_mapper
from resonance.commands.train import build_trainer, parse
from resonance.errors import ConfigError

MOE_FAMILIES = [f for f in FAMILIES if (read_spec(f).get("moe") or {}).get("router")]


def _trainer(family: str, ckpt: Path, tmp_path: Path, **flags: object):
    argv = train_argv("sft", ckpt, write_data(tmp_path, "sft"), tmp_path / "out", **flags)
    return build_trainer("sft", *parse("sft", argv))[0]


def test_there_are_mixture_of_experts_families() -> None:
    assert MOE_FAMILIES  # the tests below would otherwise test nothing


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
    coefficient = _trainer(family, ckpt, tmp_path, router_aux_loss_coef="0.01")
    assert coefficient.args.router_aux_loss_coef == 0.01
