"""SFT: TRL's SFTTrainer with our collator (labels on assistant turns only), frozen-tower images encoded once."""

from __future__ import annotations

from typing import Any

from trl import SFTConfig, SFTTrainer

from resonance.algorithms import ALGORITHMS
from resonance.algorithms.arguments import DataArguments, ModelArguments
from resonance.algorithms.guards import WholeCheckpoints
from resonance.algorithms.image_features import ImageEncodingMixin, add_to_loss
from resonance.algorithms.setup import build_offline_trainer
from resonance.base.model import VLModel, unwrap
from resonance.base.processor import VLProcessor
from resonance.base.registry import ModelCoreMapper
from resonance.patches.fused_head import fused_head_backbone


class VLSFTTrainer(WholeCheckpoints, ImageEncodingMixin, SFTTrainer):
    """SFT on TRL's SFTTrainer with our collator (labels on assistant turns only)."""

    def __init__(self, *args: Any, vl_model: type[VLModel], vl_processor: VLProcessor, **kwargs: Any):
        self._bind_adapter(vl_model, vl_processor)
        super().__init__(*args, **kwargs)
        fused_head_backbone(unwrap(self.model))
        vl_model.batch_vision_attention(self.model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: D102
        with self._idle_encoder(model, inputs) as idle:
            inputs = self._image_model_inputs(model, inputs, copies=1)
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        return add_to_loss(result, idle.term)


def build(
    mapper: ModelCoreMapper, model_args: ModelArguments, data_args: DataArguments, config: SFTConfig
) -> tuple[Any, VLProcessor]:
    """``resonance train sft``: SFT rows, the family's SFT collator and trainer."""
    config.dataset_kwargs = {**(config.dataset_kwargs or {}), "skip_prepare_dataset": True}  # rows are ours
    return build_offline_trainer(
        mapper,
        model_args,
        data_args,
        config,
        kind=ALGORITHMS["sft"].data,
        collator_cls=mapper.sft_collator,
        trainer_cls=mapper.sft_trainer,
    )
