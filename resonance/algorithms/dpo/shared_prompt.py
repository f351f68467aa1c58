"""Chosen and rejected in one row, over one copy of the prompt they share.

A DPO batch holds each pair twice: ``prompt + chosen`` and ``prompt + rejected``. With an image the prompt
is most of the row (LLaVA-1.5: 576 image tokens and ~64 text tokens before ~128 answer tokens), so the
language model runs the same prompt twice, forward and backward, for the policy and once more for the
reference. Here each pair becomes one row::

    prompt[:-1] | prompt[-1] chosen | prompt[-1] rejected

with an attention mask under which the chosen segment sees the prompt and itself, and the rejected segment
sees ``prompt[:-1]``, a copy of the prompt's last token (at that token's position) and itself. Every token
then has exactly the keys, values and positions it has in its own row, so its hidden state is the same;
the copy of the last prompt token is there to predict the first rejected token. Position ids are the
model's own for ``prompt + chosen`` (Qwen's 3-D M-RoPE positions included); the rejected segment
continues from the prompt's last position.

The per-token log-probs (and any other per-token output of TRL's fused LM head) are mapped back to the
two-row layout, so TRL's DPO losses and metrics run unchanged. Where a batch cannot be shared this way
(left padding, a pair whose images are not all in the common prefix, a family whose attention is not
plain causal), :func:`plan_pairs` returns ``None`` and the batch runs as two rows.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any

import torch

from resonance.base.model import unwrap

_LAYOUT_ATTR = "_resonance_pair_layout"


@dataclass
class PairLayout:
    """Where each token of the shared rows comes from, and where each two-row position goes back to."""

    pairs: int
    length: int  # L: the two-row batch's padded length
    shared_length: int  # S
    source: torch.Tensor  # [B, S] flat index (row * L + col) into the two-row batch; -1 on padding
    segment: torch.Tensor  # [B, S] 0 shared prompt, 1 last prompt token + chosen, 2 its copy + rejected, -1 pad
    branch_start: torch.Tensor  # [B] where the rejected segment starts (its copy of the last prompt token)
    prompt_last: torch.Tensor  # [B] index of the last shared prompt token
    back: torch.Tensor  # [2B, L - 1] flat index into [B, S] for each shifted two-row position; -1: none
    pad_token_id: int

    @property
    def tokens(self) -> int:
        """Tokens the shared rows hold (what the model runs), padding excluded."""
        return int((self.segment >= 0).sum())

    def to(self, device: torch.device) -> PairLayout:
        tensors = ("source", "segment", "branch_start", "prompt_last", "back")
        moved = {name: getattr(self, name).to(device) for name in tensors}
        return PairLayout(**{**self.__dict__, **moved})

    def gather(self, value: torch.Tensor, dim: int = 0, fill: int | float = 0) -> torch.Tensor:
        """A per-token tensor of the two-row batch (``value.shape[dim:dim + 2] == (2B, L)``) in shared rows."""
        moved = value.movedim((dim, dim + 1), (0, 1))
        flat = moved.reshape(2 * self.pairs * self.length, *moved.shape[2:])
        out = flat[self.source.clamp(min=0)]
        pad = (self.source < 0).view(*self.source.shape, *([1] * (out.dim() - 2)))
        out = out.masked_fill(pad, fill)
        return out.movedim((0, 1), (dim, dim + 1))

    def attention_mask(self, dtype: torch.dtype, additive: bool) -> torch.Tensor:
        """[B, 1, S, S]: causal, and a query sees the shared prompt and its own segment; padding sees itself."""
        seg = self.segment
        size = self.shared_length
        causal = torch.ones(size, size, dtype=torch.bool, device=seg.device).tril()
        query, key = seg[:, :, None], seg[:, None, :]
        allowed = causal & (query >= 0) & (key >= 0) & ((key == 0) | (key == query))
        allowed |= torch.eye(size, dtype=torch.bool, device=seg.device)  # no fully masked query row (NaN in sdpa)
        allowed = allowed[:, None]
        if not additive:
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=seg.device).masked_fill(~allowed, torch.finfo(dtype).min)

    def shift_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """[B, S]: for each shared position, the label of the token that follows it in its own row."""
        shifted = torch.full_like(labels, -100)
        shifted[:, :-1] = labels[:, 1:]
        # The chosen segment's last token scores its own row's next position (padding: -100), not the copy
        # of the last prompt token that follows it here; that copy scores the first rejected token.
        return self.gather(shifted, fill=-100)

    def positions(self, base: torch.Tensor) -> torch.Tensor:
        """Position ids ``[..., B, S]`` from ``base``, the model's positions for the shared rows read as plain
        rows: right for the prompt and chosen; the rejected segment restarts at the last prompt token's."""
        size = self.shared_length
        index = torch.arange(size, device=base.device).expand(self.pairs, size)
        offset = index - self.branch_start[:, None]  # 0 at the copy of the last prompt token
        last = self.prompt_last.view(*([1] * (base.dim() - 2)), self.pairs, 1)
        start = base.gather(-1, last.expand(*base.shape[:-1], 1))
        branch = (self.segment == 2).expand_as(base)
        return torch.where(branch, start + offset, base)

    def unpack(self, value: torch.Tensor) -> torch.Tensor:
        """A per-token output over the shared rows ``[B, S]`` as the two-row batch's ``[2B, L - 1]``."""
        flat = value.reshape(self.pairs * self.shared_length, *value.shape[2:])
        out = flat[self.back.clamp(min=0)]
        missing = (self.back < 0).view(*self.back.shape, *([1] * (out.dim() - 2)))
        return out.masked_fill(missing, 0)


