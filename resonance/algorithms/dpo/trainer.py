"""DPO's trainer: TRL's DPOTrainer sharing one vision pass between chosen, rejected and the reference, each pair
run as one row over a single copy of its prompt (:mod:`resonance.algorithms.shared_prompt`)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
from trl import DPOTrainer
from trl.trainer.utils import hash_module

from resonance.algorithms import ALGORITHMS
from resonance.algorithms.arguments import DataArguments, ModelArguments
from resonance.algorithms.dpo.config import VLDPOConfig
from resonance.algorithms.guards import WholeCheckpoints
from resonance.algorithms.image_features import ImageEncodingMixin, add_to_loss, weights_sharded
from resonance.algorithms.setup import build_offline_trainer
from resonance.algorithms.shared_prompt import SharedLayout, install_shared_prompt, may_share, plan_pairs, sharing
from resonance.base.model import VLModel, unwrap
from resonance.base.processor import VLProcessor
from resonance.base.registry import ModelCoreMapper
from resonance.patches.fused_head import fused_head_backbone

# TRL's frozen copy of a LoRA model's starting adapter: DPO's reference while training (trl.DPOTrainer.__init__).
REFERENCE_ADAPTER = "ref"


@contextlib.contextmanager
def saving_only_trained_adapter(model: torch.nn.Module) -> Iterator[None]:
    """While inside, ``model.save_pretrained`` (a PEFT model holding :data:`REFERENCE_ADAPTER`) writes the trained
    adapter alone, through PEFT's ``selected_adapters``; other models save as they do."""
    if REFERENCE_ADAPTER not in getattr(model, "peft_config", {}):
        yield
        return
    model.save_pretrained = functools.partial(
        type(model).save_pretrained, model, selected_adapters=[model.active_adapter]
    )
    try:
        yield
    finally:
        del model.save_pretrained


