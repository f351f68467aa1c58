"""PPO's flags: TrainingArguments plus the PPO settings; the only place they are defined."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from trl.trainer.base_config import _BaseConfig as TrlDefaults

from resonance.algorithms.arguments import router_aux_loss_coef_field
from resonance.errors import ConfigError
from resonance.generation import check_cache_implementation, check_rollout_adapters, rollout_adapters_field
from resonance.reward_funcs import check_reward_timeout, reward_funcs_field, reward_timeout_field

# TrainingArguments flags PPO's own loop does not read, and what it does instead: given, they are refused by name
# rather than silently ignored (transformers' Trainer honours them for sft, dpo, rm and grpo).
NOT_IN_PPO: dict[str, str] = {
    "optim": "its loop steps torch.optim.AdamW (--adam_beta1, --adam_beta2, --adam_epsilon, --weight_decay apply)",
    "optim_args": "its loop steps torch.optim.AdamW",
    "deepspeed": "it runs on accelerate's DDP (accelerate launch); DeepSpeed is not wired into its loop",
    "fsdp": "it runs on accelerate's DDP (accelerate launch); FSDP is not wired into its loop",
    "torch_compile": "its loop does not compile the model",
    "neftune_noise_alpha": "its loop adds no embedding noise",
    "label_smoothing_factor": "its losses are PPO's clipped policy and value losses",
    "load_best_model_at_end": "it saves the last policy (checkpoints keep the earlier ones)",
    "eval_on_start": "it evaluates on --eval_strategy steps only",
    "train_sampling_strategy": "its rollouts sample prompts from shuffled passes over the data",
    "auto_find_batch_size": "its batch is --per_device_train_batch_size",
    "use_liger_kernel": "its loop runs the model's own layers",
    "save_only_model": "its checkpoints always hold the optimizer, scheduler and random states, for resuming",
}
ACCEPTED_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused")  # what torch.optim.AdamW is


def not_honoured(values: Mapping[str, Any]) -> list[str]:
    """``--flag value: ...`` for every flag of :data:`NOT_IN_PPO` in ``values`` (a config's fields, before
    ``TrainingArguments.__post_init__`` normalises them) set away from its default."""
    problems = []
    for option in fields(VLPPOConfig):
        value = values.get(option.name)
        shown = str(getattr(value, "value", value))
        if option.name not in NOT_IN_PPO or value in (option.default, None, "", [], False):
            continue
        if option.name == "optim" and shown in ACCEPTED_OPTIMIZERS:
            continue
        problems.append(f"--{option.name} {shown}: not taken by resonance train ppo: {NOT_IN_PPO[option.name]}")
    return problems


def accelerate_trackers() -> list[str]:
    """The tracker names accelerate knows (``Accelerator(log_with=...)``), installed or not."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    return list(LOGGER_TYPE_TO_CLASS)


