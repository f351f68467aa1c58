"""``resonance train X``: flags (spelled as in the seed and in TrainingArguments/TRL configs) -> the algorithm's
trainer (:data:`resonance.algorithms.ALGORITHMS`) -> train -> save."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from resonance.algorithms import ALGORITHMS
from resonance.algorithms.arguments import DataArguments, ModelArguments
from resonance.algorithms.guards import (
    NonFiniteGuard,
    check_checkpoint_strategy,
    check_steps_left,
    prepare_output_dir,
    resolve_resume,
    save_result,
)
from resonance.base.registry import load_core_mapper, use_adapters
from resonance.commands import flags, run_config
from resonance.errors import ConfigError, ResonanceError, user_error
from resonance.patches.compile_layers import CompileTimeLog, compile_blocks
from resonance.patches.fsdp_cpu import keep_fsdp_on_cpu

logger = logging.getLogger("resonance")


def parse(algorithm: str, argv: list[str]):
    """Parse command-line flags (and a run config file: ``run.yaml`` first or ``--config run.yaml``, whose values
    the flags override) into (ModelArguments, DataArguments, the algorithm's config).

    Every unknown flag (with did-you-mean) and every invalid value is one :class:`ConfigError` (exit 2), raised
    before anything loads: :mod:`resonance.commands.flags` holds the valid values.
    """
    import torch

    defaults: dict[str, object] = {"remove_unused_columns": False, "report_to": "none"}
    if not torch.cuda.is_available():
        defaults["bf16"] = False  # TRL's configs default to bf16, which a CPU run refuses
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # Several processes without a GPU (torchrun, or `accelerate launch` of configs/accelerate/cpu_2proc.yaml):
            # accelerate only joins them into one gloo group (MULTI_CPU) when asked for the CPU. Without it each
            # process sees LOCAL_RANK, finds no GPU, falls back to DistributedType.NO and trains alone on the
            # whole dataset: N independent copies of a one-process run, all writing the same --output_dir.
            if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
                # ... except under DeepSpeed, which accelerate drops for a CPU state (state.py: `... and not cpu`):
                # PPO's own Accelerator(cpu=True) would train without it on weights ZeRO-3 already partitioned.
                # Not asked for the CPU, the processes still find no GPU; gloo is the group they join.
                defaults["ddp_backend"] = "gloo"
            else:
                defaults["use_cpu"] = True
    config_class = ALGORITHMS[algorithm].config_class()
    parser = flags.train_parser(algorithm, (ModelArguments, DataArguments, config_class), defaults)
    parser.epilog = run_config.CONFIG_HELP
    config_path, argv, problems = run_config.split_config(argv)
    file = run_config.RunConfig(Path(config_path or "."))
    elsewhere = flags.other_algorithms(algorithm)
    if config_path is not None:  # the file's values as defaults: the command line's flags win
        file, file_problems = run_config.read_run_config(config_path, parser, elsewhere)
        problems += file_problems
        parser.set_defaults(**file.values)
    namespace, flag_problems = flags.read_flags(parser, argv, flags.train_ranges(algorithm), elsewhere)
    problems += flag_problems
    given_here = flags.given_flags(parser, argv)
    values = vars(namespace)
    # the config's own list of flags it accepts but does not honour (PPO's loop reads fewer than the Trainer)
    not_honoured = getattr(config_class, "flag_problems", lambda _: [])(values)
    problems += file.locate(flags.train_problems(algorithm, values) + not_honoured, given_here)
    flags.raise_problems(problems, parser.prog)
    try:
        model_args, data_args, config, _ = parser.parse_args_into_dataclasses(
            args=argv, return_remaining_strings=True, look_for_args_file=False
        )
    except ResonanceError:
        raise
    except ValueError as exc:  # what the configs' own __post_init__ refuse (TRL's combinations of flags)
        raise ConfigError(f"{parser.prog}: {exc}") from None
    given = given_here | set(file.values)
    compiled = model_args.compiles_layers(config.use_cpu)
    if compiled and hasattr(config, "pad_to_multiple_of") and "pad_to_multiple_of" not in given:
        # sdpa's attention mask wants a length that is a multiple of 8; compiled code specialises on it, so
        # lengths of both kinds would compile every layer twice, the second time deep into training.
        config.pad_to_multiple_of = 8
    return model_args, data_args, config


def build_trainer(algorithm: str, model_args: ModelArguments, data_args: DataArguments, config):
    """Load adapter, model, processor and data, and return the family's trainer for ``algorithm``, ready to train."""
    from transformers import set_seed

    # Seeded before any weight is made (LoRA matrices, heads): the same flags give the same run, whatever ran
    # before in the process (the trainers seed again, after the model exists).
    set_seed(config.seed)
    mapper = load_core_mapper(model_args.model_name_or_path)
    trainer, processor = ALGORITHMS[algorithm].builder()(mapper, model_args, data_args, config)
    if hasattr(trainer, "add_callback"):  # transformers/TRL trainers; PPO's own loop runs the same checks
        trainer.add_callback(NonFiniteGuard())
    if model_args.compiles_layers(config.use_cpu):
        models = (trainer.model, getattr(trainer, "ref_model", None))  # DPO's separate reference: full training
        count = sum(compile_blocks(m) for m in models if m is not None)
        how = "--compile_layers true"
        if model_args.compile_layers == "auto":  # the default: a block torch.compile fails on runs eagerly instead
            import torch

            torch._dynamo.config.suppress_errors = True
            how = "--compile_layers auto, on a CUDA GPU; a block that fails to compile runs eagerly, with a warning"
        logger.info("compiling %d layers in place (%s; torch.compile, one compile per layer kind)", count, how)
        if hasattr(trainer, "add_callback"):  # PPO's own loop logs its compile time itself
            trainer.add_callback(CompileTimeLog())
    return trainer, processor


def prepare_run(config, data_args: DataArguments) -> Path | None:
    """Before anything loads: the checkpoint ``--resume_from_checkpoint`` names (``true``: the last complete one in
    --output_dir), then --output_dir checked writable and, unless resuming or --overwrite_output_dir, empty."""
    resume = resolve_resume(config.resume_from_checkpoint, config.output_dir)
    prepare_output_dir(
        config.output_dir,
        overwrite=data_args.overwrite_output_dir,
        resume=None if resume is None else str(resume),
        remove_old=config.should_save,
    )
    if resume is not None:
        check_steps_left(resume, config.max_steps)
        check_checkpoint_strategy(resume)
    return resume


def _log_processes(config) -> None:
    """Say how many processes train together; warn where the launcher started more than joined."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    kind = getattr(getattr(config, "distributed_state", None), "distributed_type", "?")
    if config.world_size != launched:
        logger.warning(
            "%d processes were launched but this one trains alone (%s): each runs the whole training on its own",
            launched,
            kind,
        )
    elif config.process_index == 0:
        logger.info("%d process(es), %s", config.world_size, kind)


def end_processes(accelerator) -> None:
    """Several processes: wait for all of them, then end their process group, as accelerate's ``end_training``
    does, before Python exits. Left to exit, a gloo worker thread could still be freeing the tensors of a finished
    collective (ZeRO-3's last all-gather) while the interpreter shuts down; it then needs the GIL, is stopped, and the
    process aborts ("terminate called without an active exception"; one run in 20 of the ZeRO-3 DPO test, its core
    dump shows that thread in ``~AsyncAllgatherWork``)."""
    if accelerator is not None and accelerator.num_processes > 1:
        accelerator.wait_for_everyone()  # gloo's barrier completes after every collective queued before it
        accelerator.end_training()


def leave(code: int) -> None:
    """Exit with ``code``. A process of a multi-process run (``WORLD_SIZE`` > 1), whose outputs are saved and whose
    process group :func:`end_processes` has ended, leaves without the interpreter's teardown (``os._exit``, after
    flushing its logs and streams): even after ``end_training`` a gloo worker thread was caught there once in a CI run
    of the ZeRO-3 PPO resume test, and the process aborted ("terminate called without an active exception") after
    a finished run, so the launcher reported a failure."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        sys.exit(code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _close_progress_bars() -> None:
    """End the trainer's open progress bar (tqdm) with its line, so an error that stops training starts a line of
    its own instead of being written after the bar's carriage return."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):  # tqdm's own registry of open bars
        bar.close()


def main(algorithm: str, argv: list[str]) -> int:
    """Train, then save weights (or adapter) and the processor into --output_dir."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        keep_fsdp_on_cpu()  # before any Accelerator: accelerate drops FSDP on CPU processes (MULTI_CPU)
        model_args, data_args, config = parse(algorithm, argv)
        use_adapters(model_args.spec_project)  # a project's adapters are checked against its specs before anything else
        resume = prepare_run(config, data_args)
        trainer, _ = build_trainer(algorithm, model_args, data_args, config)
        _log_processes(config)
        trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
        # The adapter or weights (for rm: plus the reward head), and the processor (processing_class); where that
        # fails, kept next to --output_dir. PPO's rescue is its save without the wait for the other processes.
        rescue = getattr(trainer, "save_outputs", trainer.save_model)
        save_result(Path(config.output_dir), trainer.save_model, rescue)
        end_processes(getattr(trainer, "accelerator", None))
    except Exception as exc:
        error = user_error(exc)  # a ResonanceError, also one raised where a loader's worker collated a batch
        if error is None:
            raise
        _close_progress_bars()
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    skipped = getattr(trainer.data_collator, "skipped_rows", 0)  # GRPO: TRL's collator, no length policy
    if skipped:
        logger.warning("skipped %d over-long rows (--skip_long_rows)", skipped)
    logger.info("saved to %s", Path(config.output_dir).resolve())
    _log_peak_memory()
    return 0


def _log_peak_memory() -> None:
    """The run's peak GPU memory (what torch's allocator held at most), on each process that used a GPU."""
    import torch

    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        rank = os.environ.get("RANK", "0")
        logger.info("peak GPU memory: %.2f GiB (process %s)", torch.cuda.max_memory_allocated() / 2**30, rank)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
