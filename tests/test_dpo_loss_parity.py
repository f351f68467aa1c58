"""DPO: our trainer's loss equals TRL's DPOTrainer's on the same weights and batch; one vision pass.

Both trainers are built the way ``resonance.commands.train.build_trainer`` builds ours: the tiny fp32 model with
a frozen vision tower and LoRA on the language model (``model_cls.lora_target_modules``), passed as a
PEFT model without ``ref_model``, so TRL keeps a frozen copy of the initial adapter ("ref") as the
reference. The LoRA B matrices of the trained adapter are then set to the same random values in both
models, so the policy differs from the reference and the loss is not log(2).

Our collator gives the prompts' images once (the trainer encodes them once for chosen, rejected and
the reference); TRL gets the same batch with the image inputs repeated for chosen and rejected, as its
own collator lays them out.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import pytest
import torch
from conftest import FAMILIES, TEMPLATE_FAMILIES
from helpers import (
    is_blank_token,
    load_adapter,
    load_hf_processor,
    open_rgb,
    preference_rows,
    prompt_only_inputs,
    repeat_images,
    to_trl,
)
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import ProcessorMixin
from trl import DPOConfig, DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

from resonance.algorithms.dpo.config import VLDPOConfig
from resonance.base.model import unwrap
from resonance.base.processor import VLProcessor
from resonance.base.registry import ModelCoreMapper
from resonance.data.rows import features_for
from resonance.patches.fused_head import fused_head_backbone


@dataclass
class Pair:
    """Our trainer and TRL's on identical weights, with one preference batch in each layout."""

    mapper: ModelCoreMapper
    processor: VLProcessor
    ours: Any
    trl: DPOTrainer
    batch: dict[str, torch.Tensor]
    trl_batch: dict[str, torch.Tensor]


def _lora_model(mapper: ModelCoreMapper, ckpt: Path) -> PeftModel:
    model_cls = mapper.model
    model = model_cls.from_pretrained(ckpt, dtype=torch.float32)
    model_cls.freeze_vision_tower(model)
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.05,  # as build_trainer's default; TRL's disable_dropout zeroes it in both trainers
        target_modules=model_cls.lora_target_modules(model_cls.default_lora_target),
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(0)  # the same lora_A init in both copies
    return get_peft_model(model, config)


def _config(output_dir: Path, batch_size: int, config_class: type[DPOConfig] = DPOConfig) -> DPOConfig:
    return config_class(
        output_dir=str(output_dir),
        report_to="none",
        remove_unused_columns=False,
        bf16=False,
        use_cpu=True,
        per_device_train_batch_size=batch_size,
        max_steps=1,
    )


@pytest.fixture(scope="module", params=FAMILIES)
def pair(
    request: pytest.FixtureRequest, tiny_checkpoint: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pair]:
    family: str = request.param
    ckpt = tiny_checkpoint(family)
    tmp = tmp_path_factory.mktemp(f"dpo_{family}")
    mapper, processor = load_adapter(ckpt)
    rows = preference_rows(tmp, processor.images_required, processor.multi_image)
    dataset = datasets.Dataset.from_list(rows, features=features_for("preference"))
    collator = mapper.dpo_collator(processor)

    ours = mapper.dpo_trainer(
        model=_lora_model(mapper, ckpt),
        args=_config(tmp / "ours", len(rows), VLDPOConfig),
        data_collator=collator,
        train_dataset=dataset,
        processing_class=processor.hf,
        vl_model=mapper.model,
        vl_processor=processor,
    )
    trl = DPOTrainer(
        model=_lora_model(mapper, ckpt),
        args=_config(tmp / "trl", len(rows)),
        train_dataset=dataset,
        processing_class=load_hf_processor(ckpt),
    )
    # TRL's fused LM head cannot run a model without a backbone module (InstructBLIP); both trainers get the
    # same small adapter (a no-op for every other family), so the rest of TRL's computation is compared.
    fused_head_backbone(unwrap(trl.model))

    # Only now perturb the trained adapter: TRL copied the initial one into the "ref" adapter at init.
    generator = torch.Generator().manual_seed(1234)
    ours_params = dict(ours.model.named_parameters())
    trl_params = dict(trl.model.named_parameters())
    assert ours_params.keys() == trl_params.keys()
    assert any(".lora_B.ref." in name for name in ours_params), "expected TRL's frozen reference adapter"
    with torch.no_grad():
        for name, param in ours_params.items():
            if ".lora_B.default." in name:
                value = torch.randn(param.shape, generator=generator) * 4.0
                param.copy_(value)
                trl_params[name].copy_(value)
    for name, param in ours_params.items():
        assert torch.equal(param, trl_params[name]), name

    batch = collator(rows)
    yield Pair(mapper, processor, ours, trl, batch, repeat_images(batch, processor))