@dataclass
class VLPPOConfig(TrlDefaults):
    """``TrainingArguments`` with TRL's defaults (bf16 unless --fp16, logging every 10 steps; learning rate 1e-6 as
    TRL's online configs, GRPOConfig and RLOOConfig) plus PPO's settings (names as in TRL's former PPOConfig where
    it had them). Gradient checkpointing stays off by default, unlike TRL's: rollouts are sampled from the
    training model, and checkpointing turns generation's KV cache off while it is in train mode."""

    learning_rate: float = field(
        default=1e-6, metadata={"help": "The initial learning rate for AdamW (as TRL's GRPOConfig and RLOOConfig)."}
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in the backward pass (slower rollouts: no KV cache)."}
    )

    reward_funcs: str | None = reward_funcs_field(" Give this, --reward_model_path, or both.")
    router_aux_loss_coef: float | None = router_aux_loss_coef_field()
    reward_timeout: float = reward_timeout_field()
    reward_model_path: str | None = field(
        default=None,
        metadata={"help": "A reward model folder written by `resonance train rm` (full or LoRA)."},
    )
    response_length: int = field(default=64, metadata={"help": "Most new tokens per response."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of the rollouts."})
    num_ppo_epochs: int = field(default=4, metadata={"help": "Passes over each rollout."})
    num_mini_batches: int = field(
        default=1, metadata={"help": "Optimizer steps per pass; each takes gradient_accumulation_steps micro-batches."}
    )
    kl_coef: float = field(
        default=0.05,
        metadata={
            "help": "Weight of the per-token KL penalty to the reference. 0: no penalty and no reference (no "
            "reference pass; in full training no frozen copy is loaded)."
        },
    )
    kl_estimator: str = field(default="k1", metadata={"help": "KL estimator: k1, k2 or k3 (Schulman)."})
    gamma: float = field(default=1.0, metadata={"help": "Discount factor."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
    cliprange: float = field(default=0.2, metadata={"help": "Policy ratio clip range."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Value clip range."})
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss."})
    whiten_rewards: bool = field(default=False, metadata={"help": "Whiten the per-token rewards (keeping their mean)."})
    missing_eos_penalty: float | None = field(
        default=None, metadata={"help": "Subtracted from the score of a response that does not end with EOS."}
    )
    disable_dropout: bool = field(default=True, metadata={"help": "Set every dropout of the policy to 0."})
    cache_implementation: str = field(
        default="auto",
        metadata={
            "help": "The rollouts' KV cache: auto (static, with transformers' compiled decode step, on a GPU for "
            "families that compile whole; dynamic elsewhere), static, dynamic, or another transformers "
            "cache_implementation."
        },
    )
    rollout_adapters: str = rollout_adapters_field()
    generation_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Rollout rows per generate call (default: all of a step's rows on this process, "
            "per_device_train_batch_size x gradient_accumulation_steps x num_mini_batches, in one call). Decoding "
            "takes about as long for 16 rows as for 8, so fewer, larger calls are faster; a smaller value holds "
            "less KV cache. Scoring and updates still go per micro-batch."
        },
    )
    ds3_gather_for_generation: bool = field(
        default=True,
        metadata={
            "help": "DeepSpeed ZeRO-3: gather the whole policy on each process for the rollouts (fast), instead of "
            "each layer's weights as generation reaches it, at every new token (for a model no single GPU holds); "
            "as TRL's GRPOConfig."
        },
    )

    @staticmethod
    def flag_problems(values: Mapping[str, Any]) -> list[str]:
        """Flags this config accepts but PPO does not honour (``resonance train`` reports them with the rest)."""
        return not_honoured(values)

    def __post_init__(self) -> None:
        not_read = not_honoured(vars(self))
        if not_read:  # the config made in code, not through resonance train
            raise ConfigError("resonance train ppo does not take:\n  " + "\n  ".join(not_read))
        super().__post_init__()
        positive = {
            "response_length": self.response_length,
            "num_ppo_epochs": self.num_ppo_epochs,
            "num_mini_batches": self.num_mini_batches,
        }
        if self.generation_batch_size is not None:
            positive["generation_batch_size"] = self.generation_batch_size
        for name, value in positive.items():
            if value < 1:
                raise ConfigError(f"--{name} must be at least 1, got {value}")
        size, micro = self.generation_batch_size, self.per_device_train_batch_size
        if size is not None and size % micro:
            raise ConfigError(
                f"--generation_batch_size {size}: must be a multiple of --per_device_train_batch_size {micro} (each "
                "micro-batch is scored from one generate call)"
            )
        if self.temperature <= 0:
            raise ConfigError(f"--temperature must be > 0, got {self.temperature}")
        check_reward_timeout(self.reward_timeout)
        check_cache_implementation(self.cache_implementation)
        check_rollout_adapters(self.rollout_adapters)
        if self.kl_estimator not in ("k1", "k2", "k3"):
            raise ConfigError(f"--kl_estimator must be k1, k2 or k3, got {self.kl_estimator!r}")
        unsupported = [name for name in self.report_to if name not in accelerate_trackers()]
        if unsupported:
            raise ConfigError(
                f"--report_to {','.join(unsupported)}: resonance train ppo logs through accelerate's trackers: "
                + ", ".join(accelerate_trackers())
            )
        if not (self.reward_funcs or self.reward_model_path):
            raise ConfigError(
                "PPO needs a reward: --reward_funcs module:function, --reward_model_path FOLDER (from "
                "`resonance train rm`), or both"
            )
