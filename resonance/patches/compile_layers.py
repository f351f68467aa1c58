"""Regional compilation: every block of a repeated stack (decoder layers, vision blocks) compiled in place.

A VLM training step on a small language model (Qwen2.5-VL-3B) is bound by launching small kernels: RMSNorm
in fp32, rotary embeddings, SiLU-and-multiply, residual adds and LoRA's dtype casts, some thirty per layer,
each a separate kernel in eager mode. ``torch.compile`` fuses them. Compiling each block of a
``ModuleList`` whose entries share a class (accelerate's ``is_repeated_blocks``) compiles the block's code
once and reuses it for every layer, so the compile time is that of one layer, not of the model.

The blocks are compiled in place (``nn.Module.compile``), not wrapped: the module tree, parameter names,
PEFT's adapters, hooks, gradient checkpointing (transformers' ``GradientCheckpointingLayer`` calls the
compiled forward inside the checkpoint) and saving all stay as they are. Everything outside the blocks
(embeddings, masks, the vision merger, the LM head and the loss) runs eagerly.

Sizes are symbolic from the first compile (``dynamic=True``): batches of other lengths reuse the compiled
code. With torch's default (specialise on the first shapes, go symbolic at the first change) every layer kind
compiles a second time when the first batch of a new length arrives, well into training. One specialisation
remains: inductor guards on whether the length is a multiple of 8 (sdpa's mask alignment), which is why
``--compile_layers`` pads batches to a multiple of 8. Each block still compiles a few variants: with and
without grad (the reference pass runs under ``no_grad``) and per active LoRA adapter (TRL's reference
adapter, or adapters disabled). The per-function recompile limit is raised to hold them.

Rollouts (PPO, GRPO) generate with the blocks eager (:func:`blocks_eager`): their scoring and update passes run
the compiled blocks, and the decode step is transformers' own compiled whole-model step where the cache is static.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from accelerate.utils.other import is_repeated_blocks
from torch import nn
from transformers import TrainerCallback

logger = logging.getLogger("resonance")

RECOMPILE_LIMIT = 32  # variants per compiled code object: grad mode x adapter x layer kind, with room


def compile_blocks(model: nn.Module, **compile_kwargs) -> int:
    """Compile, in place, each block of every repeated stack in ``model``; return how many blocks.

    ``compile_kwargs`` go to ``torch.compile`` (default ``dynamic=True``). Blocks already compiled are left
    as they are, so calling it twice is harmless. Stacks nested inside a compiled block are compiled as
    part of it.
    """
    compile_kwargs.setdefault("dynamic", True)
    if torch._dynamo.config.recompile_limit < RECOMPILE_LIMIT:
        torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT
    # transformers 5.25 depends on kernels (0.19), whose hub-kernel layers (the decoder layers of most families) set
    # a context variable before each forward and reset it after. Under gradient checkpointing dynamo refused that
    # side effect (the backward's recomputation would not replay it) and ran every such block eagerly. The pair
    # leaves nothing behind, so the recomputation needs no replay of it.
    if hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    return _compile(model, compile_kwargs)


def _compile(module: nn.Module, compile_kwargs: dict) -> int:
    if is_repeated_blocks(module):
        count = 0
        for block in module:
            if getattr(block, "_compiled_call_impl", None) is None:
                block.compile(**compile_kwargs)
                count += 1
        return count
    return sum(_compile(child, compile_kwargs) for child in module.children())


@contextlib.contextmanager
def blocks_eager(model: nn.Module) -> Iterator[None]:
    """``model``'s compiled blocks run eagerly inside the block (rollouts): generation passes each layer its own
    KV-cache entry, on which a compiled block would guard, compiling once per layer; transformers' compiled decode
    step (``cache_implementation="static"``) compiles the model whole instead. Training's passes, before and after,
    keep the compiled blocks."""
    compiled = [m for m in model.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    calls = [m._compiled_call_impl for m in compiled]
    for module in compiled:
        module._compiled_call_impl = None
    try:
        yield
    finally:
        for module, call in zip(compiled, calls, strict=True):
            module._compiled_call_impl = call


def compile_seconds() -> float:
    """Seconds torch.compile has spent compiling in this process (dynamo's own record, inductor's work included)."""
    from torch._dynamo.utils import compilation_time_metrics

    return sum(compilation_time_metrics.get("_compile.compile_inner", []))


class CompileTimeLog(TrainerCallback):
    """Logs, after each step in which something compiled, the seconds it took and the total so far: the compiled
    layers' cost, paid in the first steps (and again where a new variant is met), and the decode step's where
    rollouts compile it. PPO's own loop calls :meth:`after_step`."""

    def __init__(self) -> None:
        self.start = self.seen = compile_seconds()

    def after_step(self, step: int) -> None:
        """Log what compiled since the last call, if anything."""
        now = compile_seconds()
        if now > self.seen:
            logger.info(
                "step %d: %.1f s compiling (torch.compile; %.1f s in all)", step, now - self.seen, now - self.start
            )
            self.seen = now

    def on_step_end(self, args, state, control, **kwargs):  # noqa: D102
        self.after_step(state.global_step)
