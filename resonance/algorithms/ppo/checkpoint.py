"""PPO checkpoints: the output folder and ``checkpoint-N`` (policy, value head, processor, optimizer, scheduler and
random states), written to a temporary folder and renamed, and resuming from one to the same weights an
uninterrupted run reaches. Nothing is unpickled with arbitrary globals: the states load with ``weights_only=True``
and the allow-list transformers' Trainer uses for its own ``rng_state.pth`` (numpy's random state).

Under FSDP and DeepSpeed the optimizer state is sharded (FSDP: DTensors; DeepSpeed: each process's ZeRO partition),
which no one process can ``torch.save``: there every process writes the training state with accelerate's
``save_state`` into ``checkpoint-N/sharded_state`` (FSDP: model and optimizer gathered on rank 0, as the
config's state dict type says; DeepSpeed: the engine's checkpoint of every partition; each process's random
states), and resumes it with ``load_state``. Such a state resumes only under the strategy and process count that
wrote it (recorded in ``ppo_state.pt``); any other resume is a :class:`~resonance.errors.CheckpointError`."""

from __future__ import annotations

import json
import logging
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import DistributedType
from transformers.trainer_utils import rotate_checkpoints

from resonance.algorithms.guards import (
    STAGING,
    TRAINER_STATE,
    discard_staged,
    finish_output,
    publish_checkpoint,
    resolve_resume,
    save_failed,
)
from resonance.algorithms.image_features import weights_sharded
from resonance.algorithms.ppo.rewards import REWARD_ADAPTER
from resonance.errors import CheckpointError, TrainingError

logger = logging.getLogger("resonance")

CHECKPOINT_STATE = "ppo_state.pt"  # optimizer, scheduler and RNG states; sharded: the scheduler and the strategy
RNG_STATE = "rng_state_{}.pt"  # data parallel: process N's random states (N > 0; the main's: CHECKPOINT_STATE)
SHARDED_STATE = "sharded_state"  # accelerate's save_state under FSDP and DeepSpeed: model, optimizer, RNG states
SHARDING = (DistributedType.FSDP, DistributedType.DEEPSPEED)  # strategies whose optimizer state is sharded