def _lora_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_loss_and_gradients_match_trl(pair: Pair) -> None:
    for trainer in (pair.ours, pair.trl):
        trainer.model.train()
        trainer.model.zero_grad(set_to_none=True)
    ours = pair.ours.compute_loss(pair.ours.model, dict(pair.batch))
    trl = pair.trl.compute_loss(pair.trl.model, dict(pair.trl_batch))

    torch.testing.assert_close(ours, trl, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(ours)
    # Not the trivial case (policy == reference gives exactly log 2 and zero rewards).
    assert abs(ours.item() - math.log(2)) > 1e-3, "policy equals reference: the comparison would be trivial"
    metrics_ours, metrics_trl = pair.ours._metrics["train"], pair.trl._metrics["train"]
    assert abs(metrics_ours["rewards/chosen"][-1]) + abs(metrics_ours["rewards/rejected"][-1]) > 1e-3
    for key in ("logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected", "rewards/margins"):
        torch.testing.assert_close(
            torch.tensor(metrics_ours[key][-1]), torch.tensor(metrics_trl[key][-1]), rtol=1e-5, atol=1e-5, msg=key
        )

    # Gradients too: ours encodes the frozen images once without autograd, TRL through the model.
    ours.backward()
    trl.backward()
    ours_grads, trl_grads = _lora_grads(pair.ours.model), _lora_grads(pair.trl.model)
    assert ours_grads.keys() == trl_grads.keys()
    assert ours_grads and all(".lora_" in name and ".default." in name for name in ours_grads)
    # Compared as whole tensors: ours runs each pair as one row over a shared prompt, so the prompt's
    # gradient is summed in another order (fp32 rounding: ~1e-6 of the norm); a wrong mask or position is
    # off by orders of magnitude more.
    for name, grad in ours_grads.items():
        error = ((grad - trl_grads[name]).norm() / trl_grads[name].norm().clamp(min=1e-12)).item()
        assert error < 3e-5, f"{name}: gradient differs from TRL's by {error:.2e} of its norm"
        assert torch.isfinite(grad).all(), name
    assert any(grad.abs().sum() > 0 for grad in ours_grads.values())
    for trainer in (pair.ours, pair.trl):
        trainer.model.zero_grad(set_to_none=True)


def test_pairs_share_their_prompt(pair: Pair) -> None:
    """Families whose attention is plain causal run each pair as one row over its prompt (fewer tokens) and
    get the same loss and log-probs as with two rows; the others (spec shared_prompt: false) run two rows.
    Padding to a multiple of tokens (``--pad_to_multiple_of``: the collator's rows, then the shared rows)
    changes neither."""
    trainer, batch = pair.ours, pair.batch
    layout = trainer.pair_layout(trainer.model, batch)
    if not pair.mapper.model.shares_prompt:
        assert layout is None
    else:
        assert layout is not None, "every preference row of the fixture shares its prompt"
        assert layout.tokens < int(batch["attention_mask"].sum())
    collator, length = trainer.data_collator, batch["input_ids"].shape[1]
    multiple = 8 if length % 8 else 16  # one that really pads
    padded = type(collator)(collator.processor, pad_to_multiple_of=multiple).pad(dict(batch))
    assert padded["input_ids"].shape[1] % multiple == 0 and padded["input_ids"].shape[1] > length
    trainer.model.eval()
    losses, metrics = [], []
    try:
        for shared, padding, inputs in ((True, None, batch), (True, multiple, padded), (False, None, batch)):
            trainer.args.shared_prompt, trainer.args.pad_to_multiple_of = shared, padding
            if padding and layout is not None:
                assert trainer.pair_layout(trainer.model, inputs).shared_length % padding == 0
            with torch.no_grad():
                losses.append(trainer.compute_loss(trainer.model, dict(inputs)))
            metrics.append({key: trainer._metrics["eval"][key][-1] for key in ("logps/chosen", "logps/rejected")})
    finally:
        trainer.args.shared_prompt, trainer.args.pad_to_multiple_of = True, None
        trainer.model.train()
    for loss, values in zip(losses[1:], metrics[1:], strict=True):
        torch.testing.assert_close(loss, losses[0], rtol=1e-5, atol=1e-6)
        for key, value in values.items():
            assert value == pytest.approx(metrics[0][key], rel=1e-5, abs=1e-5), key


def test_vision_tower_runs_once_per_step(pair: Pair) -> None:
    model_cls = pair.mapper.model
    calls = {"ours": 0, "trl": 0}
    handles = []
    for key, trainer in (("ours", pair.ours), ("trl", pair.trl)):

        def count(*_: Any, key: str = key) -> None:
            calls[key] += 1

        handles.append(model_cls.get_vision_tower(trainer.model).register_forward_hook(count))
    try:
        pair.ours.compute_loss(pair.ours.model, dict(pair.batch))
        pair.trl.compute_loss(pair.trl.model, dict(pair.trl_batch))
    finally:
        for handle in handles:
            handle.remove()
    assert calls["ours"] == 1
    assert calls["trl"] >= 2  # policy and reference passes, each encoding chosen and rejected images


def _trl_example(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "images": [open_rgb(path) for path in row["images"]],
        "prompt": to_trl(row["prompt"]),
        "chosen": to_trl(row["chosen"]),
        "rejected": to_trl(row["rejected"]),
    }


def _drops_bos(hf: ProcessorMixin, prompt_text: str) -> bool:
    """Whether TRL's collator leaves out a BOS that the HF processor adds.

    TRL tokenizes with ``add_special_tokens=False`` (to avoid a double BOS); for templates that do not write
    the BOS themselves (LLaVA's) the family's processor, as transformers documents its use, adds one.
    """
    tokenizer = hf.tokenizer
    adds_bos = tokenizer.bos_token_id is not None and tokenizer("x")["input_ids"][0] == tokenizer.bos_token_id
    return adds_bos and not prompt_text.startswith(tokenizer.bos_token)


def _writes_bos(hf: ProcessorMixin) -> bool:
    """Whether the processor writes a BOS into any text that lacks one, special tokens off or not.

    Mllama's does (``build_string_from_input``), so TRL's separate processor call on each completion gives the
    completion a BOS of its own, in the middle of TRL's row; the full conversation, as ours, has one BOS.
    """
    bos_id = hf.tokenizer.bos_token_id
    return bos_id is not None and hf(text=["x"], add_special_tokens=False)["input_ids"][0][0] == bos_id


# TRL's collator renders each conversation with the chat template and tokenizes the answers on their own,
# without images: a suffix family's processor (PaliGemma's) refuses both.
@pytest.mark.parametrize("family", TEMPLATE_FAMILIES)
def test_collator_matches_trl_collator(family: str, tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    """Our DPO batch against TRL's own ``DataCollatorForVisionPreference`` on the same rows.

    Documented differences, each checked precisely rather than ignored:
    - BOS: TRL never adds special tokens; where the template does not write the BOS (LLaVA), ours has it
      (as the HF processor gives it) and TRL's rows start one token later. Where the processor writes a BOS
      into every text (Mllama), TRL's completion starts with an extra BOS that ours (and the HF processor on
      the whole conversation) does not have. Where the processor puts image tokens before the BOS
      (InstructBLIP), ours has the BOS right after them.
    - completion_mask: TRL's completion is the rendered text after the prompt, trailing white space
      included ("\\n" after an end-of-turn marker, LLaVA's trailing " "); ours leaves such tokens out,
      as nothing generates them. Everything else must be identical.
    """
    ckpt = tiny_checkpoint(family)
    mapper, processor = load_adapter(ckpt)
    hf = load_hf_processor(ckpt)
    rows = preference_rows(tmp_path, processor.images_required, processor.multi_image)
    if processor.text_messages_as_string:
        # TRL turns string contents back into parts, so it renders Llama 3.2 Vision's system prompt as the
        # parts list's repr (ours renders its text, see test_parity): compare the layout without system turns.
        rows = [{**row, "prompt": [m for m in row["prompt"] if m["role"] != "system"]} for row in rows]
    ours = mapper.dpo_collator(processor)(rows)
    theirs = DataCollatorForVisionPreference(hf)([_trl_example(row) for row in rows])

    half = len(rows)
    for i in range(2 * half):
        keep_ours = ours["attention_mask"][i].bool()
        keep_theirs = theirs["attention_mask"][i].bool()
        ids_ours, ids_theirs = ours["input_ids"][i, keep_ours], theirs["input_ids"][i, keep_theirs]
        mask_ours, mask_theirs = ours["completion_mask"][i, keep_ours], theirs["completion_mask"][i, keep_theirs]
        prompt_text = hf.apply_chat_template(to_trl(rows[i % half]["prompt"]), add_generation_prompt=True)
        if _drops_bos(hf, prompt_text):
            # The BOS comes first, or right after what the processor puts before it (InstructBLIP's queries).
            at = ids_ours.tolist().index(hf.tokenizer.bos_token_id)
            assert ids_ours[:at].tolist() == ids_theirs[:at].tolist() and ids_theirs[at] != ids_ours[at], f"row {i}"
            ids_ours, mask_ours = (
                torch.cat([ids_ours[:at], ids_ours[at + 1 :]]),
                torch.cat([mask_ours[:at], mask_ours[at + 1 :]]),
            )
        if _writes_bos(hf):
            start = int(mask_theirs.nonzero()[0])  # TRL's completion starts here, with the processor's BOS
            assert ids_theirs[start].item() == hf.tokenizer.bos_token_id != ids_ours[start].item(), f"row {i}"
            ids_theirs = torch.cat([ids_theirs[:start], ids_theirs[start + 1 :]])
            mask_theirs = torch.cat([mask_theirs[:start], mask_theirs[start + 1 :]])
        assert ids_ours.tolist() == ids_theirs.tolist(), f"row {i}"
        only_theirs = (mask_theirs.bool() & ~mask_ours.bool()).nonzero().flatten().tolist()
        assert not (mask_ours.bool() & ~mask_theirs.bool()).any(), f"row {i}: ours supervises beyond TRL's"
        assert all(is_blank_token(hf, ids_theirs[p].item()) for p in only_theirs), f"row {i}"
        # ...and only trailing ones: ours ends where TRL's ends, less its trailing blank tokens.
        assert only_theirs == list(range(len(mask_theirs) - len(only_theirs), len(mask_theirs))), f"row {i}"

    names = processor.image_input_names() + ([processor.image_grid_input] if processor.image_grid_input else [])
    # Prompt-only inputs (InstructBLIP's Q-Former text) are not compared: TRL makes them with add_special_tokens
    # off, which for the Q-Former's own BERT tokenizer drops the [CLS]/[SEP] it was trained with, and left-pads
    # them. test_parity and test_labels check ours against the HF processor on the prompts.
    names = [name for name in names if name not in prompt_only_inputs(processor)]
    repeated = repeat_images(ours, processor)
    for name in dict.fromkeys(names):
        assert torch.equal(repeated[name], theirs[name]), name


@pytest.mark.parametrize("family", FAMILIES)
def test_precomputed_reference_gives_the_same_loss_without_a_reference_pass(
    family: str, tiny_checkpoint: Callable[[str], Path], tmp_path: Path
) -> None:
    """precompute_ref_log_probs (which TRL refuses for image data) changes the work, not the loss."""
    ckpt = tiny_checkpoint(family)
    mapper, processor = load_adapter(ckpt)
    rows = preference_rows(tmp_path, processor.images_required, processor.multi_image)
    dataset = datasets.Dataset.from_list(rows, features=features_for("preference"))
    trainers = {}
    for precompute in (True, False):
        config = _config(tmp_path / f"pre{precompute}", len(rows))
        config.precompute_ref_log_probs = precompute
        trainers[precompute] = mapper.dpo_trainer(
            model=_lora_model(mapper, ckpt),
            args=config,
            data_collator=mapper.dpo_collator(processor),
            train_dataset=dataset,
            processing_class=processor.hf,
            vl_model=mapper.model,
            vl_processor=processor,
        )
    with_ref = trainers[True].train_dataset
    assert {"ref_chosen_logps", "ref_rejected_logps"} <= set(with_ref.column_names)
    generator = torch.Generator().manual_seed(99)
    params = {k: dict(t.model.named_parameters()) for k, t in trainers.items()}
    with torch.no_grad():  # move the policy away from the reference, identically in both
        for name, param in params[True].items():
            if ".lora_B.default." in name:
                value = torch.randn(param.shape, generator=generator)
                param.copy_(value)
                params[False][name].copy_(value)

    forwards = {True: 0, False: 0}
    losses = {}
    for precompute, trainer in trainers.items():
        language_model = mapper.model.get_language_model(trainer.model)

        def count(*_: Any, key: bool = precompute) -> None:
            forwards[key] += 1

        handle = language_model.register_forward_hook(count)
        features = [with_ref[i] for i in range(len(rows))] if precompute else rows
        batch = trainer.data_collator(features)
        assert ("ref_chosen_logps" in batch) == precompute
        trainer.model.train()
        with torch.no_grad():
            losses[precompute] = trainer.compute_loss(trainer.model, batch)
        handle.remove()
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-5, atol=1e-6)
    assert abs(losses[True].item() - math.log(2)) > 1e-3
    assert forwards == {True: 1, False: 2}  # policy only, versus policy and reference
