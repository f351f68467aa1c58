"""PPO for vision-language models, on accelerate: rollouts, rewards, KL to the reference, GAE, clipped updates.

One PPO step (``state.global_step``) is one rollout and its update:

1. **Rollout.** ``per_device_train_batch_size * gradient_accumulation_steps * num_mini_batches`` prompt rows,
   in micro-batches of ``per_device_train_batch_size``. Each micro-batch goes through the family's prompt
   collator (``core_mapper.ppo_collator``: the processor in inference mode, left padding) and
   :func:`resonance.generation.generate_from`, the code path of ``resonance generate``, with the adapter's
   default generation kwargs and plain sampling at ``--temperature`` (no top-k/top-p/repetition penalty from the
   checkpoint's generation config: the log-probs must be those of the sampling distribution; image placeholder
   tokens are suppressed in both). A response ends
   at its first end-of-sequence token (included); what ``generate`` pads after it is masked.
2. **Scoring.** The prompt+response sequences are scored once without gradients: the policy's log-probs and
   values (:class:`~resonance.base.value.VLModelWithValueHead`) and the reference's log-probs (under LoRA the
   same model with its adapters disabled, else a frozen copy; with ``kl_coef`` 0 there is no reference, neither
   its pass nor a frozen copy). Per-token inputs are extended over the response:
   PaliGemma's prefix-LM ``token_type_ids`` with 1 (causal), Mllama's ``cross_attention_mask`` with the last
   prompt token's, others (Gemma 3 ``token_type_ids``, Qwen ``mm_token_type_ids``) with 0. With a frozen
   vision tower each image is encoded once per rollout and the features serve every later forward.
3. **Rewards.** One score per response, from Python reward functions (``--reward_funcs``, summed), a reward
   model folder (``--reward_model_path``; a LoRA reward model trained on the policy's own base checkpoint is
   loaded as a second adapter on the policy's backbone, no second model in memory), or both, summed. The
   per-token reward is ``-kl_coef * KL_t`` plus the score on the last response token
   (:func:`~resonance.algorithms.ppo.math.kl_penalized_rewards`); optional reward whitening, then GAE and advantage
   whitening over the whole rollout.
4. **Update.** ``num_ppo_epochs`` passes over the rollout in shuffled minibatches of
   ``gradient_accumulation_steps`` micro-batches, one optimizer step per minibatch, on the clipped policy loss
   plus ``vf_coef`` times the clipped value loss.

Empty generations (an end-of-sequence token first) are not scored and not trained on: they are counted
(``empty_generations`` in the logs, a warning), and a rollout with no usable response skips its update (counted
in ``skipped_updates``). A reward function that raises or returns a non-finite value stops training before any
weight moves (:class:`~resonance.reward_funcs.RewardFunctionError`).

Logged per step: ``reward`` (mean score), ``reward_std``, ``kl`` (mean per-response sum of the KL estimate; not
with ``kl_coef`` 0),
``entropy``, ``clip_fraction``, ``approx_kl``, ``policy_loss``, ``value_loss``, ``value_error``,
``value_clip_fraction``, ``response_length``, ``empty_generations``, ``no_eos``, ``learning_rate``; with an eval set,
``eval_reward``, ``eval_response_length`` and ``eval_empty_generations``.
"""

from resonance.algorithms.ppo.config import VLPPOConfig
from resonance.algorithms.ppo.trainer import VLPPOTrainer

__all__ = ["VLPPOConfig", "VLPPOTrainer"]
