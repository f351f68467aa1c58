"""Collators: dataset rows (see resonance.data.rows) -> padded model batches with labels.

Images are opened and videos decoded here, lazily, one batch at a time.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from PIL import Image
from transformers import BatchFeature

from resonance.base.processor import IGNORE_INDEX, VLProcessor
from resonance.data.images import load_row_images
from resonance.data.videos import LoadedVideo, load_row_videos
from resonance.errors import RowError

logger = logging.getLogger("resonance.data")


# The batch inputs with one entry per token (dimension 1), which padding lengthens: text, masks, labels (DPO:
# the completion mask) and the families' per-token extras (Gemma 3 / PaliGemma token types, Qwen3-VL's
# multimodal token types, Mllama's cross-attention mask [rows, tokens, images, tiles]).
PER_TOKEN_INPUTS = {
    "input_ids",
    "attention_mask",
    "labels",
    "completion_mask",
    "token_type_ids",
    "mm_token_type_ids",
    "cross_attention_mask",
}


class _VLCollatorBase:
    """Shared by the SFT and DPO collators: image loading and the max-length policy."""

    def __init__(
        self,
        processor: VLProcessor,
        max_length: int | None = None,
        skip_long_rows: bool = False,
        pad_to_multiple_of: int | None = None,
    ):
        self.processor = processor
        self.max_length = max_length
        self.skip_long_rows = skip_long_rows
        self.pad_to_multiple_of = pad_to_multiple_of  # TRL's --pad_to_multiple_of
        self.skipped_rows = 0

    def load_images(self, paths: list[str], source: str) -> list[Image.Image]:
        """Open a row's images as RGB; a missing or unreadable file names the row."""
        return load_row_images(self.processor, paths, source)

    def load_videos(self, feature: dict[str, Any]) -> list[LoadedVideo]:
        """A row's videos, decoded at the frames the family samples; an unreadable file names the row. None are
        decoded for a family that takes no video: the processor refuses the row by name (its video parts)."""
        if self.processor.video is None:
            return []
        return load_row_videos(self.processor, feature.get("videos") or [], feature["source"])

    def pad(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Right-pad the per-token inputs to a multiple of ``pad_to_multiple_of`` tokens (padding, unattended,
        unsupervised); image inputs are left as they are."""
        length = batch["input_ids"].shape[1]
        extra = -length % (self.pad_to_multiple_of or 1)
        if not extra:
            return batch
        pad_id = self.processor.tokenizer.pad_token_id
        fills = {"input_ids": 0 if pad_id is None else pad_id, "labels": IGNORE_INDEX}
        for key in PER_TOKEN_INPUTS & batch.keys():
            value = batch[key]
            shape = (value.shape[0], extra, *value.shape[2:])
            batch[key] = torch.cat([value, value.new_full(shape, fills.get(key, 0))], dim=1)
        return batch

    def lengths(self, features: list[dict[str, Any]]) -> list[int]:
        """The tokens each row holds once collated (image tokens included, padding excluded): the measure
        ``max_length`` is compared with, here and up front (:func:`resonance.algorithms.lengths.fit_rows`)."""
        return self._collate(features)[1]

    def _collate(self, features: list[dict[str, Any]]) -> tuple[BatchFeature, list[int]]:
        """The processor's batch for ``features`` and each row's length in tokens (see :meth:`lengths`)."""
        raise NotImplementedError

    def _collate_fitting(self, features: list[dict[str, Any]]) -> tuple[BatchFeature, list[dict[str, Any]]]:
        """The batch of the rows within ``max_length``, and those rows. Rows are measured before the first step, so
        an over-long row here came some other way: an error naming it or, with ``skip_long_rows``, dropped and
        counted."""
        batch, lengths = self._collate(features)
        over = self._too_long(lengths, [f["source"] for f in features])
        if over:
            features = [f for i, f in enumerate(features) if i not in over]
            batch, _ = self._collate(features)
        return batch, features

    def _too_long(self, lengths: list[int], sources: list[str]) -> list[int]:
        """Indices of rows over max_length: an error, or (with skip_long_rows) logged and counted."""
        if self.max_length is None:
            return []
        over = [i for i, n in enumerate(lengths) if n > self.max_length]
        for i in over:
            message = (
                f"{sources[i]}: {too_long(lengths[i], self.max_length)}; raise --max_length, or pass "
                "--skip_long_rows to drop such rows"
            )
            if not self.skip_long_rows:
                raise RowError(message)
            self.skipped_rows += 1
            logger.warning("skipped (%d so far): %s", self.skipped_rows, message)
        if over and len(over) == len(lengths):
            raise RowError(f"every row of a batch is longer than --max_length {self.max_length}: {', '.join(sources)}")
        return over


def too_long(length: int, max_length: int) -> str:
    """``N tokens > --max_length M``: how every over-long row is reported."""
    return f"{length} tokens > --max_length {max_length} (image tokens included)"


class VLSFTDataCollatorWithPadding(_VLCollatorBase):
    """Rows ``{"messages", "images", "source"}`` -> input_ids, attention_mask, labels and image inputs."""

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch, features = self._collate_fitting(features)
        if not (batch["labels"] != IGNORE_INDEX).any():
            sources = [f["source"] for f in features]
            raise RowError(f"no supervised tokens in batch {sources}: do the rows have assistant turns?")
        return self.pad(dict(batch))

    def _collate(self, features: list[dict[str, Any]]) -> tuple[BatchFeature, list[int]]:
        images = [self.load_images(f["images"], f["source"]) for f in features]
        videos = [self.load_videos(f) for f in features]
        sources = [f["source"] for f in features]
        batch = self.processor.process_batch_conv(
            [f["messages"] for f in features], images, sources=sources, videos=videos if any(videos) else None
        )
        return batch, batch["attention_mask"].sum(dim=1).tolist()


class VLDPODataCollatorWithPadding(_VLCollatorBase):
    """Preference rows -> one batch of chosen rows then rejected rows (TRL's layout).

    ``completion_mask`` marks the chosen/rejected answer tokens. The image inputs are those of the
    prompts once (not repeated for rejected): the trainer encodes them once and reuses the result
    for chosen, rejected and the reference pass. A pair's length is its longer row's.
    """

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        output, features = self.pair_batch(features)
        for key in ("ref_chosen_logps", "ref_rejected_logps"):  # precomputed reference log-probs, if any
            if key in features[0]:
                output[key] = torch.tensor([f[key] for f in features])
        return output

    def pair_batch(self, features: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The padded chosen-then-rejected batch and the rows it holds (over-long ones dropped with
        ``skip_long_rows``); shared with the reward collator."""
        batch, features = self._collate_fitting(features)
        sources = [f["source"] for f in features]
        batch = self.pad(dict(batch))
        completion_mask = (batch.pop("labels") != IGNORE_INDEX).long()
        for i in range(completion_mask.shape[0]):
            if not completion_mask[i].any():
                raise RowError(f"{sources[i % len(sources)]}: empty chosen or rejected answer after tokenization")
        output = dict(batch)
        output.update(self.processor.first_half_images(batch))
        output["completion_mask"] = completion_mask
        return output, features

    def _collate(self, features: list[dict[str, Any]]) -> tuple[BatchFeature, list[int]]:
        images = [self.load_images(f["images"], f["source"]) for f in features]
        chosen = [f["prompt"] + f["chosen"] for f in features]
        rejected = [f["prompt"] + f["rejected"] for f in features]
        first = [len(f["prompt"]) for f in features] * 2
        sources = [f"{f['source']}: {half}" for half in ("chosen", "rejected") for f in features]
        videos = [self.load_videos(f) for f in features]
        batch = self.processor.process_batch_conv(
            chosen + rejected, images + images, first, sources, videos=videos + videos if any(videos) else None
        )
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        half = len(features)
        return batch, [max(lengths[i], lengths[i + half]) for i in range(half)]


class VLPromptCollator(_VLCollatorBase):
    """Prompt rows ``{"prompt", "images", "source"}`` -> what generation needs: the rows, their rendered prompts
    (with the generation prompt), their images and the processor's batch in inference mode (left padding).

    This is the PPO collator (``core_mapper.ppo_collator``) and the first half of
    :func:`resonance.generation.generate_batch`. The processor is switched to inference mode for the call and
    back to the caller's mode afterwards. ``max_length`` and ``skip_long_rows`` are not used: a prompt's
    length is bounded by generation, not truncated.
    """

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        if not features:
            raise ValueError("VLPromptCollator: no rows")
        processor = self.processor
        prompts = [processor.render_conversation(f["prompt"], add_generation_prompt=True) for f in features]
        images = [self.load_images(f.get("images") or [], f.get("source", "<row>")) for f in features]
        previous = processor.padding_side
        processor.infer()
        try:
            inputs = processor(text=prompts, images=images)
        finally:  # back to the caller's mode (PPO scores with the training layout between generations)
            processor.padding_side = processor.tokenizer.padding_side = previous
        return {"rows": list(features), "prompts": prompts, "images": images, "inputs": inputs}
