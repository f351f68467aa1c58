"""Qwen-VL vision towers' segment attention as one batched sdpa call (spec ``image.batched_attention``).

The Qwen2-VL, Qwen2.5-VL and Qwen3-VL towers attend within segments of the flattened patch sequence given
by ``cu_seqlens``: each image (full-attention blocks) or each 8x8-patch window (Qwen2.5-VL's windowed
blocks). With flash-attention that is one variable-length call; under sdpa transformers splits the sequence
and makes one attention call per segment: for a batch of eight 448x448 images, ~3,600 small calls per
tower pass, so the GPU mostly waits on kernel launches. Here the segments go into one ``[segments, heads,
length, dim]`` batch (padded to the longest, with a key mask, where lengths differ) and one sdpa call.
The result is the same attention, segment by segment; only the kernel batching changes.
"""

from __future__ import annotations

import functools
import sys
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Segment lengths per cu_seqlens tensor. A tower passes the same two tensors (windows, whole images) to all
# its blocks; reading them on the host waits for the GPU, so it is done once per tensor, not once per block.
# Keyed by id (tensors compare elementwise, so they cannot be dict keys); an entry goes with its tensor.
_SIZES: dict[int, tuple[weakref.ref, int, list[int]]] = {}


def _segment_sizes(cu_seqlens: torch.Tensor, lengths: torch.Tensor) -> list[int]:
    key = id(cu_seqlens)
    cached = _SIZES.get(key)
    if cached is not None and cached[0]() is cu_seqlens and cached[1] == cu_seqlens._version:
        return cached[2]
    sizes = lengths.tolist()
    _SIZES[key] = (weakref.ref(cu_seqlens, lambda _, key=key: _SIZES.pop(key, None)), cu_seqlens._version, sizes)
    return sizes


@torch.compiler.disable  # data-dependent shapes: inside a compiled block (compile_blocks) it runs eagerly
def segment_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor, scale: float
) -> torch.Tensor:
    """Attention of ``[N, heads, dim]`` tensors within each segment ``cu_seqlens[i]:cu_seqlens[i + 1]``,
    without masks across segments, as one sdpa call; returns ``[N, heads * dim]`` in the input order."""
    total, heads, dim = query.shape
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    sizes = _segment_sizes(cu_seqlens, lengths)
    count, longest = len(sizes), max(sizes)
    if all(size == longest for size in sizes):  # one dense batch, no mask: sdpa may pick flash kernels

        def batched(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(count, longest, heads, dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(batched(query), batched(key), batched(value), scale=scale)
        return out.transpose(1, 2).reshape(total, heads * dim)
    offsets = torch.arange(longest, device=query.device)
    valid = offsets[None, :] < lengths[:, None]  # [segments, longest]
    index = torch.where(valid, cu_seqlens[:-1, None] + offsets[None, :], 0)

    def padded(t: torch.Tensor) -> torch.Tensor:
        return t[index].transpose(1, 2)  # [segments, heads, longest, dim]

    mask = valid[:, None, None, :]  # padding keys hidden; padding queries see their segment (no NaN), dropped
    out = F.scaled_dot_product_attention(padded(query), padded(key), padded(value), attn_mask=mask, scale=scale)
    return out.transpose(1, 2)[valid].reshape(total, heads * dim)


def _batched_forward(module: nn.Module, original: Any) -> Any:
    rotary = sys.modules[type(module).__module__].apply_rotary_pos_emb_vision

    @functools.wraps(original)
    def forward(
        hidden_states: torch.Tensor,
        cu_seqlens: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if module.config._attn_implementation != "sdpa" or position_embeddings is None:
            return original(hidden_states, cu_seqlens, position_embeddings=position_embeddings, **kwargs)
        length = hidden_states.shape[0]
        qkv = module.qkv(hidden_states).reshape(length, 3, module.num_heads, -1).permute(1, 0, 2, 3)
        query, key, value = qkv.unbind(0)
        cos, sin = position_embeddings
        query, key = rotary(query, key, cos, sin)
        return module.proj(segment_attention(query, key, value, cu_seqlens, module.scaling))

    forward._resonance_batched = True  # type: ignore[attr-defined]
    return forward


def install_batched_vision_attention(vision_tower: nn.Module) -> int:
    """Replace the ``forward`` of each segment-attention module under ``vision_tower`` (those taking
    ``cu_seqlens``, with ``qkv``/``proj`` and their modeling file's ``apply_rotary_pos_emb_vision``) with the
    batched one. Returns how many modules now run batched; idempotent."""
    count = 0
    for module in vision_tower.modules():
        forward = module.__dict__.get("forward")
        if forward is not None and getattr(forward, "_resonance_batched", False):
            count += 1
            continue
        modeling = sys.modules.get(type(module).__module__)
        if not (
            type(module).__name__.endswith("VisionAttention")
            and hasattr(module, "qkv")
            and hasattr(module, "proj")
            and hasattr(modeling, "apply_rotary_pos_emb_vision")
        ):
            continue
        module.forward = _batched_forward(module, module.forward)
        count += 1
    return count
