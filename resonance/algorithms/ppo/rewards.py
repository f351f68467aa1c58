"""PPO's rewards: Python reward functions (``--reward_funcs``) and reward models (``--reward_model_path``)."""

from __future__ import annotations

import contextlib
import logging
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from resonance.base.registry import load_core_mapper, lora_base_checkpoint, processor_checkpoint
from resonance.base.reward import VLRewardModel
from resonance.errors import CheckpointError, ConfigError
from resonance.generation import to_model_device
from resonance.reward_funcs import DEFAULT_REWARD_TIMEOUT, checked_values, conversational_message, ensure_checked

logger = logging.getLogger("resonance")


REWARD_ADAPTER = "reward"


def _assistant(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


class FunctionRewards:
    """The sum of checked reward functions (:func:`resonance.reward_funcs.load_reward_funcs`), called as GRPO calls
    them: conversational prompts and completions, the completion ids, the row's images and its other columns.
    Functions not checked yet are wrapped here, with ``timeout`` seconds per call."""

    def __init__(self, funcs: Sequence[Callable[..., list[float]]], timeout: float = DEFAULT_REWARD_TIMEOUT):
        self.funcs = ensure_checked(funcs, timeout)

    def __call__(self, rows: list[dict[str, Any]], texts: list[str], token_ids: list[list[int]], images: list[Any]):

        columns: dict[str, list[Any]] = defaultdict(list)
        for row in rows:
            for key, value in row.items():
                if key not in ("prompt", "images"):
                    columns[key].append(value)
        prompts = [[conversational_message(m) for m in row["prompt"]] for row in rows]
        completions = [[{"role": "assistant", "content": text}] for text in texts]
        total = torch.zeros(len(rows), dtype=torch.float32)
        for func in self.funcs:
            values = func(prompts=prompts, completions=completions, completion_ids=token_ids, images=images, **columns)
            total += torch.tensor(values, dtype=torch.float32)
        return total


class ModelRewards:
    """A reward model's score of each prompt + response, rendered as a training conversation by the reward
    model's own family (its SFT collator, right padding). ``adapter`` names the PEFT adapter to activate for
    the call when the reward model shares the policy's backbone. Its scores pass the checks function rewards pass
    (finite, within the bound), with ``name`` (its folder) in the message."""

    def __init__(self, reward_model: VLRewardModel, collator: Any, adapter: str | None = None, name: str = "?"):
        self.reward_model = reward_model
        self.collator = collator
        self.adapter = adapter
        self.name = name

    @contextlib.contextmanager
    def _active(self) -> Iterator[None]:
        if self.adapter is None:
            yield
            return
        peft_model = self.reward_model.model
        previous = peft_model.active_adapter
        peft_model.set_adapter(self.adapter, inference_mode=True)
        try:
            yield
        finally:  # the policy's adapter active and trainable again, the reward adapter frozen
            peft_model.set_adapter(previous)

    def __call__(self, rows: list[dict[str, Any]], texts: list[str], token_ids: list[list[int]], images: list[Any]):

        features = [
            {"messages": [*row["prompt"], _assistant(text)], "images": row.get("images") or [], "source": row["source"]}
            for row, text in zip(rows, texts, strict=True)
        ]
        batch = to_model_device(dict(self.collator(features)), self.reward_model.model)
        with torch.no_grad(), self._active():
            scores = self.reward_model(**batch)
        what = f"reward model {self.name} (--reward_model_path)"
        return torch.tensor(checked_values(scores.float().cpu(), what, [row["source"] for row in rows]))


def load_reward_model(
    path: str | Path, policy: nn.Module, policy_checkpoint: str | Path, dtype: torch.dtype, device: torch.device
) -> ModelRewards:
    """A :class:`ModelRewards` for a folder written by ``resonance train rm``.

    A LoRA reward model whose base checkpoint is the policy's, on a LoRA policy, becomes a second adapter
    (``"reward"``) on the policy's backbone with its head beside it; anything else loads as its own model.
    """
    path = Path(path)
    mapper = load_core_mapper(path)
    if mapper.reward_model is None:
        raise ConfigError(f"--reward_model_path {path}: its family has no reward model class")
    base = lora_base_checkpoint(path)
    shared = base is not None and hasattr(policy, "peft_config") and base.resolve() == Path(policy_checkpoint).resolve()
    if shared:
        description_file = path / mapper.reward_model.config_file
        if not description_file.is_file():
            raise CheckpointError(
                f"--reward_model_path {path}: no {description_file.name}; not a reward model saved by "
                "`resonance train rm`"
            )
        policy.load_adapter(str(path), adapter_name=REWARD_ADAPTER, is_trainable=False)
        policy.set_adapter(policy.active_adapter)  # loading does not switch; keep the policy's adapter trainable
        reward_model = mapper.reward_model(policy)
        reward_model.load_head(path)
        reward_model.score.to(device)
        logger.info("reward model %s: a second adapter on the policy's backbone", path)
    else:
        reward_model = mapper.reward_model.from_pretrained(path, dtype=dtype).to(device).eval().requires_grad_(False)
        logger.info("reward model %s: loaded as its own model", path)
    processor = mapper.processor(processor_checkpoint(path), trust_remote_code=mapper.model.trust_remote_code)
    processor.train()
    collator = mapper.sft_collator(processor, max_length=None)
    return ModelRewards(reward_model, collator, adapter=REWARD_ADAPTER if shared else None, name=str(path))
