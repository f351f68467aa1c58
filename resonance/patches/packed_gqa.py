"""transformers 5.24-5.25: a compiled decode step copies every layer's keys and values once per query head of a group.

With grouped-query attention (fewer key/value heads than query heads) and an attention mask, which the static cache
always brings, transformers' SDPA function cannot let SDPA broadcast the key/value heads (``enable_gqa`` sends a
masked call on CUDA to the slow math kernel), so it repeats them (``repeat_kv``: ``n_rep`` copies of K and V). For a
single query token it has the remedy, ``pack_gqa``: the query heads of one group become that key/value head's query
rows, (batch, heads, 1, dim) -> (batch, kv_heads, n_rep, dim), and SDPA runs on the key/value heads as they are. It
packs only outside ``torch.compile`` (``not is_torchdynamo_compiling()``; the code gives no reason), so the compiled
decode step rollouts run on a GPU repeats: for Qwen2.5-VL-3B (16 query heads, 2 key/value heads, 36 layers) at batch
32 and a 768-slot cache, about 15 GB more memory traffic a step (the copies written, then read by the attention).

Here the "sdpa" attention function packs a single query token compiled or not (uncompiled, the call transformers
makes itself) wherever transformers does not pass ``enable_gqa``, for a module with ``num_key_value_groups > 1`` and
without ``position_bias``, softcap or ``output_attentions``; every other call goes to transformers' function
unchanged. Models look the function up in ``ALL_ATTENTION_FUNCTIONS`` at each call, so the registered one is what a
compiled step traces, and registering it recompiles a step compiled before. On an H200 (that shape, batch 32, merged
LoRA) the decode step's kernel time went from 7.8 to 4.1 ms, and the step from 8.6 to 4.5 ms in one run (8.0 to
7.1 ms in another, whose host was slower): benchmarks/NOTES.md section 14. A no-op when installed twice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import pack_gqa, use_gqa_in_sdpa
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

AttentionFunction = Callable[..., tuple[torch.Tensor, None]]


def packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float,
    scaling: float | None,
) -> torch.Tensor:
    """Attention of one query token per head on the unrepeated key/value heads, as (batch, 1, heads, dim) like
    transformers' function. Query head ``h`` becomes row ``h % n_rep`` of key/value head ``h // n_rep``: the head
    ``repeat_kv`` pairs it with."""
    groups = module.num_key_value_groups
    output = torch.nn.functional.scaled_dot_product_attention(
        pack_gqa(query, groups),
        key,
        value,
        attn_mask=pack_gqa(attention_mask, groups),
        dropout_p=dropout,
        scale=scaling,
        is_causal=False,
    )
    return output.reshape(output.shape[0], -1, 1, value.shape[-1]).transpose(1, 2).contiguous()


def packing(original: AttentionFunction) -> AttentionFunction:
    """``original`` (an "sdpa" attention function) with a single query token packed wherever transformers would
    otherwise repeat the key/value heads, and without options the packed call leaves out."""

    def sdpa_attention_forward(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        is_causal: bool | None = None,
        position_bias: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        if (
            query.shape[2] == 1
            and getattr(module, "num_key_value_groups", 1) > 1
            and not use_gqa_in_sdpa(attention_mask, key, value)
            and position_bias is None
            and kwargs.get("softcap") is None
            and not kwargs.get("output_attentions", False)
        ):
            return packed_attention(module, query, key, value, attention_mask, dropout, scaling), None
        return original(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            position_bias=position_bias,
            **kwargs,
        )

    sdpa_attention_forward.__wrapped__ = original  # type: ignore[attr-defined]
    return sdpa_attention_forward


def install() -> None:
    original = ALL_ATTENTION_FUNCTIONS["sdpa"]
    if original.__module__ == __name__:  # installed already
        return
    AttentionInterface.register("sdpa", packing(original))