class PPOCheckpointing:
    """Saving and resuming for :class:`~resonance.algorithms.ppo.trainer.VLPPOTrainer` (a mixin: it reads the
    trainer's policy, optimizer, scheduler, counters and log history)."""

    _gathered: dict[str, torch.Tensor] | None = None  # the policy's state gathered for the checkpoint being written

    def save_model(self, output_dir: str | Path | None = None) -> None:
        """The policy (full weights or LoRA adapter), its value head and the processor: a folder
        ``resonance generate`` and ``VLModelWithValueHead.from_pretrained`` load."""
        output_dir = Path(output_dir or self.args.output_dir)
        whole = self._whole_state_dict()  # every process takes part in gathering sharded weights
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            self.save_outputs(output_dir, whole)
            if self.args.push_to_hub:  # as transformers' Trainer.save_model does for the other algorithms
                finish_output(output_dir)  # the folder as the run leaves it, not as save_pretrained wrote it
                self.push_to_hub(output_dir)

    def push_to_hub(self, output_dir: Path) -> str:
        """Upload ``output_dir`` (not its checkpoints) to the Hub repository ``--hub_model_id`` (default: the
        folder's name), created where missing, as the Trainer does; returns the commit's URL. A failure is a
        :class:`TrainingError` that says the run is saved."""
        from huggingface_hub import HfApi

        repo_id = self.args.hub_model_id or output_dir.absolute().name
        api = HfApi(token=self.args.hub_token)
        try:
            repo = api.create_repo(repo_id, private=self.args.hub_private_repo, exist_ok=True)
            commit = api.upload_folder(
                repo_id=repo.repo_id,
                folder_path=output_dir,
                commit_message="End of training",
                revision=self.args.hub_revision,
                ignore_patterns=["checkpoint-*", f"{STAGING}*"],
            )
        except Exception as exc:  # the hub client's errors: offline, HTTP, network, token; none stops the save
            raise TrainingError(
                f"--push_to_hub: could not upload {output_dir} to the Hub as {repo_id} ({type(exc).__name__}: "
                f"{exc}); the run is saved there"
            ) from None
        logger.info("pushed %s to %s", output_dir, commit.commit_url)
        return commit.commit_url

    def save_outputs(self, output_dir: str | Path, whole: dict[str, torch.Tensor] | None = None) -> None:
        """:meth:`save_model` from this process alone (no wait for the others): where a failed save keeps the
        weights. ``whole``: the policy's gathered state where its live weights are shards."""
        output_dir = Path(output_dir)
        self._save_policy(output_dir, whole)
        (output_dir / TRAINER_STATE).write_text(json.dumps(self._state(), indent=2) + "\n")

    def _whole_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The policy's state gathered from every process where its live weights are shards (DeepSpeed ZeRO-3, whose
        live weights are empty placeholders even in one process, and FSDP); None where they are whole. Every
        process must call it."""
        return self.accelerator.get_state_dict(self.model) if weights_sharded(self.accelerator) else None

    def _save_policy(self, output_dir: Path, whole: dict[str, torch.Tensor] | None = None) -> None:
        save_kwargs = {}
        if self.policy.is_lora and REWARD_ADAPTER in self.policy.model.peft_config:
            # only the policy's adapter: the reward adapter was loaded from its own folder
            save_kwargs["selected_adapters"] = [self.policy.model.active_adapter]
        self.policy.save_pretrained(output_dir, state_dict=whole, **save_kwargs)
        self.vl_processor.hf.save_pretrained(str(output_dir))

    def _state(self) -> dict[str, Any]:
        return {
            "global_step": self.global_step,
            "max_steps": self.total_steps,
            "log_history": self.log_history,
            **self.counters,
        }

    def save_checkpoint(self) -> Path:
        """``output_dir/checkpoint-<step>``: the policy as :meth:`save_model` writes it, plus optimizer,
        scheduler and RNG states (sharded: :data:`SHARDED_STATE`, every process's part). Written under
        ``output_dir/.partial`` and renamed, so a crash leaves no half checkpoint; the oldest beyond
        ``save_total_limit`` are removed. A checkpoint that cannot be written stops the run with a
        :class:`~resonance.errors.TrainingError` after keeping the weights elsewhere. Every process must call it."""
        output_dir = Path(self.args.output_dir)
        final = output_dir / f"checkpoint-{self.global_step}"
        temporary = output_dir / STAGING / final.name
        whole = self._whole_state_dict()  # every process takes part in gathering sharded weights
        if self.accelerator.is_main_process:
            shutil.rmtree(temporary, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        what = f"step {self.global_step}: checkpoint {final}"
        try:
            if self._state_sharded():  # every process writes its part, and its random states
                self.accelerator.save_state(str(temporary / SHARDED_STATE))
            elif not self.accelerator.is_main_process:  # data parallel: each process its own random states
                temporary.mkdir(parents=True, exist_ok=True)
                torch.save({"rng": _rng_states()}, temporary / RNG_STATE.format(self.accelerator.process_index))
            if self.accelerator.is_main_process:
                self._gathered = whole
                self._write_checkpoint(temporary)
        except OSError as exc:
            if not self.accelerator.is_main_process:  # the main process keeps the weights, if it can
                raise TrainingError(f"{what}: could not be saved ({exc.strerror or exc})") from None
            discard_staged(temporary)
            raise save_failed(what, output_dir, exc, lambda kept: self.save_outputs(kept, whole)) from None
        finally:
            self._gathered = None
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            publish_checkpoint(temporary, final)
            rotate_checkpoints(str(output_dir), self.args.save_total_limit)  # transformers' rotation, by step
            logger.info("saved checkpoint %s", final)
        self.accelerator.wait_for_everyone()
        return final

    def _state_sharded(self) -> bool:
        """Whether this run's optimizer state is sharded (FSDP, DeepSpeed): saved and resumed by every process."""
        return self.accelerator.distributed_type in SHARDING

    def _strategy(self) -> dict[str, Any]:
        """How this run holds its training state: accelerate's distributed type, the process count, the ZeRO
        stage (DeepSpeed)."""
        deepspeed = self.accelerator.state.deepspeed_plugin
        return {
            "distributed_type": self.accelerator.distributed_type.value,
            "processes": self.accelerator.num_processes,
            "zero_stage": deepspeed.zero_stage if deepspeed is not None else None,
        }

    def _write_checkpoint(self, folder: Path) -> None:
        """The checkpoint's files from the main process (sharded: all but :data:`SHARDED_STATE`)."""
        self._save_policy(folder, self._gathered)
        state: dict[str, Any] = {"scheduler": self.lr_scheduler.state_dict(), "strategy": self._strategy()}
        if not self._state_sharded():
            state["optimizer"] = self.optimizer.state_dict()
            state["rng"] = _rng_states()
        torch.save(state, folder / CHECKPOINT_STATE)
        torch.save(self.args, folder / "training_args.bin")  # as transformers' Trainer writes it; never loaded
        (folder / TRAINER_STATE).write_text(json.dumps(self._state(), indent=2) + "\n")  # last: marks it complete

    def _checkpoint_path(self, resume: str | bool | None) -> Path | None:
        """The checkpoint to resume from (``True``: the last complete one in ``output_dir``), or None."""
        path = resolve_resume(resume, self.args.output_dir)
        if path is not None and not (path / CHECKPOINT_STATE).is_file():
            raise CheckpointError(f"{path / CHECKPOINT_STATE}: not found; not a PPO checkpoint saved by Resonance")
        return path

    def _load_checkpoint(self, path: Path) -> None:
        """Resume from ``path``: weights, optimizer, scheduler, random states, counters and log history. Every
        process must call it."""
        state = _load_state(path / CHECKPOINT_STATE)  # first: a file that does not load safely changes nothing
        self._check_strategy(path, state)
        if self._state_sharded():  # model, optimizer and this process's random states, as every process saved them
            self.accelerator.load_state(str(path / SHARDED_STATE))
        else:
            self._load_whole(path, state)
        self.lr_scheduler.load_state_dict(state["scheduler"])
        trainer_state = json.loads((path / TRAINER_STATE).read_text())
        self.global_step = trainer_state["global_step"]
        self.log_history = trainer_state["log_history"]
        for name in self.counters:
            self.counters[name] = trainer_state.get(name, 0)
        logger.info("resumed from %s at step %d", path, self.global_step)

    def _check_strategy(self, path: Path, state: dict[str, Any]) -> None:
        """Refuse a checkpoint this run cannot resume: a sharded state (FSDP, DeepSpeed) resumes only under the
        strategy and process count that wrote it, and a whole one only where the state is not sharded."""
        saved, running = state.get("strategy"), self._strategy()
        if not _sharded(saved) and not self._state_sharded():
            return  # whole states: any process count (data parallel keeps the whole state on every process)
        if saved != running:
            raise CheckpointError(
                f"{path}: saved {_describe(saved)}, and this run is {_describe(running)}: PPO resumes a sharded "
                "optimizer state (FSDP, DeepSpeed) only with the strategy and process count that saved it. Launch "
                "with the same accelerate config and --num_processes, or leave out --resume_from_checkpoint"
            )
        if not (path / SHARDED_STATE).is_dir():
            raise CheckpointError(f"{path / SHARDED_STATE}: not found; not a PPO checkpoint saved by Resonance")

    def _load_whole(self, path: Path, state: dict[str, Any]) -> None:
        """The policy from its saved files, and the optimizer and random states from ``state`` (one process's)."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        policy = self.policy
        if policy.is_lora:
            adapter = load_file(str(path / "adapter_model.safetensors"))
            result = set_peft_model_state_dict(policy.model, adapter, adapter_name=policy.model.active_adapter)
            if result.unexpected_keys:
                raise CheckpointError(f"{path}: adapter weights that the policy lacks: {result.unexpected_keys[:5]}")
        else:
            policy.load_backbone(path)
        policy.load_head(path)
        self.optimizer.load_state_dict(state["optimizer"])
        rng = state["rng"]  # the main process's
        index = self.accelerator.process_index
        if index > 0:
            own = path / RNG_STATE.format(index)
            if own.is_file():
                loaded = _load_safely(own)
                if not isinstance(loaded, dict) or "rng" not in loaded:
                    raise CheckpointError(f"{own}: not a PPO checkpoint's random states")
                rng = loaded["rng"]
            else:  # saved by fewer processes: this one draws from the main process's stream, as none of its own
                logger.warning("%s: not found; process %d continues the main process's random stream", own, index)
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])


def _rng_states() -> dict[str, Any]:
    """This process's random states: Python's, numpy's, torch's and CUDA's."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _load_safely(file: Path) -> Any:
    """A checkpoint file (``ppo_state.pt``, :data:`RNG_STATE`) loaded with ``weights_only=True``: tensors, numbers,
    strings and containers, plus numpy's random state (transformers' own allow-list for ``rng_state.pth``); anything
    else is refused unrun."""
    from transformers.trainer_pt_utils import safe_globals

    try:
        with safe_globals():
            state = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{file}: does not load safely as a PPO checkpoint state ({reason}); only tensors, numbers and numpy "
            "random states are read from a checkpoint. Resume from a checkpoint Resonance saved"
        ) from None
    return state


