"""DPO: our trainer's loss equals TRL's DPOTrainer's on the same weights and batch; one vision pass.

Both trainers are built the way ``resonance.commands.train.build_trainer`` builds ours: the tiny model with
a frozen vision tower and LoRA on the language model (``model_cls.lora_target_modules``), passed as a
PEFT model without ``ref_model``, so TRL keeps a frozen copy of the initial adapter ("ref") as the
reference. The LoRA B matrices of the trained adapter are then set to the same random values in both
models, and the LM head is scaled up in both (``LOGIT_STD``), so that the policy's log-probs differ from
the reference's by whole nats: every pair's rewards and margin are far from 0 (``_assert_not_trivial``).

The computations compared run in float64: weights, image inputs, and the operations that transformers and
TRL run in float32 whatever the model's dtype (``_Float64``). Two computations of one value then differ by
float64 rounding alone, on any machine, and each comparison allows ``RTOL`` of the magnitudes involved:
far above that rounding, far below what a wrong mask, position or image feature changes.

Our collator gives the prompts' images once (the trainer encodes them once for chosen, rejected and
the reference); TRL gets the same batch with the image inputs repeated for chosen and rejected, as its
own collator lays them out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from os.path import commonprefix
from pathlib import Path
from typing import Any

import datasets
import pytest
import torch
from helpers import (
    FAMILIES,
    TEMPLATE_FAMILIES,
    Message,
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
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_leaves
from transformers import ProcessorMixin
from trl import DPOConfig, DPOTrainer
from trl.trainer import dpo_trainer as trl_dpo
from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

from resonance.algorithms.dpo.config import VLDPOConfig
from resonance.base.model import unwrap
from resonance.base.processor import VLProcessor, text_as_string
from resonance.base.registry import ModelCoreMapper
from resonance.data.rows import features_for
from resonance.patches.fused_head import fused_head_backbone

DTYPE = torch.float64
# Tolerance of every comparison of two computations of one value, relative to the magnitude of what it is
# computed from: half the digits of DTYPE, 1.5e-8. Ours adds in other orders than TRL (a pair's two rows
# over one shared prompt), which costs DTYPE rounding: up to ~170 eps (4e-14) of a gradient's norm where its
# terms cancel (in float32 this file saw 300 eps, 3.6e-5, over the 3e-5 it then allowed). A wrong mask,
# position or image feature changes the results by orders of magnitude more than RTOL.
RTOL = torch.finfo(DTYPE).eps ** 0.5
# The tiny models' LM head (0.02 std) gives logits of ~0.16 std: every next-token distribution is nearly
# uniform and the policy's log-probs barely move from the reference's, however far its adapter does (a loss
# within 2e-4 of log 2). The head is rescaled, identically in every model, for logits of this std.
LOGIT_STD = 4.0
# Least |reward| and |margin| of every pair, all exactly 0 when the policy equals the reference: 1e4 times
# what the comparisons of rewards allow (RTOL x beta x |log-probs| ~ 1e-7), 1e10 times DTYPE rounding.
NONTRIVIAL = 1e-3


def _has(tree: Any, dtype: torch.dtype) -> bool:
    return any(isinstance(leaf, torch.Tensor) and leaf.dtype == dtype for leaf in tree_leaves(tree))


class _Float64(TorchDispatchMode):
    """While active, every operation that asks for float32 gets DTYPE, and none may turn DTYPE into float32.

    transformers computes RMSNorm and rotary embeddings in float32, and TRL's fused LM head (ours as well)
    folds the logits into float32 statistics and accumulates their gradient in float32, whatever the model's
    dtype. With only the weights in float64 the loss is float32, and the gradients differ from TRL's by
    ~1e-7 of their norm: a shared prompt's gradient is rounded to float32 after its two rows' parts are
    added, TRL's before. The mode acts on the dispatched operations, so it holds in backward as well (the
    fused head's own backward, the recomputation of gradient checkpointing).
    """

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if kwargs.get("dtype") == torch.float32:
            kwargs = {**kwargs, "dtype": DTYPE}
        out = func(*args, **kwargs)
        if _has(out, torch.float32) and _has((args, kwargs), DTYPE):
            raise AssertionError(f"{func} turned {DTYPE} into float32")
        return out


def _to_model_dtype(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch with its floating-point tensors (the image inputs) in DTYPE, as the weights."""
    return {k: (v.to(DTYPE) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in batch.items()}


def _collate_in_model_dtype(collator: Callable[[Any], dict[str, Any]]) -> Callable[[Any], dict[str, Any]]:
    """The collator as a trainer that runs inside :class:`_Float64` calls it: the batch in DTYPE, made outside the
    mode, since it is data preparation (torchvision's image processors fill float32 tensors in torch)."""

    def collate(features: Any) -> dict[str, Any]:
        with _disable_current_modes():
            return _to_model_dtype(collator(features))

    return collate


@dataclass
class Pair:
    """Our trainer and TRL's on identical weights, with one preference batch in each layout."""

    mapper: ModelCoreMapper
    processor: VLProcessor
    ours: Any
    trl: DPOTrainer
    batch: dict[str, torch.Tensor]
    trl_batch: dict[str, torch.Tensor]
    trl_pairs: list[dict[str, torch.Tensor]]  # each pair of the batch alone, in TRL's layout


def _lora_model(mapper: ModelCoreMapper, ckpt: Path) -> PeftModel:
    model_cls = mapper.model
    # .to: the float32 buffers (rotary) too; eager experts: transformers' grouped_mm kernel for mixture-of-experts
    # layers takes no float64 (a no-op for the other families)
    model = model_cls.from_pretrained(ckpt, dtype=DTYPE, experts_implementation="eager").to(DTYPE)
    # Logits of LOGIT_STD for hidden states of unit RMS, policy and reference alike (where the head is tied to
    # the input embeddings, those scale too: the same in every model).
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head.mul_(LOGIT_STD / (head.std() * head.shape[1] ** 0.5))
    model_cls.freeze_vision_tower(model)
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.05,  # as build_trainer's default; TRL's disable_dropout zeroes it in both trainers
        target_modules=model_cls.lora_target_modules(model_cls.default_lora_target),
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(0)  # the same lora_A init in both copies
    peft_model = get_peft_model(model, config)
    tensors = [*peft_model.named_parameters(), *peft_model.named_buffers()]
    other = {name: t.dtype for name, t in tensors if t.is_floating_point() and t.dtype != DTYPE}
    assert not other, f"not in {DTYPE}: {other}"
    return peft_model


def _move_policy_away(models: list[torch.nn.Module], seed: int) -> None:
    """Set the trained adapter's LoRA B matrices (zero at init: policy == reference) to the same seeded random
    values in every model. Only once the trainers are built: TRL copies the initial adapter into "ref"."""
    generator = torch.Generator().manual_seed(seed)
    params = [dict(model.named_parameters()) for model in models]
    assert all(p.keys() == params[0].keys() for p in params)
    names = [name for name in params[0] if ".lora_B.default." in name]
    assert names and any(".lora_B.ref." in name for name in params[0]), "expected TRL's frozen reference adapter"
    with torch.no_grad():
        for name in names:
            value = torch.randn(params[0][name].shape, generator=generator, dtype=DTYPE)
            for p in params:
                p[name].copy_(value)
    for p in params[1:]:
        for name, param in p.items():
            assert torch.equal(param, params[0][name]), name


def _assert_not_trivial(trainer: DPOTrainer, pair_batches: list[dict[str, Any]]) -> None:
    """Every pair's rewards and margin are at least NONTRIVIAL: the policy is not the reference, on any pair.

    Each pair runs alone: a batch's loss and reward metrics are means over its pairs, which can cancel (a
    loss within 0.004 of log 2 with every pair's margin above 0.3).
    """
    trainer.model.eval()
    try:
        for i, batch in enumerate(pair_batches):
            with torch.no_grad(), _Float64():
                trainer.compute_loss(trainer.model, dict(batch))
            for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
                value = trainer._metrics["eval"][key][-1]
                assert abs(value) >= NONTRIVIAL, f"pair {i}: {key} {value:.2e}: the policy is nearly the reference"
    finally:
        trainer.model.train()


def _config(
    output_dir: Path, batch_size: int, config_class: type[DPOConfig] = DPOConfig, router_loss: bool = False
) -> DPOConfig:
    """``router_loss``: the spec's moe.aux_loss, which build_trainer turns into TRL's router_aux_loss_coef (0: off)."""
    return config_class(
        output_dir=str(output_dir),
        report_to="none",
        remove_unused_columns=False,
        bf16=False,
        use_cpu=True,
        per_device_train_batch_size=batch_size,
        max_steps=1,
        router_aux_loss_coef=None if router_loss else 0.0,
    )


@pytest.fixture(scope="module", params=FAMILIES)
def pair(
    request: pytest.FixtureRequest, tiny_checkpoint: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pair]:
    family: str = request.param
    ckpt = tiny_checkpoint(family)
    tmp = tmp_path_factory.mktemp(f"dpo_{family}")
    mapper, processor = load_adapter(ckpt)
    rows = preference_rows(tmp, processor.images_required, processor.multi_image, processor.takes_system)
    dataset = datasets.Dataset.from_list(rows, features=features_for("preference"))
    collator = mapper.dpo_collator(processor)

    ours = mapper.dpo_trainer(
        model=_lora_model(mapper, ckpt),
        args=_config(tmp / "ours", len(rows), VLDPOConfig, mapper.model.router_aux_loss),
        data_collator=collator,
        train_dataset=dataset,
        processing_class=processor.hf,
        vl_model=mapper.model,
        vl_processor=processor,
    )
    trl = DPOTrainer(
        model=_lora_model(mapper, ckpt),
        args=_config(tmp / "trl", len(rows), router_loss=mapper.model.router_aux_loss),
        train_dataset=dataset,
        processing_class=load_hf_processor(ckpt),
    )
    # TRL's fused LM head cannot run a model without a backbone module (InstructBLIP); both trainers get the
    # same small adapter (a no-op for every other family), so the rest of TRL's computation is compared.
    fused_head_backbone(unwrap(trl.model))
    _move_policy_away([ours.model, trl.model], seed=1234)

    batch = _to_model_dtype(collator(rows))
    trl_pairs = [repeat_images(_to_model_dtype(collator([row])), processor) for row in rows]
    yield Pair(mapper, processor, ours, trl, batch, repeat_images(batch, processor), trl_pairs)


def _lora_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_loss_and_gradients_match_trl(pair: Pair) -> None:
    for trainer in (pair.ours, pair.trl):
        trainer.model.train()
        trainer.model.zero_grad(set_to_none=True)
    with _Float64():
        ours = pair.ours.compute_loss(pair.ours.model, dict(pair.batch))
        trl = pair.trl.compute_loss(pair.trl.model, dict(pair.trl_batch))
    assert ours.dtype == trl.dtype == DTYPE
    assert torch.isfinite(ours)
    # The loss and rewards are computed from the log-probs (a reward is beta times a difference of two), so
    # their rounding scales with beta times the log-probs, not with themselves.
    metrics_ours, metrics_trl = pair.ours._metrics["train"], pair.trl._metrics["train"]
    scale = max(abs(metrics_trl[key][-1]) for key in ("logps/chosen", "logps/rejected"))
    beta = pair.trl.args.beta
    assert ours.item() == pytest.approx(trl.item(), rel=RTOL, abs=RTOL * beta * scale)
    for key in ("logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected", "rewards/margins"):
        tolerance = RTOL * (scale if key.startswith("logps/") else beta * scale)
        assert metrics_ours[key][-1] == pytest.approx(metrics_trl[key][-1], rel=RTOL, abs=tolerance), key

    # Gradients too: ours encodes the frozen images once without autograd, TRL through the model.
    with _Float64():
        ours.backward()
        trl.backward()
    ours_grads, trl_grads = _lora_grads(pair.ours.model), _lora_grads(pair.trl.model)
    assert ours_grads.keys() == trl_grads.keys()
    assert ours_grads and all(".lora_" in name and ".default." in name for name in ours_grads)
    # Compared as whole tensors, relative to their norm: ours runs each pair as one row over a shared prompt,
    # so the prompt's gradient is added in another order.
    for name, grad in ours_grads.items():
        assert grad.dtype == DTYPE and torch.isfinite(grad).all(), name
        error, norm = (grad - trl_grads[name]).norm().item(), trl_grads[name].norm().item()
        assert error <= RTOL * norm, f"{name}: gradient differs from TRL's by {error / norm:.2e} of its norm"
    assert any(grad.abs().sum() > 0 for grad in ours_grads.values())
    for trainer in (pair.ours, pair.trl):
        trainer.model.zero_grad(set_to_none=True)
    _assert_not_trivial(pair.trl, pair.trl_pairs)


def test_pairs_share_their_prompt(pair: Pair) -> None:
    """Families whose attention is plain causal run each pair as one row over its prompt (fewer tokens) and
    get the same loss and log-probs as with two rows; the others (spec shared_prompt: false) run two rows.
    Padding to a multiple of tokens (``--pad_to_multiple_of``: the collator's rows, then the shared rows)
    changes neither."""
    trainer, batch = pair.ours, pair.batch
    layout = trainer.pair_layout(trainer.model, batch)
    if not pair.mapper.model.shares_prompt or trainer.aux_loss_enabled:  # (the router loss reads the rows' mask)
        assert layout is None
    else:
        assert layout is not None, "every preference row of the fixture shares its prompt"
        assert layout.tokens < int(batch["attention_mask"].sum())
    collator, length = trainer.data_collator, batch["input_ids"].shape[1]
    multiple = next(m for m in (8, 16, 32, 3, 5, 7) if length % m)  # one that really pads
    padded = type(collator)(collator.processor, pad_to_multiple_of=multiple).pad(dict(batch))
    assert padded["input_ids"].shape[1] % multiple == 0 and padded["input_ids"].shape[1] > length
    trainer.model.eval()
    losses, metrics = [], []
    try:
        for shared, padding, inputs in ((True, None, batch), (True, multiple, padded), (False, None, batch)):
            trainer.args.shared_prompt, trainer.args.pad_to_multiple_of = shared, padding
            if padding and layout is not None:
                assert trainer.pair_layout(trainer.model, inputs).shared_length % padding == 0
            with torch.no_grad(), _Float64():
                losses.append(trainer.compute_loss(trainer.model, dict(inputs)))
            metrics.append({key: trainer._metrics["eval"][key][-1] for key in ("logps/chosen", "logps/rejected")})
    finally:
        trainer.args.shared_prompt, trainer.args.pad_to_multiple_of = True, None
        trainer.model.train()
    assert all(loss.dtype == DTYPE for loss in losses)
    scale = max(abs(value) for value in metrics[0].values())
    for loss, values in zip(losses[1:], metrics[1:], strict=True):
        assert loss.item() == pytest.approx(losses[0].item(), rel=RTOL, abs=RTOL * trainer.args.beta * scale)
        for key, value in values.items():
            assert value == pytest.approx(metrics[0][key], rel=RTOL, abs=RTOL * scale), key


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


def _turn_opening(hf: ProcessorMixin, prompt: list[Message], answer: list[Message], prompt_text: str) -> str:
    """The text TRL's completion holds before the answer's own: none where the prompt rendered with the generation
    prompt (``prompt_text``) starts the rendered conversation; else what the conversation writes between their
    common prefix, which TRL takes as the prompt (trl.data_utils.apply_chat_template), and the answer's text."""
    full = hf.apply_chat_template(to_trl(prompt + answer))
    common = commonprefix([prompt_text, full])
    if common == prompt_text:
        return ""
    text = "".join(part["text"] for part in answer[0]["content"] if part["type"] == "text")
    return full[len(common) : full.index(text, len(common))]


# TRL's collator renders each conversation with the chat template and tokenizes the answers on their own,
# without images: a suffix family's processor (PaliGemma's) refuses both.
@pytest.mark.parametrize("family", TEMPLATE_FAMILIES)
def test_collator_matches_trl_collator(
    family: str, tmp_path: Path, tiny_checkpoint: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Our DPO batch against TRL's own ``DataCollatorForVisionPreference`` on the same rows.

    Documented differences, each checked precisely rather than ignored:
    - BOS: TRL never adds special tokens; where the template does not write the BOS (LLaVA), ours has it
      (as the HF processor gives it) and TRL's rows start one token later. Where the processor writes a BOS
      into every text (Mllama), TRL's completion starts with an extra BOS that ours (and the HF processor on
      the whole conversation) does not have. Where the processor puts image tokens before the BOS
      (InstructBLIP), ours has the BOS right after them.
    - completion_mask: TRL's completion is the rendered text after the prompt, trailing white space
      included ("\\n" after an end-of-turn marker, LLaVA's trailing " "); ours leaves such tokens out,
      as nothing generates them. Where the history opens an answer's turn otherwise than the generation prompt
      (Molmo2's " <|im_start|>assistant\\n" against "<|im_start|>assistant\\n"), TRL's prompt is the two
      renderings' common prefix, so its completion starts with the history's turn opening; ours starts at the
      answer's own text, as test_labels' reference does (the generation prompt writes the opening at inference).
    - An image input that indexes the batch's patches (Molmo2's image_token_pooling): TRL's rejected copy points
      at its own copy of the patches, ours at the chosen copy, which holds the same pixels.

    Everything else must be identical.
    """
    ckpt = tiny_checkpoint(family)
    mapper, processor = load_adapter(ckpt)
    hf = load_hf_processor(ckpt)
    rows = preference_rows(tmp_path, processor.images_required, processor.multi_image, processor.takes_system)
    if processor.text_messages_as_string:
        # TRL 1.16 turns every message into a parts list, and templates that print a text-only message's content
        # as it is (Llama 3.2 Vision's system prompt, GLM-4V's answers) then render the list's repr: TRL's own
        # VLM DPO trains such families on that text. Ours gives them strings (spec chat_template.text_messages,
        # see test_parity); TRL's collator gets them too, and the rest of its work is compared.
        prepare = trl_dpo.prepare_multimodal_messages
        probe = [{"role": role, "content": "x"} for role in ("system", "user", "assistant")]
        assert "[{'type': 'text'" in hf.apply_chat_template(prepare(probe))  # TRL's behaviour, still as described

        def keep_text_as_string(messages: list[dict[str, Any]], images: Any = None) -> list[dict[str, Any]]:
            return [m if m["role"] == "user" else text_as_string(m) for m in prepare(messages, images=images)]

        monkeypatch.setattr(trl_dpo, "prepare_multimodal_messages", keep_text_as_string)
    if processor.trl_training_template:
        # Ours renders training rows with TRL's training variant of the template (spec chat_template.training: trl:
        # Qwen3.5's thinking template renders earlier assistant turns without their think block); TRL's DPO collator
        # renders with the processor's, so it gets that variant too
        hf.chat_template = hf.training_chat_template
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
        row = rows[i % half]
        opening = _turn_opening(hf, row["prompt"], row["chosen" if i < half else "rejected"], prompt_text)
        if opening:  # exactly the opening's tokens, first in TRL's completion, are TRL's only
            start = int(mask_theirs.nonzero()[0])
            ends = [n for n in range(start + 1, len(ids_theirs)) if hf.tokenizer.decode(ids_theirs[start:n]) == opening]
            assert ends, f"row {i}: TRL's completion does not start with the turn opening {opening!r}"
            assert mask_theirs[start : ends[0]].all() and not mask_ours[start : ends[0]].any(), f"row {i}"
            mask_theirs = torch.cat(
                [mask_theirs[:start], torch.zeros_like(mask_theirs[start : ends[0]]), mask_theirs[ends[0] :]]
            )
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
        assert torch.equal(repeated[name], theirs[name]) or _indexes_the_second_copy(
            repeated[name], theirs[name], ours["pixel_values"]
        ), name


def _indexes_the_second_copy(ours: torch.Tensor, theirs: torch.Tensor, pixel_values: torch.Tensor) -> bool:
    """Whether ``theirs`` is ``ours`` (repeated for chosen and rejected) with the second copy's entries >= 0 moved
    by the number of patches in ``pixel_values`` (one copy of the batch's images): an input that indexes the batch's
    patches (Molmo2's image_token_pooling: per pooled token, indices into all images' patches flattened, -1 for
    none). TRL's second copy points at the second copy of the patches,
    ours at the first: the same pixels (test_loss_and_gradients_match_trl compares what the model makes of both)."""
    if ours.is_floating_point() or ours.shape != theirs.shape or len(ours) % 2:
        return False
    half = len(ours) // 2
    second = ours[half:]
    assert (second >= 0).any(), "test bug: no index to compare"
    moved = torch.where(second >= 0, second + pixel_values.shape[:-1].numel(), second)
    return torch.equal(theirs[:half], ours[:half]) and torch.equal(theirs[half:], moved)


@pytest.mark.parametrize("family", FAMILIES)
def test_precomputed_reference_gives_the_same_loss_without_a_reference_pass(
    family: str, tiny_checkpoint: Callable[[str], Path], tmp_path: Path
) -> None:
    """precompute_ref_log_probs (which TRL refuses for image data) changes the work, not the loss."""
    ckpt = tiny_checkpoint(family)
    mapper, processor = load_adapter(ckpt)
    rows = preference_rows(tmp_path, processor.images_required, processor.multi_image, processor.takes_system)
    dataset = datasets.Dataset.from_list(rows, features=features_for("preference"))
    collator = mapper.dpo_collator(processor)
    models = {precompute: _lora_model(mapper, ckpt) for precompute in (True, False)}
    trainers = {}
    with _Float64():  # the reference log-probs are precomputed here
        for precompute, model in models.items():
            config = _config(tmp_path / f"pre{precompute}", len(rows), router_loss=mapper.model.router_aux_loss)
            config.precompute_ref_log_probs = precompute
            trainers[precompute] = mapper.dpo_trainer(
                model=model,
                args=config,
                data_collator=_collate_in_model_dtype(collator),
                train_dataset=dataset,
                processing_class=processor.hf,
                vl_model=mapper.model,
                vl_processor=processor,
            )
    with_ref = trainers[True].train_dataset
    assert {"ref_chosen_logps", "ref_rejected_logps"} <= set(with_ref.column_names)
    _move_policy_away([trainer.model for trainer in trainers.values()], seed=99)

    forwards = {True: 0, False: 0}
    losses = {}
    for precompute, trainer in trainers.items():
        language_model = mapper.model.get_language_model(trainer.model)

        def count(*_: Any, key: bool = precompute) -> None:
            forwards[key] += 1

        handle = language_model.register_forward_hook(count)
        features = [with_ref[i] for i in range(len(rows))] if precompute else rows
        batch = collator(features)
        assert ("ref_chosen_logps" in batch) == precompute
        if precompute:
            stored = torch.stack([batch["ref_chosen_logps"], batch["ref_rejected_logps"]])
        trainer.model.train()
        with torch.no_grad(), _Float64():
            losses[precompute] = trainer.compute_loss(trainer.model, _to_model_dtype(batch))
        handle.remove()
    assert forwards == {True: 1, False: 2}  # policy only, versus policy and reference
    assert losses[True].dtype == losses[False].dtype == DTYPE
    # The collator makes the precomputed log-probs a tensor of torch's default dtype (float32): each is
    # rounded, by at most eps/2 of itself. A pair's sigmoid loss moves by at most beta times the change of
    # its margin, so the loss by at most beta x eps x the largest |log-prob|; DTYPE rounding adds RTOL.
    beta = trainers[True].args.beta
    rounding = beta * torch.finfo(stored.dtype).eps * stored.abs().max().item()
    assert losses[True].item() == pytest.approx(losses[False].item(), rel=RTOL, abs=rounding)
    _assert_not_trivial(trainers[False], [_to_model_dtype(collator([row])) for row in rows])
