"""FSDP on CPU processes: accelerate's state keeps the FSDP plugin it drops there; verified with accelerate 1.15.

``accelerate launch`` of an FSDP config with ``use_cpu: true`` starts its processes through torchrun with
``ACCELERATE_USE_FSDP=true``, and torch's FSDP2 (``fully_shard``) shards CPU tensors over gloo. But
``AcceleratorState`` makes CPU processes ``DistributedType.MULTI_CPU`` and turns the FSDP plugin into the
distributed type only for the accelerator types (``MULTI_GPU``, ``MULTI_XPU``, ...), so the processes train as
plain data parallel with every parameter whole on every process. :func:`keep_fsdp_on_cpu` makes them FSDP, as
that branch makes GPU processes: nothing else in accelerate or the Trainer needs a GPU for FSDP2.

Also here, for GPU and CPU launches alike: :func:`wrap_layers_the_model_holds`, the layers FSDP wraps where the
accelerate config names none.
"""

from __future__ import annotations

import functools
from typing import Any

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType, parse_flag_from_env


def keep_fsdp_on_cpu() -> None:
    """From now on, an ``AcceleratorState`` made for CPU processes (MULTI_CPU) that accelerate launched with
    FSDP (``ACCELERATE_USE_FSDP``) and given an FSDP plugin is ``DistributedType.FSDP`` with that plugin, as
    accelerate makes GPU processes. Other states are left as accelerate makes them. Idempotent."""
    original = AcceleratorState.__init__
    if getattr(original, "_resonance_fsdp_cpu", False):
        return

    @functools.wraps(original)
    def __init__(self: AcceleratorState, *args: Any, fsdp_plugin: Any = None, **kwargs: Any) -> None:
        fresh = not AcceleratorState._shared_state  # a later AcceleratorState() only reads the shared state
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if (
            fresh
            and fsdp_plugin is not None
            and self.distributed_type == DistributedType.MULTI_CPU
            and parse_flag_from_env("ACCELERATE_USE_FSDP")
        ):
            # what accelerate's branch for the accelerator types does (accelerate/state.py, AcceleratorState)
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    __init__._resonance_fsdp_cpu = True  # type: ignore[attr-defined]
    AcceleratorState.__init__ = __init__  # type: ignore[method-assign]


def wrap_layers_the_model_holds(model: Any) -> None:
    """Under an FSDP launch that wraps transformer layers (``fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP``) and
    names none (``--fsdp_transformer_layer_cls_to_wrap``), name the classes of the model's ``_no_split_modules``
    that it holds, for the FSDP plugin made from now on (accelerate reads ``FSDP_TRANSFORMER_CLS_TO_WRAP``) and the
    one already made. accelerate takes every ``_no_split_modules`` name and refuses one the model does not hold:
    the CLIP-tower families (LLaVA, ...) list ``CLIPTextEmbeddings``, which only CLIP's text model has. Names given
    at launch are kept as they are."""
    import os

    from accelerate.state import AcceleratorState
    from accelerate.utils.dataclasses import get_module_class_from_name

    if not parse_flag_from_env("ACCELERATE_USE_FSDP") or os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP"):
        return
    if os.environ.get("FSDP_AUTO_WRAP_POLICY", "").upper() != "TRANSFORMER_BASED_WRAP":
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT model's transformers model
    names = [name for name in base._no_split_modules or [] if get_module_class_from_name(base, name) is not None]
    if not names:  # accelerate's own error then says there is nothing to wrap
        return
    os.environ["FSDP_TRANSFORMER_CLS_TO_WRAP"] = ",".join(names)
    plugin = AcceleratorState._shared_state.get("fsdp_plugin")
    if plugin is not None and plugin.transformer_cls_names_to_wrap is None:
        plugin.transformer_cls_names_to_wrap = names