def _sharded(strategy: dict[str, Any] | None) -> bool:
    """Whether a checkpoint's recorded strategy kept a sharded state (None: saved before strategies were recorded,
    whole)."""
    return strategy is not None and strategy["distributed_type"] in {kind.value for kind in SHARDING}


def _describe(strategy: dict[str, Any] | None) -> str:
    """``under FSDP on 2 processes``, ``under DEEPSPEED (ZeRO-3) on 2 processes``, ``with a whole state``."""
    if not _sharded(strategy):
        return "with a whole (unsharded) optimizer state"
    stage = f" (ZeRO-{strategy['zero_stage']})" if strategy["zero_stage"] is not None else ""
    return f"under {strategy['distributed_type']}{stage} on {strategy['processes']} process(es)"


def _load_state(file: Path) -> dict[str, Any]:
    """``ppo_state.pt`` loaded safely (:func:`_load_safely`), with the entries a PPO checkpoint state has."""
    state = _load_safely(file)
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: not a PPO checkpoint state (expected optimizer, scheduler and rng entries)")
    # a sharded state keeps the optimizer and random states in SHARDED_STATE
    if not ({"scheduler"} if _sharded(state.get("strategy")) else {"optimizer", "scheduler", "rng"}) <= state.keys():
        raise CheckpointError(f"{file}: not a PPO checkpoint state (expected optimizer, scheduler and rng entries)")
    return state