def plan_pairs(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    placeholder_ids: list[int],
    multiple_of: int = 1,
) -> PairLayout | None:
    """The shared layout of a chosen-then-rejected batch, or ``None`` where it cannot be shared exactly.

    The shared rows are padded to a multiple of ``multiple_of`` tokens (TRL's ``pad_to_multiple_of``)."""
    rows, length = input_ids.shape
    if rows % 2 or rows == 0 or length < 2:
        return None
    pairs = rows // 2
    ids, attended, completion = input_ids.cpu(), attention_mask.cpu().bool(), completion_mask.cpu().bool()
    lengths = attended.sum(1)
    if not torch.equal(attended, torch.arange(length) < lengths[:, None]):
        return None  # only right padding: positions are then column indices
    placeholders = torch.tensor(placeholder_ids, dtype=ids.dtype)
    sources, segments, starts, lasts = [], [], [], []
    for b in range(pairs):
        chosen, rejected = b, pairs + b
        n_chosen, n_rejected = int(lengths[chosen]), int(lengths[rejected])
        limit = min(
            int(completion[r].nonzero()[0]) if completion[r].any() else int(lengths[r]) for r in (chosen, rejected)
        )
        same = (ids[chosen, :limit] == ids[rejected, :limit]).tolist()
        prompt = same.index(False) if False in same else limit
        if prompt < 1:
            return None
        tails = (ids[chosen, prompt:n_chosen], ids[rejected, prompt - 1 : n_rejected])
        if any(torch.isin(tail, placeholders).any() for tail in tails):
            return None  # an image placeholder after the shared prefix: its features would be placed twice
        source = [chosen * length + i for i in range(n_chosen)]
        source += [rejected * length + i for i in range(prompt - 1, n_rejected)]
        segment = [0] * (prompt - 1) + [1] * (n_chosen - prompt + 1) + [2] * (n_rejected - prompt + 1)
        sources.append(source)
        segments.append(segment)
        starts.append(n_chosen)
        lasts.append(prompt - 1)
    size = -(-max(len(s) for s in sources) // multiple_of) * multiple_of
    source = torch.full((pairs, size), -1, dtype=torch.long)
    segment = torch.full((pairs, size), -1, dtype=torch.long)
    for b, (src, seg) in enumerate(zip(sources, segments, strict=True)):
        source[b, : len(src)] = torch.tensor(src)
        segment[b, : len(seg)] = torch.tensor(seg)
    # Back map: shifted position i of a row scores token i + 1 of that row.
    back = torch.full((rows, length - 1), -1, dtype=torch.long)
    for b in range(pairs):
        n_chosen, n_rejected, last = starts[b], int(lengths[pairs + b]), lasts[b]
        back[b, : n_chosen - 1] = b * size + torch.arange(n_chosen - 1)
        back[pairs + b, :last] = b * size + torch.arange(last)  # the prompt: chosen's copy of the same tokens
        back[pairs + b, last : n_rejected - 1] = b * size + n_chosen + torch.arange(n_rejected - 1 - last)
    unused = ids[~attended]  # a padding token id for the shared rows' padding, else any non-placeholder id
    pad = int(unused[0]) if unused.numel() else min(set(range(len(placeholder_ids) + 1)) - set(placeholder_ids))
    return PairLayout(
        pairs=pairs,
        length=length,
        shared_length=size,
        source=source,
        segment=segment,
        branch_start=torch.tensor(starts),
        prompt_last=torch.tensor(lasts),
        back=back,
        pad_token_id=pad,
    )


def _default_positions(base: torch.nn.Module, kind: str, packed: dict[str, Any], layout: PairLayout) -> torch.Tensor:
    """The positions the model itself would give the shared rows read as plain right-padded rows."""
    size = layout.shared_length
    device = packed["input_ids"].device
    plain = torch.arange(size, device=device).expand(layout.pairs, size)
    if kind != "3d":
        return plain
    backbone = base.base_model
    compute = getattr(backbone, "compute_3d_position_ids", None)
    if compute is None:
        raise TypeError(f"{type(backbone).__name__} has no compute_3d_position_ids for its 3-D rope positions")
    accepted = inspect.signature(compute).parameters
    candidates = {
        "input_ids": packed["input_ids"],
        "image_grid_thw": packed.get("image_grid_thw"),
        "video_grid_thw": packed.get("video_grid_thw"),
        "second_per_grid_ts": packed.get("second_per_grid_ts"),
        "mm_token_type_ids": packed.get("mm_token_type_ids"),
        "inputs_embeds": torch.empty(layout.pairs, size, 1, device=device),
        "attention_mask": (layout.segment >= 0).long(),
        "cache": None,
    }
    positions = compute(**{k: v for k, v in candidates.items() if k in accepted})
    return plain.expand(3, -1, -1) if positions is None else positions


def install_shared_prompt(model: torch.nn.Module | None, position_ids_kind: str) -> None:
    """Wrap the model's (fused-head) forward: while a :class:`PairLayout` is set on it (:func:`sharing`), a
    ``fused_lm_head`` call on the two-row batch runs as shared rows and answers in the two-row layout."""
    if model is None:
        return
    base = unwrap(model)
    inner = base.forward
    if getattr(inner, "_resonance_shared_prompt", False):
        return
    additive = base.config._attn_implementation == "eager"

    @functools.wraps(inner)
    def forward(*args: Any, fused_lm_head: bool = False, labels: Any = None, **kwargs: Any) -> Any:
        layout: PairLayout | None = base.__dict__.get(_LAYOUT_ATTR)
        rows = kwargs.get("input_ids")
        if not fused_lm_head or layout is None or args or rows is None or rows.shape[0] != 2 * layout.pairs:
            return inner(*args, fused_lm_head=fused_lm_head, labels=labels, **kwargs)
        layout = layout.to(rows.device)
        packed: dict[str, Any] = {}
        for key, value in kwargs.items():
            if key in ("attention_mask", "position_ids"):
                continue
            per_token = isinstance(value, torch.Tensor) and value.dim() >= 2
            if per_token and value.shape[:2] == (2 * layout.pairs, layout.length):
                packed[key] = layout.gather(value, fill=layout.pad_token_id if key == "input_ids" else 0)
            else:
                packed[key] = value
        if kwargs.get("position_ids") is not None:
            given = kwargs["position_ids"]
            packed["position_ids"] = layout.gather(given, dim=given.dim() - 2)
        else:
            packed["position_ids"] = layout.positions(_default_positions(base, position_ids_kind, packed, layout))
        dtype = base.get_input_embeddings().weight.dtype
        packed["attention_mask"] = layout.attention_mask(dtype, additive)
        outputs = inner(fused_lm_head=True, shift_labels=layout.shift_labels(labels), **packed)
        for key, value in outputs.items():
            if isinstance(value, torch.Tensor) and value.shape[:2] == (layout.pairs, layout.shared_length):
                outputs[key] = layout.unpack(value)
        return outputs

    forward._resonance_shared_prompt = True  # type: ignore[attr-defined]
    base.forward = forward


class sharing:  # noqa: N801 (a context manager used like a function)
    """Set ``layout`` on the given models for the duration of a block (``None``: run as two rows)."""

    def __init__(self, layout: PairLayout | None, *models: torch.nn.Module | None):
        self.layout = layout
        self.bases = [unwrap(m) for m in models if m is not None]

    def __enter__(self) -> None:
        if self.layout is not None:
            for base in self.bases:
                base.__dict__[_LAYOUT_ATTR] = self.layout

    def __exit__(self, *exc: Any) -> None:
        for base in self.bases:
            base.__dict__.pop(_LAYOUT_ATTR, None)