class VLDPOTrainer(WholeCheckpoints, ImageEncodingMixin, DPOTrainer):
    """DPO on TRL's DPOTrainer (same losses and metrics), with one vision pass per step.

    Each pair runs as one row over its shared prompt where the family allows it (see
    :mod:`resonance.algorithms.shared_prompt`), for the policy and the reference alike.

    ``precompute_ref_log_probs=True`` works for image datasets too (TRL refuses it for them): the
    reference log-probs of every row are computed once before training, with TRL's own cached pass
    and our collator, and training then skips the reference forward.
    """

    def __init__(self, *args: Any, vl_model: type[VLModel], vl_processor: VLProcessor, **kwargs: Any):
        self._bind_adapter(vl_model, vl_processor)
        config = kwargs.get("args")
        precompute = bool(config is not None and config.precompute_ref_log_probs)
        if precompute:
            config.precompute_ref_log_probs = False  # TRL's __init__ refuses image datasets; done below instead
        super().__init__(*args, **kwargs)
        fused_head_backbone(unwrap(self.model))
        fused_head_backbone(None if self.ref_model is None else unwrap(self.ref_model))
        install_shared_prompt(self.model, vl_model.position_ids_kind)
        install_shared_prompt(self.ref_model, vl_model.position_ids_kind)
        vl_model.batch_vision_attention(self.model, self.ref_model)
        if precompute:
            config.precompute_ref_log_probs = True
            self._precompute_images()

    def _precompute_images(self) -> None:
        """Add ``ref_chosen_logps``/``ref_rejected_logps`` columns to the train and eval datasets."""
        self.precompute_ref_logps = True
        self._precompute_model_hash = hash_module(self.ref_model or self.model)
        self._precompute_engine = None
        size = self.args.precompute_ref_batch_size
        self.train_dataset = self._precompute_ref_logps(
            self.train_dataset, "train", size or self.args.per_device_train_batch_size
        )
        if isinstance(self.eval_dataset, dict):
            self.eval_dataset = {
                name: self._precompute_ref_logps(data, name, size or self.args.per_device_eval_batch_size)
                for name, data in self.eval_dataset.items()
            }
        elif self.eval_dataset is not None:
            self.eval_dataset = self._precompute_ref_logps(
                self.eval_dataset, "eval", size or self.args.per_device_eval_batch_size
            )

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """As transformers' ``Trainer.save_model``, but the result holds the trained adapter alone: TRL's frozen
        reference adapter (``ref/``) is saved in checkpoints, which a resume reloads, and left out of the output,
        which needs none (the reference is the model the adapter was trained from)."""
        if _internal_call:
            super().save_model(output_dir, _internal_call)
            return
        with saving_only_trained_adapter(self.accelerator.unwrap_model(self.model)):
            super().save_model(output_dir, _internal_call)

    def pair_layout(self, model: torch.nn.Module, inputs: dict[str, Any]) -> SharedLayout | None:
        """The shared-prompt layout of this batch, or ``None`` to run it as chosen rows then rejected rows."""
        if not may_share(self.args, self.vl_model, model, self.aux_loss_enabled):
            return None
        return plan_pairs(
            inputs["input_ids"],
            inputs["attention_mask"],
            inputs["completion_mask"],
            self.vl_processor.placeholder_token_ids(),
            multiple_of=self.args.pad_to_multiple_of or 1,
        )

    def compute_ref_log_probs(self, model, inputs):
        layout = self.pair_layout(model, inputs)
        with self._idle_encoder(model, inputs):  # no gradient here: only the other processes' collectives
            inputs = self._image_model_inputs(model, inputs, copies=1 if layout else 2)
            with sharing(layout, model, self.ref_model), self._reference_as_trained(model):
                return super().compute_ref_log_probs(model, inputs)

    @contextlib.contextmanager
    def _reference_as_trained(self, model: torch.nn.Module) -> Iterator[None]:
        """With compiled layers and the reference an adapter of the policy, TRL's reference forwards (those it runs
        under ``no_grad``) run as the policy's do: gradients on (their outputs then detached: nothing flows back) and
        gradient checkpointing kept.

        torch.compile makes one variant of each layer for forwards with gradients and one without; in bf16 their
        kernels may round differently, so a reference pass under ``no_grad`` need not reproduce the policy's log-probs
        at step 0, when the two are the same weights (on an H200, LLaVA-1.5-7B's first compiled DPO loss was 0.6711,
        not log 2). In the policy's variant it does; the cost is the memory of a checkpointed forward while it runs."""
        base = unwrap(model)
        compiled = any(getattr(m, "_compiled_call_impl", None) is not None for m in base.modules())
        sharded = weights_sharded(self.accelerator)  # FSDP and ZeRO-3 hook gradients into every forward with them
        if not (compiled and self.ref_model is None and model.training) or sharded:
            yield
            return
        # the hooks go on the model inside any DDP wrapper: DDP's own forward stays under TRL's no_grad, so it does
        # not wait for a backward pass through the reference
        inner = self.accelerator.unwrap_model(model)
        import trl.trainer.dpo_trainer as trl_dpo

        switched: list[bool] = []

        def enable_grad(module: torch.nn.Module, args: Any, kwargs: Any) -> None:
            switched.append(not torch.is_grad_enabled())  # the reference's pass; the policy's has gradients already
            torch.set_grad_enabled(True)

        def detach(module: torch.nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
            if not switched.pop():
                return output
            torch.set_grad_enabled(False)
            for key, value in output.items():
                if isinstance(value, torch.Tensor):
                    output[key] = value.detach()
            return output

        handles = [
            inner.register_forward_pre_hook(enable_grad, with_kwargs=True),
            inner.register_forward_hook(detach, with_kwargs=True),
        ]
        keep = trl_dpo.disable_gradient_checkpointing
        trl_dpo.disable_gradient_checkpointing = lambda *args, **kwargs: contextlib.nullcontext()
        try:
            yield
        finally:
            trl_dpo.disable_gradient_checkpointing = keep
            for handle in handles:  # grad mode: TRL's no_grad restores it on leaving, whatever happened inside
                handle.remove()

    def _compute_loss(self, model, inputs, return_outputs):
        layout = self.pair_layout(model, inputs)
        with self._idle_encoder(model, inputs) as idle:
            inputs = self._image_model_inputs(model, inputs, copies=1 if layout else 2)
            with sharing(layout, model, self.ref_model), self._reference_as_trained(model):
                result = super()._compute_loss(model, inputs, return_outputs)
        return add_to_loss(result, idle.term)


def build(
    mapper: ModelCoreMapper, model_args: ModelArguments, data_args: DataArguments, config: VLDPOConfig
) -> tuple[Any, VLProcessor]:
    """``resonance train dpo``: preference rows, the family's DPO collator and trainer; full training gets a frozen
    copy of the model as its reference."""
    return build_offline_trainer(
        mapper,
        model_args,
        data_args,
        config,
        kind=ALGORITHMS["dpo"].data,
        collator_cls=mapper.dpo_collator,
        trainer_cls=mapper.dpo_trainer,
        full_training_reference=True,
    )
