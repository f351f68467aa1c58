"""PPO's trainer: the loop, scoring, the update, evaluation and checkpoints (see :mod:`resonance.algorithms.ppo`)."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType
from torch import nn
from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method
from transformers import GenerationMixin

from resonance.algorithms import ALGORITHMS
from resonance.algorithms.arguments import DataArguments, ModelArguments
from resonance.algorithms.batch_rows import rows_of
from resonance.algorithms.guards import check_finite
from resonance.algorithms.image_features import ImageEncodingMixin, add_to_loss, weights_sharded
from resonance.algorithms.ppo.checkpoint import PPOCheckpointing
from resonance.algorithms.ppo.config import VLPPOConfig
from resonance.algorithms.ppo.math import (
    clipped_policy_loss,
    clipped_value_loss,
    compute_gae,
    entropy_from_logits,
    kl_penalized_rewards,
    masked_mean,
)
from resonance.algorithms.ppo.rewards import FunctionRewards, ModelRewards, load_reward_model
from resonance.algorithms.ppo.rollout import PLAIN_SAMPLING, Rollout, extend_per_token_inputs, whiten_across
from resonance.algorithms.ppo.steps import Chunks, RolloutSteps, RowStream, step_loader
from resonance.algorithms.setup import apply_lora, load_data_and_model
from resonance.base.collator import VLPromptCollator
from resonance.base.model import VLModel, unwrap
from resonance.base.processor import VLProcessor
from resonance.base.registry import ModelCoreMapper
from resonance.base.reward import router_loss_coefficient
from resonance.base.value import VLModelWithValueHead
from resonance.errors import CheckpointError, ConfigError
from resonance.generation import Generation, RolloutEngine, TransformersEngine, generation_kwargs, to_model_device
from resonance.patches.compile_layers import CompileTimeLog
from resonance.reward_funcs import load_reward_funcs

logger = logging.getLogger("resonance")

TRACKER_RUN = "runs"  # the trackers' run name: tensorboard writes OUTPUT_DIR/runs, where the Trainer writes its own


def _disable_dropout(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


class VLPPOTrainer(PPOCheckpointing, ImageEncodingMixin):
    """PPO on accelerate for a :class:`~resonance.base.value.VLModelWithValueHead` (see the module docstring).

    ``ref_model`` is required when the policy is not a PEFT model (full training) and must be ``None`` with
    LoRA (the reference is the adapter disabled) and with ``kl_coef`` 0 (no reference is read). ``reward_funcs``
    are checked functions (:func:`resonance.reward_funcs.load_reward_funcs`); ``reward_model`` a
    :class:`ModelRewards`.
    """

    def __init__(
        self,
        model: VLModelWithValueHead,
        args: VLPPOConfig,
        train_dataset: Any,
        *,
        vl_model: type[VLModel],
        vl_processor: VLProcessor,
        reward_funcs: Sequence[Callable[..., list[float]]] | None = None,
        reward_model: ModelRewards | None = None,
        ref_model: nn.Module | None = None,
        eval_dataset: Any = None,
        data_collator: Any = None,
        processing_class: Any = None,
    ):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        if not isinstance(model, VLModelWithValueHead):
            raise TypeError(f"VLPPOTrainer trains a VLModelWithValueHead, got {type(model).__name__}")
        if args.kl_coef == 0 and ref_model is not None:
            raise ValueError("VLPPOTrainer: with kl_coef 0 nothing reads a reference; pass no ref_model")
        if args.kl_coef != 0 and model.is_lora == (ref_model is not None):
            raise ValueError(
                "VLPPOTrainer: with LoRA the reference is the policy with its adapters disabled (pass no ref_model); "
                "with full training pass a frozen copy as ref_model"
            )
        if not reward_funcs and reward_model is None:
            raise ConfigError("PPO needs a reward: --reward_funcs, --reward_model_path, or both")
        self._bind_adapter(vl_model, vl_processor)
        self.args = args
        self.router_aux_loss_coef = router_loss_coefficient(model.model, args.router_aux_loss_coef)
        set_seed(args.seed)
        mixed = "bf16" if args.bf16 else ("fp16" if args.fp16 else "no")
        # --report_to through accelerate's trackers; tensorboard's event files go under OUTPUT_DIR/runs, as the
        # Trainer writes them for the other algorithms
        self.accelerator = Accelerator(
            mixed_precision=mixed, cpu=args.use_cpu, log_with=args.report_to or None, project_dir=args.output_dir
        )
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.data_collator = data_collator or VLPromptCollator(vl_processor)
        self.processing_class = processing_class or vl_processor.hf
        self.rewards: list[Callable[..., torch.Tensor]] = []
        if reward_funcs:
            self.rewards.append(FunctionRewards(reward_funcs))
        if reward_model is not None:
            self.rewards.append(reward_model)
        if len(train_dataset) == 0:
            raise ValueError("PPO: the training data has no rows")

        vl_model.batch_vision_attention(model.model, ref_model)
        if args.disable_dropout:
            _disable_dropout(model)
        if args.gradient_checkpointing:
            model.gradient_checkpointing_enable(args.gradient_checkpointing_kwargs)
        self.ref_model = ref_model
        self.ref_scorer = None
        if ref_model is not None:  # its logits only; the unused value head is a few floats
            ref_model.requires_grad_(False).eval().to(self.accelerator.device)
            self.ref_scorer = VLModelWithValueHead(ref_model, vl_model=vl_model).to(self.accelerator.device)

        world = self.accelerator.num_processes
        self.micro_batch = args.per_device_train_batch_size
        self.micro_batches = args.gradient_accumulation_steps * args.num_mini_batches  # per rollout
        self.rollout_rows = self.micro_batch * self.micro_batches  # per process
        if args.max_steps > 0:
            self.total_steps = args.max_steps
        else:
            self.total_steps = max(
                1, math.ceil(args.num_train_epochs * len(train_dataset) / (self.rollout_rows * world))
            )
        optimizer_steps = self.total_steps * args.num_ppo_epochs * args.num_mini_batches
        parameters = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            parameters,
            lr=args.learning_rate,
            betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_epsilon,
            weight_decay=args.weight_decay,
        )
        from transformers import get_scheduler

        scheduler = get_scheduler(
            args.lr_scheduler_type,
            optimizer,
            num_warmup_steps=args.get_warmup_steps(optimizer_steps),
            num_training_steps=optimizer_steps,
            scheduler_specific_kwargs=args.lr_scheduler_kwargs or {},
        )
        # The scheduler is stepped here, once per optimizer step: accelerate's wrapper would step it once per
        # process in a multi-process run.
        deepspeed = self.accelerator.state.deepspeed_plugin
        if deepspeed is not None:  # no dataloader goes through prepare: DeepSpeed reads these from its config
            deepspeed.deepspeed_config["train_micro_batch_size_per_gpu"] = self.micro_batch
            deepspeed.deepspeed_config["gradient_clipping"] = args.max_grad_norm or 0.0  # 0: DeepSpeed does not clip
            zero = deepspeed.deepspeed_config.get("zero_optimization", {})
            if deepspeed.zero_stage == 3 and not zero.get("stage3_gather_16bit_weights_on_model_save"):
                raise ConfigError(
                    "resonance train ppo under DeepSpeed ZeRO-3 saves its policy gathered from every process: set "
                    "zero3_save_16bit_model: true in the accelerate config (stage3_gather_16bit_weights_on_model_save "
                    "in a DeepSpeed config file), as configs/accelerate/zero3.yaml does"
                )
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.lr_scheduler = scheduler
        self.policy: VLModelWithValueHead = self.accelerator.unwrap_model(self.model)
        if isinstance(self.model, FSDPModule):
            # FSDP gathers the weights the root keeps (embeddings, vision embeddings, projector, LM head) only around
            # the root's forward methods; rollouts call the PEFT model's generate: make it one of them
            self.policy.generate = self.policy.model.generate
            register_fsdp_forward_method(self.policy, "generate")
            self.policy.model.generate = self.policy.generate
        # Image/video placeholder tokens are never sampled (a response holding one cannot be scored), and the
        # log-probs are taken over the same action space (VLModelWithValueHead's suppress_tokens).
        self.suppressed_tokens = vl_processor.placeholder_token_ids()
        overrides = {
            **PLAIN_SAMPLING,
            "temperature": args.temperature,
            "max_new_tokens": args.response_length,
            "suppress_tokens": self.suppressed_tokens,
            "cache_implementation": args.cache_implementation,
        }
        self.engine: RolloutEngine = TransformersEngine(args.rollout_adapters)

        self.generation_kwargs = generation_kwargs(vl_model, unwrap(self.policy.model), overrides)
        if self.accelerator.num_processes > 1 and self.accelerator.distributed_type == DistributedType.FSDP:
            # a process whose responses end first keeps running forward passes while the others generate, so it
            # keeps joining their gathers (transformers 5.24 turns this on by itself for modules under FSDP or
            # ZeRO-3; said here so that it holds whatever generate is called on)
            self.generation_kwargs["synced_gpus"] = True
        # what step sampled (generate's batch and answers) and where generate_and_score's next rows begin in it
        self.sampled: tuple[tuple[dict[str, Any], Generation], int] | None = None
        if args.generation_batch_size is not None and not self._samples_by_step():
            raise ConfigError(
                "--generation_batch_size: the project's PPOTrainerHooks.generate_and_score samples each micro-batch "
                "itself; leave the flag out"
            )
        self._said: set[str] = set()  # reasons a step's batch did not split by row, logged once each
        seed = args.data_seed if args.data_seed is not None else args.seed
        self.row_stream = RowStream(len(train_dataset), self.rollout_rows, world, self.accelerator.process_index, seed)
        self.global_step = 0
        self.log_history: list[dict[str, float]] = []
        self.counters = {"empty_generations": 0, "skipped_updates": 0}

    # -- data ----------------------------------------------------------------------------------------

    def _rollout_steps(self, first: int, last: int) -> RolloutSteps:
        """Steps ``first`` up to ``last``'s rows, in the chunks each step samples at once (``--generation_batch_size``
        rows, a multiple of the micro-batch, VLPPOConfig; all its rows by default), collated; uncollated micro-batches
        where a project's own ``generate_and_score`` samples them."""
        if self._samples_by_step():
            chunk = self.args.generation_batch_size or self.rollout_rows
        else:
            chunk = self.micro_batch
        collator = self.data_collator if chunk > self.micro_batch else None
        return RolloutSteps(self.train_dataset, self.row_stream, chunk, collator, first, last)

    # -- rollouts ------------------------------------------------------------------------------------

    def _score(self, model: VLModelWithValueHead, rollout_inputs: dict[str, Any], response_length: int, **kw: Any):
        return model(
            rollout_inputs["input_ids"],
            rollout_inputs["attention_mask"],
            response_length=response_length,
            temperature=self.args.temperature,
            suppress_tokens=self.suppressed_tokens,
            **{k: v for k, v in rollout_inputs.items() if k not in ("input_ids", "attention_mask")},
            **kw,
        )

    def _reference_log_probs(
        self,
        rollout_inputs: dict[str, Any],
        raw_inputs: dict[str, Any],
        per_token: dict[str, Any],
        response_length: int,
    ) -> torch.Tensor:
        """The reference's log-probs of the responses: under LoRA the policy with its adapters disabled (the
        tower carries none, so the policy's encoded images serve), else the frozen copy on its own image pass."""
        if self.ref_model is None:
            with self.policy.model.disable_adapter():
                return self._score(self.policy, rollout_inputs, response_length, return_logits=False).log_probs
        encoded = self._image_model_inputs(self.ref_model, dict(raw_inputs), copies=1)
        ref_inputs = {**encoded, **per_token}
        ref_inputs.update(input_ids=rollout_inputs["input_ids"], attention_mask=rollout_inputs["attention_mask"])
        return self._score(self.ref_scorer, ref_inputs, response_length, return_logits=False).log_probs

    @contextlib.contextmanager
    def _whole_weights_for_generation(self) -> Any:
        """Under DeepSpeed ZeRO-3 with ``ds3_gather_for_generation``, every weight gathered on each process for the
        rollouts, DeepSpeed's per-layer gathering switched off meanwhile (as TRL's trainers generate): generation
        then runs no collective per token (on one H200 a ZeRO-3 PPO step took 75 s, against 12 s under FSDP)."""
        zero3 = self.accelerator.distributed_type == DistributedType.DEEPSPEED and weights_sharded(self.accelerator)
        if not (zero3 and self.args.ds3_gather_for_generation):
            yield
            return
        import deepspeed
        from trl.models.utils import add_hooks, remove_hooks

        with deepspeed.zero.GatheredParameters(self.model.parameters()):
            remove_hooks(self.model)
            try:
                yield
            finally:
                add_hooks(self.model)

    def _samples_by_step(self) -> bool:
        """Whether :meth:`step` samples its rows in calls of ``--generation_batch_size`` for :meth:`generate_and_score`
        to score: not where a project's hooks (``PPOTrainerHooks``) replace that method."""
        return type(self).generate_and_score is VLPPOTrainer.generate_and_score

    @torch.no_grad()
    def generate(
        self, rows: list[dict[str, Any]], batch: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], Generation]:
        """The collated ``rows`` (``batch``, or collated here) and a response sampled for each, in one engine call.
        Where the images' features serve generation and scoring alike (:meth:`_encoded_for_rollout`), the images
        are encoded before the call, the engine gets the features in place of the pixels, and the batch's
        ``model_inputs`` hold them for scoring; elsewhere ``model_inputs`` is None and generation encodes the images
        itself."""
        batch = self.data_collator(rows) if batch is None else batch
        with (
            self._whole_weights_for_generation(),
            self._idle_encoder(self.model, batch["inputs"], self.policy.model, generation=True),  # no images too
        ):
            batch["model_inputs"] = self._encoded_for_rollout(batch["inputs"])
            sent = batch
            if batch["model_inputs"] is not None:  # generate takes an input's presence for a value: no Nones
                sent = {**batch, "inputs": {k: v for k, v in batch["model_inputs"].items() if v is not None}}
            return batch, self.engine.generate(self.policy.model, self.vl_processor, sent, self.generation_kwargs)

    def _encoded_for_rollout(self, inputs: dict[str, Any]) -> dict[str, Any] | None:
        """``inputs`` (moved to the model's device) with the images encoded once for the whole rollout, where the
        features serve every pass over it: the frozen tower's (:meth:`_image_model_inputs` gives transformers'
        ``mm_encoder_outputs``), the reference the policy without its adapters (a frozen copy encodes the images
        with its own tower), and transformers' own ``generate``, which then skips its encoding. None elsewhere."""
        if self.ref_model is not None or type(unwrap(self.policy.model)).generate is not GenerationMixin.generate:
            return None
        inputs = to_model_device(inputs, self.policy.model)
        raw = {k: v for k, v in inputs.items() if k != "labels"}  # PaliGemma's processor adds labels
        encoded = self._image_model_inputs(self.policy.model, raw, copies=1)
        return encoded if "mm_encoder_outputs" in encoded else None

    def _rows_inputs(self, batch: dict[str, Any], part: range, rows: list[dict[str, Any]]) -> tuple[dict, bool]:
        """The inputs of the rows ``part`` of a sampled ``batch`` as their own batch, on the model's device, and
        whether their images are encoded already: taken from the batch (:func:`rows_of`; its encoded features too),
        or where its inputs cannot be split by row, ``rows`` collated again."""
        encoded = batch.get("model_inputs")
        inputs = encoded if encoded is not None else to_model_device(batch["inputs"], self.policy.model)
        if len(part) == len(batch["rows"]):
            return inputs, encoded is not None
        try:
            return rows_of(inputs, part, [[len(images) for images in batch["images"]]]), encoded is not None
        except NotImplementedError as reason:
            if str(reason) not in self._said:
                self._said.add(str(reason))
                logger.info("PPO: each micro-batch is collated again for scoring (%s)", reason)
            return to_model_device(self.data_collator(rows)["inputs"], self.policy.model), False

    @torch.no_grad()
    def generate_and_score(self, rows: list[dict[str, Any]]) -> tuple[Rollout, dict[str, float]]:
        """Score a response for each of ``rows`` (one micro-batch): a :class:`Rollout` without rewards and advantages
        yet, and the micro-batch's counts. The responses are generated here, or taken from ``self.sampled``: a
        generation these rows are part of, from their first row's index on (:meth:`step` samples a whole step's rows
        at once), each response cut to the micro-batch's longest and set after the micro-batch's own left-padded
        prompts, as generating the micro-batch alone would give them. Its inputs, and the images' features where
        generation had them, come from the generation's batch (:meth:`_rows_inputs`)."""
        sampled, self.sampled = self.sampled, None
        (batch, generation), first = (self.generate(rows), 0) if sampled is None else sampled
        part = range(first, first + len(rows))
        token_ids, texts = generation.token_ids[part.start : part.stop], generation.texts[part.start : part.stop]
        images = batch["images"][part.start : part.stop]
        inputs, encoded_already = self._rows_inputs(batch, part, rows)
        start = batch["inputs"]["input_ids"].shape[1]
        responses = generation.sequences[part.start : part.stop, start : start + max(map(len, token_ids))]
        sequences = torch.cat([inputs["input_ids"], responses], dim=1)
        prompt_length = inputs["input_ids"].shape[1]
        response_length = sequences.shape[1] - prompt_length
        device = sequences.device
        lengths = torch.tensor([len(ids) for ids in token_ids], device=device)
        eos = set(self._eos_ids())
        ended = torch.tensor([bool(ids) and ids[-1] in eos for ids in token_ids], device=device)
        empty = torch.tensor([self._is_empty(ids) for ids in token_ids], device=device)
        positions = torch.arange(response_length, device=device)
        generated = positions[None, :] < lengths[:, None]  # through the first EOS; generate's padding after it
        mask = generated & ~empty[:, None]
        attention_mask = torch.cat([inputs["attention_mask"], generated], dim=1)
        attention_mask = attention_mask.to(inputs["attention_mask"].dtype)

        image_names = set(self.vl_processor.image_input_names())
        per_token = extend_per_token_inputs(inputs, response_length, image_names, self.vl_processor.prefix_lm)
        raw = {k: v for k, v in inputs.items() if k != "labels"}  # PaliGemma's processor adds labels
        encoded = raw if encoded_already else self._image_model_inputs(self.policy.model, dict(raw), copies=1)
        model_inputs = {k: v for k, v in encoded.items() if k not in ("input_ids", "attention_mask")}
        model_inputs.update(per_token)
        rollout_inputs = {"input_ids": sequences, "attention_mask": attention_mask, **model_inputs}
        out = self._score(self.policy, rollout_inputs, response_length, return_logits=False)
        ref_logprobs = None
        if self.args.kl_coef != 0:
            ref_logprobs = self._reference_log_probs(rollout_inputs, raw, per_token, response_length)

        keep = [i for i in range(len(rows)) if not empty[i]]
        scores = torch.zeros(len(rows), dtype=torch.float32)
        if keep:
            kept_rows = [rows[i] for i in keep]
            kept_texts = [texts[i] for i in keep]
            kept_ids = [token_ids[i] for i in keep]
            kept_images = [images[i] for i in keep]
            total = torch.zeros(len(keep), dtype=torch.float32)
            for reward in self.rewards:
                total += reward(kept_rows, kept_texts, kept_ids, kept_images)
            scores[keep] = total
        scores = scores.to(device)
        if self.args.missing_eos_penalty is not None:
            scores = scores - self.args.missing_eos_penalty * (~ended).float()
        rollout = Rollout(
            sequences=sequences,
            attention_mask=attention_mask,
            model_inputs=model_inputs,
            mask=mask,
            logprobs=out.log_probs,
            values=out.values,
            ref_logprobs=ref_logprobs,
            scores=scores,
        )
        counts = {
            "empty": float(empty.sum()),
            "no_eos": float((~ended & ~empty).sum()),
            "rows": float(len(rows)),
            "length": float(lengths[~empty].float().sum()),
        }
        for i in torch.nonzero(empty).flatten().tolist():
            logger.warning("empty generation for %s: not scored, not trained on", rows[i]["source"])
        return rollout, counts

    def _is_empty(self, token_ids: list[int]) -> bool:
        """No token before the end-of-sequence token (a response that decodes to white space is not empty)."""
        return len(token_ids) == 0 or (len(token_ids) == 1 and token_ids[0] in self._eos_ids())

    def _eos_ids(self) -> list[int]:
        eos = self.generation_kwargs.get("eos_token_id")
        if eos is None:
            return []
        return [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]

    # -- advantages ----------------------------------------------------------------------------------

    def compute_advantages(self, rollouts: list[Rollout]) -> None:
        """KL-penalised per-token rewards, optional reward whitening, GAE, and advantage whitening over the whole
        rollout (every micro-batch together), stored on each :class:`Rollout`."""
        args = self.args
        for r in rollouts:
            r.rewards, r.kl = kl_penalized_rewards(
                r.scores, r.logprobs, r.ref_logprobs, r.mask, args.kl_coef, args.kl_estimator
            )
        # Several processes whiten over the rollout of all of them, as one process would with their rows.
        reduce = None
        if self.accelerator.num_processes > 1:
            reduce = functools.partial(self.accelerator.reduce, reduction="sum")
        if args.whiten_rewards:
            whitened = whiten_across(
                [r.rewards for r in rollouts], [r.mask for r in rollouts], shift_mean=False, reduce=reduce
            )
            for r, rewards in zip(rollouts, whitened, strict=True):
                r.rewards = rewards
        for r in rollouts:
            r.advantages, r.returns = compute_gae(r.rewards, r.values, r.mask, args.gamma, args.lam)
        whitened = whiten_across(
            [r.advantages for r in rollouts], [r.mask for r in rollouts], shift_mean=True, reduce=reduce
        )
        for r, advantages in zip(rollouts, whitened, strict=True):
            r.advantages = advantages

    # -- update --------------------------------------------------------------------------------------

    def _loss(self, r: Rollout) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        inputs = {"input_ids": r.sequences, "attention_mask": r.attention_mask, **r.model_inputs}
        with self._idle_encoder(self.model, inputs, self.policy.model) as idle:
            router_loss = self.router_aux_loss_coef != 0.0
            out = self._score(self.model, inputs, r.response_length, return_logits=True, router_loss=router_loss)
        policy_loss, policy_metrics = clipped_policy_loss(
            out.log_probs, r.logprobs, r.advantages, r.mask, self.args.cliprange
        )
        value_loss, value_metrics = clipped_value_loss(
            out.values, r.values, r.returns, r.mask, self.args.cliprange_value
        )
        with torch.no_grad():
            entropy = masked_mean(entropy_from_logits(out.logits), r.mask)
        metrics = {
            **policy_metrics,
            **value_metrics,
            "policy_loss": policy_loss.detach(),
            "value_loss": value_loss.detach(),
            "entropy": entropy,
        }
        loss = policy_loss + self.args.vf_coef * value_loss
        if out.router_loss is not None:  # added as TRL's trainers add it
            loss = loss + self.router_aux_loss_coef * out.router_loss.to(loss.device)
            metrics["aux_loss"] = out.router_loss.detach()
        return add_to_loss(loss, idle.term), metrics

    def update(self, rollouts: list[Rollout], generator: torch.Generator) -> dict[str, float]:
        """``num_ppo_epochs`` passes over the rollout's micro-batches in shuffled minibatches of
        ``gradient_accumulation_steps`` micro-batches; one optimizer step per minibatch."""
        args, accelerator = self.args, self.accelerator
        sums: dict[str, float] = defaultdict(float)
        count = 0
        accumulation = args.gradient_accumulation_steps
        self.model.train()
        for _ in range(args.num_ppo_epochs):
            order = torch.randperm(len(rollouts), generator=generator).tolist()
            for start in range(0, len(order), accumulation):
                minibatch = [rollouts[i] for i in order[start : start + accumulation]]
                for index, rollout in enumerate(minibatch):
                    last = index == len(minibatch) - 1
                    sync = contextlib.nullcontext() if last else accelerator.no_sync(self.model)
                    if accelerator.distributed_type == DistributedType.DEEPSPEED:
                        # DeepSpeed steps inside backward when the gradients sync: only the minibatch's last
                        accelerator.sync_gradients = last
                    with sync:
                        loss, metrics = self._loss(rollout)
                        accelerator.backward(loss / len(minibatch))
                    for name, value in metrics.items():
                        sums[name] += float(value)
                    count += 1
                if args.max_grad_norm is not None and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(self.model.parameters(), args.max_grad_norm)
                self.optimizer.step()
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
        return {name: total / count for name, total in sums.items()}

    # -- one step ------------------------------------------------------------------------------------

    def step(self, chunks: Chunks | None = None) -> dict[str, float]:
        """Rollout ``global_step``, its update, and the step's metrics. ``chunks``: the step's rows, as
        :meth:`train`'s loader reads them ahead (:class:`RolloutSteps`); None reads and collates them here."""
        if chunks is None:
            chunks = self._rollout_steps(self.global_step, self.global_step + 1)[0]
        rollouts, totals = [], defaultdict(float)
        for rows, batch in chunks:
            sampled = None if batch is None else self.generate(rows, batch)
            for start in range(0, len(rows), self.micro_batch):
                part = rows[start : start + self.micro_batch]
                self.sampled = None if sampled is None else (sampled, start)
                rollout, counts = self.generate_and_score(part)
                rollouts.append(rollout)
                for name, value in counts.items():
                    totals[name] += value
        self.counters["empty_generations"] += int(totals["empty"])
        used = [r for r in rollouts if r.mask.any()]
        scored = torch.cat([r.scores[r.mask.any(dim=1)] for r in used]) if used else torch.zeros(0)
        metrics = {
            "reward": float(scored.mean()) if scored.numel() else float("nan"),
            "reward_std": float(scored.std()) if scored.numel() > 1 else 0.0,
            "response_length": totals["length"] / max(totals["rows"] - totals["empty"], 1),
            "empty_generations": totals["empty"],
            "no_eos": totals["no_eos"],
        }
        if not used:
            self.counters["skipped_updates"] += 1
            logger.warning(
                "step %d: every response is empty; update skipped (%d skipped so far)",
                self.global_step + 1,
                self.counters["skipped_updates"],
            )
            metrics["skipped_updates"] = float(self.counters["skipped_updates"])
            return metrics
        self.compute_advantages(used)
        if self.args.kl_coef != 0:
            kl = torch.cat([r.kl.sum(dim=1)[r.mask.any(dim=1)] for r in used])
            metrics["kl"] = float(kl.mean())
        generator = torch.Generator().manual_seed(self.args.seed + self.global_step)
        metrics.update(self.update(used, generator))
        metrics["learning_rate"] = float(self.lr_scheduler.get_last_lr()[0])
        return metrics

    # -- evaluation ----------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Sample a response for every eval prompt (the rollout's settings) and score it: ``eval_reward`` (mean
        over non-empty responses), ``eval_response_length``, ``eval_empty_generations``."""

        if self.eval_dataset is None:
            raise ValueError("evaluate: no eval dataset (--eval_data_path)")
        scores, lengths, empty = [], [], 0
        size = self.args.per_device_eval_batch_size
        for start in range(0, len(self.eval_dataset), size):
            rows = [self.eval_dataset[i] for i in range(start, min(start + size, len(self.eval_dataset)))]
            batch = self.data_collator(rows)
            with self._idle_encoder(self.model, batch["inputs"], self.policy.model):
                generation = self.engine.generate(self.policy.model, self.vl_processor, batch, self.generation_kwargs)
            keep = [i for i, ids in enumerate(generation.token_ids) if not self._is_empty(ids)]
            empty += len(rows) - len(keep)
            if not keep:
                continue
            total = torch.zeros(len(keep))
            for reward in self.rewards:
                total += reward(
                    [rows[i] for i in keep],
                    [generation.texts[i] for i in keep],
                    [generation.token_ids[i] for i in keep],
                    [batch["images"][i] for i in keep],
                )
            scores.append(total)
            lengths += [len(generation.token_ids[i]) for i in keep]
        all_scores = torch.cat(scores) if scores else torch.zeros(0)
        return {
            "eval_reward": float(all_scores.mean()) if all_scores.numel() else float("nan"),
            "eval_response_length": sum(lengths) / max(len(lengths), 1),
            "eval_empty_generations": float(empty),
        }

    def _should_evaluate(self) -> bool:
        strategy = str(getattr(self.args.eval_strategy, "value", self.args.eval_strategy))
        if self.eval_dataset is None or strategy == "no":
            return False
        if strategy == "epoch":
            per_epoch = max(
                1, math.ceil(len(self.train_dataset) / (self.rollout_rows * self.accelerator.num_processes))
            )
            return self.global_step % per_epoch == 0
        return self.global_step % max(1, int(self.args.eval_steps or self.args.logging_steps)) == 0

    # -- training loop -------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None) -> None:
        """Run PPO steps up to ``max_steps`` (or ``num_train_epochs`` passes over the prompts), logging,
        evaluating and saving checkpoints as the ``TrainingArguments`` say; resume from a checkpoint folder
        (or ``True``: the last one in ``output_dir``)."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        checkpoint = self._checkpoint_path(resume_from_checkpoint)
        if checkpoint is not None:
            self._load_checkpoint(checkpoint)
        disable = self.args.disable_tqdm or not self.accelerator.is_local_main_process
        columns = (TextColumn("ppo"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        self.accelerator.init_trackers(TRACKER_RUN, config=self.args.to_sanitized_dict())
        started, first_step = time.perf_counter(), self.global_step
        compiling = CompileTimeLog()  # the compiled layers (--compile_layers) and the decode step
        ahead = iter(step_loader(self._rollout_steps(self.global_step, self.total_steps), self.args))
        with contextlib.closing(self), Progress(*columns, disable=disable, transient=False) as progress:
            task = progress.add_task("ppo", total=self.total_steps, completed=self.global_step)
            while self.global_step < self.total_steps:
                metrics = self.step(next(ahead))
                self.global_step += 1
                compiling.after_step(self.global_step)
                losses = {name: metrics[name] for name in ("policy_loss", "value_loss") if name in metrics}
                check_finite(self.global_step, self.policy.named_parameters(), losses)  # before it can be saved
                progress.update(task, completed=self.global_step)
                logging_steps = max(1, int(self.args.logging_steps))
                if self.global_step % logging_steps == 0 or self.global_step == self.total_steps:
                    self.log(metrics)
                if self._should_evaluate():
                    self.log(self.evaluate())
                strategy = str(getattr(self.args.save_strategy, "value", self.args.save_strategy))
                if strategy == "steps" and self.global_step % max(1, int(self.args.save_steps)) == 0:
                    self.save_checkpoint()
            runtime, steps = time.perf_counter() - started, self.global_step - first_step
            if self.accelerator.is_main_process:  # as the Trainer reports its loop for the other algorithms
                logger.info("train_runtime=%.3f s for %d steps", runtime, steps)

    def close(self) -> None:
        """Finish the --report_to trackers (their files flushed), also when training stops on an error; unlike
        ``Accelerator.end_training`` this leaves the process group for the final save."""
        if self.accelerator.is_main_process:
            for tracker in self.accelerator.trackers:
                tracker.finish()

    def log(self, metrics: dict[str, float]) -> None:
        entry = {"step": self.global_step, **{k: round(v, 6) for k, v in metrics.items()}}
        self.log_history.append(entry)
        self.accelerator.log(metrics, step=self.global_step)
        if self.accelerator.is_main_process:
            text = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
            logger.info("step %d/%d: %s", self.global_step, self.total_steps, text)

    # -- saving and resuming -------------------------------------------------------------------------


def build(
    mapper: ModelCoreMapper, model_args: ModelArguments, data_args: DataArguments, config: VLPPOConfig
) -> tuple[Any, VLProcessor]:
    """``resonance train ppo``: prompt rows, the policy with a value head, rewards from functions and/or a reward
    model, the reference as the adapter disabled (LoRA) or a frozen copy (full training)."""
    reward_funcs = load_reward_funcs(config.reward_funcs, config.reward_timeout) if config.reward_funcs else None
    if config.reward_model_path and not Path(config.reward_model_path).is_dir():
        raise CheckpointError(f"--reward_model_path {config.reward_model_path}: no such folder")
    train_rows, eval_rows, dtype, model, processor = load_data_and_model(
        mapper, model_args, data_args, config, ALGORITHMS["ppo"].data
    )
    policy = apply_lora(model, mapper.model, model_args)
    ref_model = None
    if policy is model and config.kl_coef != 0:  # full training: a frozen copy is the reference
        ref_model = mapper.model.from_pretrained(model_args.model_name_or_path, dtype=dtype)
    device = torch.device("cuda" if torch.cuda.is_available() and not config.use_cpu else "cpu")
    reward_model = None
    if config.reward_model_path:
        reward_model = load_reward_model(config.reward_model_path, policy, model_args.model_name_or_path, dtype, device)
    trainer = mapper.ppo_trainer(
        model=mapper.value_model(policy),
        args=config,
        train_dataset=train_rows,
        eval_dataset=eval_rows,
        vl_model=mapper.model,
        vl_processor=processor,
        reward_funcs=reward_funcs,
        reward_model=reward_model,
        ref_model=ref_model,
        data_collator=mapper.ppo_collator(processor),
        processing_class=processor.hf,
    )
    return trainer, processor
