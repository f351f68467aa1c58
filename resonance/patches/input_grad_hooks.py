"""transformers 5.24-5.25: every ``gradient_checkpointing_enable`` adds one more hook to the input embeddings.

``PreTrainedModel.activation_checkpointing_enable`` calls ``enable_input_require_grads``, which registers a forward
hook (``make_inputs_require_grads``) on the input embeddings and keeps only the newest handles; the matching disable
removes them only on a model with transformers' own PEFT integration (``_hf_peft_config_loaded``), not on one that a
``peft.PeftModel`` wraps. TRL's GRPOTrainer switches checkpointing off and on around each generation
(``unwrap_model_for_generation``), so a LoRA run gains a hook or two per step. Each changes what transformers'
compiled decode step guards on (the number of forward hooks of ``embed_tokens``), so under a static cache every
generation recompiled it (``TORCH_LOGS=recompiles``; benchmarks/NOTES.md section 11), and every forward pass runs
one hook more.

Here ``enable_input_require_grads`` first removes the hooks its previous call registered on that model, so the
embeddings keep one hook however often checkpointing is switched back on. A no-op when installed twice.
"""

from __future__ import annotations

import functools
from typing import Any


def install() -> None:
    from transformers import PreTrainedModel

    enable = PreTrainedModel.enable_input_require_grads
    if getattr(enable, "_resonance_one_hook", False):
        return

    @functools.wraps(enable)
    def enable_once(self: Any) -> None:
        for handle in getattr(self, "_require_grads_hooks", None) or ():
            handle.remove()
        enable(self)

    enable_once._resonance_one_hook = True  # type: ignore[attr-defined]
    PreTrainedModel.enable_input_require_grads = enable_once
