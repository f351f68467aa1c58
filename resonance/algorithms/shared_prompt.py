"""Answers to one prompt in one row, over one copy of the prompt they share: DPO's chosen and rejected, a GRPO
group's completions.

A DPO batch holds each pair twice: ``prompt + chosen`` and ``prompt + rejected``; a GRPO batch holds each prompt
once per completion of its group. With an image the prompt is most of the row (LLaVA-1.5: 576 image tokens and ~64
text tokens before ~128 answer tokens), so the language model runs the same prompt several times, forward and
backward, for the policy and once more for the reference. Here the answers to one prompt become one row::

    prompt[:-1] | prompt[-1] answer 1 | prompt[-1] answer 2 | ...

with an attention mask under which each answer's segment sees ``prompt[:-1]``, its own copy of the prompt's last
token (at that token's position) and itself. Every token then has exactly the keys, values and positions it has in
its own row, so its hidden state is the same; each copy of the last prompt token is there to predict its answer's
first token. Position ids are the model's own for ``prompt + answer 1`` (Qwen's 3-D M-RoPE positions included); each
later answer continues from the prompt's last position.

The per-token log-probs (and any other per-token output of TRL's fused LM head) are mapped back to the rows' layout,
so TRL's losses and metrics run unchanged. Where a batch cannot be shared this way (an image placeholder in an
answer, padding other than the planner expects, ...) :func:`plan_pairs` and :func:`plan_groups` return ``None`` and
the batch runs as rows; the trainers plan nothing for a family whose attention is not plain causal (spec
``shared_prompt: false``).
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from resonance.algorithms.batch_rows import entries_of
from resonance.base.model import unwrap

_LAYOUT_ATTR = "_resonance_shared_layout"
_SAID: set[str] = set()  # reasons logged once each: a batch whose inputs cannot be shared
logger = logging.getLogger("resonance")


@dataclass
class SharedLayout:
    """Where each token of the shared rows comes from, and where each position of the rows goes back to.

    ``representatives`` (GRPO) are the rows each shared row takes its prompt's other inputs from: its rows' own
    inputs (Mllama's aspect ratios, the images' features) are those of its first row; ``units`` are counts per row
    of what other inputs may hold one entry each of (images, InternVL's tiles). Empty (DPO): the batch's other
    inputs are those of the shared rows already (DPO's images come once per pair)."""

    rows: int  # R: the rows of the batch as it came
    length: int  # L: its padded length
    shared_length: int  # S
    source: torch.Tensor  # [G, S] flat index (row * L + col) into the batch; -1 on padding
    segment: torch.Tensor  # [G, S] 0 shared prompt, k >= 1 the k-th answer (after its last prompt token), -1 pad
    branch_offset: torch.Tensor  # [G, S] from the 2nd answer on: the distance from its copy of the last prompt token
    prompt_last: torch.Tensor  # [G] index of the last shared prompt token
    back: torch.Tensor  # [R, L - 1] flat index into [G, S] for each shifted position of the rows; -1: none
    pad_token_id: int
    representatives: list[int] = field(default_factory=list)
    units: list[list[int]] = field(default_factory=list)

    @property
    def groups(self) -> int:
        """G: the shared rows."""
        return self.source.shape[0]

    @property
    def tokens(self) -> int:
        """Tokens the shared rows hold (what the model runs), padding excluded."""
        return int((self.segment >= 0).sum())

    def to(self, device: torch.device) -> SharedLayout:
        tensors = ("source", "segment", "branch_offset", "prompt_last", "back")
        moved = {name: getattr(self, name).to(device) for name in tensors}
        return SharedLayout(**{**self.__dict__, **moved})

    def gather(self, value: torch.Tensor, dim: int = 0, fill: int | float = 0) -> torch.Tensor:
        """A per-token tensor of the batch (``value.shape[dim:dim + 2] == (R, L)``) in shared rows."""
        moved = value.movedim((dim, dim + 1), (0, 1))
        flat = moved.reshape(self.rows * self.length, *moved.shape[2:])
        out = flat[self.source.clamp(min=0)]
        pad = (self.source < 0).view(*self.source.shape, *([1] * (out.dim() - 2)))
        out = out.masked_fill(pad, fill)
        return out.movedim((0, 1), (dim, dim + 1))

    def attention_mask(self, dtype: torch.dtype, additive: bool) -> torch.Tensor:
        """[G, 1, S, S]: causal, and a query sees the shared prompt and its own segment; padding sees itself."""
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
        """[G, S]: for each shared position, the label of the token that follows it in its own row."""
        shifted = torch.full_like(labels, -100)
        shifted[:, :-1] = labels[:, 1:]
        # An answer's last token scores its own row's next position (padding: -100), not the copy of the last
        # prompt token that follows it here; that copy scores its own answer's first token.
        return self.gather(shifted, fill=-100)

    def positions(self, base: torch.Tensor) -> torch.Tensor:
        """Position ids ``[..., G, S]`` from ``base``, the model's positions for the shared rows read as plain
        rows: right for the prompt and the first answer; each later answer restarts at the last prompt token's."""
        last = self.prompt_last.view(*([1] * (base.dim() - 2)), self.groups, 1)
        start = base.gather(-1, last.expand(*base.shape[:-1], 1))
        branch = (self.branch_offset >= 0).expand_as(base)
        return torch.where(branch, start + self.branch_offset, base)

    def unpack(self, value: torch.Tensor) -> torch.Tensor:
        """A per-token output over the shared rows ``[G, S]`` as the batch's ``[R, L - 1]``."""
        flat = value.reshape(self.groups * self.shared_length, *value.shape[2:])
        out = flat[self.back.clamp(min=0)]
        missing = (self.back < 0).view(*self.back.shape, *([1] * (out.dim() - 2)))
        return out.masked_fill(missing, 0)


def _pack(
    groups: Sequence[Sequence[tuple[int, int, int]]],
    prefixes: Sequence[int],
    rows: int,
    length: int,
    multiple_of: int,
    pad_token_id: int,
) -> SharedLayout:
    """The layout of ``groups``, each a list of rows ``(row, first column, tokens)`` whose tokens lie in one run of
    columns and whose first ``prefixes[g]`` tokens (at least one) are the same: that prompt once, then each row's
    tokens from its last prompt token on. Shared rows are padded to a multiple of ``multiple_of`` tokens."""
    sources, segments, offsets = [], [], []
    backs: list[tuple[int, int, int, list[int]]] = []  # (row, first column, group, shared index of each token)
    for g, (members, prefix) in enumerate(zip(groups, prefixes, strict=True)):
        source: list[int] = []
        segment = [0] * (prefix - 1)
        offset = [-1] * (prefix - 1)
        for k, (row, first, count) in enumerate(members, start=1):
            start = len(source) if source else prefix - 1  # where this row's last prompt token lies
            kept = range(count) if not source else range(prefix - 1, count)
            source += [row * length + first + i for i in kept]
            segment += [k] * (count - prefix + 1)
            offset += list(range(count - prefix + 1)) if k > 1 else [-1] * (count - prefix + 1)
            shared = list(range(prefix - 1)) + [start + i for i in range(count - prefix + 1)]
            backs.append((row, first, g, shared))
        sources.append(source)
        segments.append(segment)
        offsets.append(offset)
    size = -(-max(len(source) for source in sources) // multiple_of) * multiple_of
    source = torch.full((len(groups), size), -1, dtype=torch.long)
    segment = torch.full((len(groups), size), -1, dtype=torch.long)
    offset = torch.full((len(groups), size), -1, dtype=torch.long)
    for g in range(len(groups)):
        source[g, : len(sources[g])] = torch.tensor(sources[g])
        segment[g, : len(segments[g])] = torch.tensor(segments[g])
        offset[g, : len(offsets[g])] = torch.tensor(offsets[g])
    # Back map: shifted position c of a row scores its next token, from the shared position of its token at c.
    back = torch.full((rows, length - 1), -1, dtype=torch.long)
    for row, first, g, shared in backs:
        scored = shared[:-1]  # a row's last token scores nothing of its own
        back[row, first : first + len(scored)] = g * size + torch.tensor(scored, dtype=torch.long)
    return SharedLayout(
        rows=rows,
        length=length,
        shared_length=size,
        source=source,
        segment=segment,
        branch_offset=offset,
        prompt_last=torch.tensor([prefix - 1 for prefix in prefixes]),
        back=back,
        pad_token_id=pad_token_id,
    )


def may_share(config: Any, vl_model: Any, model: torch.nn.Module, router_loss: bool) -> bool:
    """Whether a trainer may plan shared rows for ``model``'s passes: ``--shared_prompt`` on (``config``), a family
    whose attention is plain causal (spec ``shared_prompt``), sdpa or eager attention (flash-attention takes no custom
    mask), and no router loss (TRL's, in every pass, reads the rows' 2-D mask: shared rows have none)."""
    if not getattr(config, "shared_prompt", True) or not vl_model.shares_prompt:
        return False
    return unwrap(model).config._attn_implementation in ("sdpa", "eager") and not router_loss


def _pad_token(ids: torch.Tensor, attended: torch.Tensor, placeholder_ids: list[int]) -> int:
    """A padding token id for the shared rows' padding: the batch's own, else any id that is no placeholder."""
    unused = ids[~attended]
    return int(unused[0]) if unused.numel() else min(set(range(len(placeholder_ids) + 1)) - set(placeholder_ids))


def plan_pairs(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    placeholder_ids: list[int],
    multiple_of: int = 1,
) -> SharedLayout | None:
    """The shared layout of a chosen-then-rejected batch (DPO), or ``None`` where it cannot be shared exactly.

    Each pair shares the longest prefix its two rows have in common before either answer starts. The shared rows are
    padded to a multiple of ``multiple_of`` tokens (TRL's ``pad_to_multiple_of``)."""
    rows, length = input_ids.shape
    if rows % 2 or rows == 0 or length < 2:
        return None
    pairs = rows // 2
    ids, attended, completion = input_ids.cpu(), attention_mask.cpu().bool(), completion_mask.cpu().bool()
    lengths = attended.sum(1)
    if not torch.equal(attended, torch.arange(length) < lengths[:, None]):
        return None  # only right padding: positions are then column indices
    placeholders = torch.tensor(placeholder_ids, dtype=ids.dtype)
    groups, prefixes = [], []
    for chosen, rejected in ((b, pairs + b) for b in range(pairs)):
        limit = min(
            int(completion[r].nonzero()[0]) if completion[r].any() else int(lengths[r]) for r in (chosen, rejected)
        )
        same = (ids[chosen, :limit] == ids[rejected, :limit]).tolist()
        prompt = same.index(False) if False in same else limit
        if prompt < 1:
            return None
        tails = (ids[chosen, prompt : lengths[chosen]], ids[rejected, prompt - 1 : lengths[rejected]])
        if any(torch.isin(tail, placeholders).any() for tail in tails):
            return None  # an image placeholder after the shared prefix: its features would be placed twice
        groups.append([(chosen, 0, int(lengths[chosen])), (rejected, 0, int(lengths[rejected]))])
        prefixes.append(prompt)
    return _pack(groups, prefixes, rows, length, multiple_of, _pad_token(ids, attended, placeholder_ids))


def plan_groups(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_length: int,
    group_ids: torch.Tensor,
    placeholder_ids: list[int],
    units: Sequence[Sequence[int]] = (),
    multiple_of: int = 1,
) -> SharedLayout | None:
    """The shared layout of a GRPO batch (prompts padded on the left, then ``completion_length`` columns of
    completions padded on the right), or ``None`` where it cannot be shared exactly. Rows of one ``group_ids`` value
    are completions of one prompt with the same images: they share that prompt. ``units``: counts per row of what
    the batch's other inputs may hold one entry each of (TRL's ``num_images``, ``num_tiles``)."""
    rows, length = input_ids.shape
    prompt_width = length - completion_length
    if rows < 2 or prompt_width < 1 or completion_length < 1 or group_ids.shape != (rows,):
        return None
    ids, attended = input_ids.cpu(), attention_mask.cpu().bool()
    prompt_lengths = attended[:, :prompt_width].sum(1)
    answer_lengths = attended[:, prompt_width:].sum(1)
    columns = torch.arange(length)
    expected = (columns >= prompt_width - prompt_lengths[:, None]) & (columns < prompt_width + answer_lengths[:, None])
    if not torch.equal(attended, expected) or bool((prompt_lengths < 1).any()):
        return None  # only prompts padded on the left and answers on the right
    placeholders = torch.tensor(placeholder_ids, dtype=ids.dtype)
    if torch.isin(ids[:, prompt_width:][attended[:, prompt_width:]], placeholders).any():
        return None  # an image placeholder in a completion: its features would be placed twice
    members: dict[int, list[int]] = {}
    for row, group in enumerate(group_ids.tolist()):
        members.setdefault(group, []).append(row)
    if len(members) == rows:
        return None  # no prompt twice: nothing to share
    groups, prefixes = [], []
    for rows_of_group in members.values():
        first = rows_of_group[0]
        prompt = int(prompt_lengths[first])
        for row in rows_of_group[1:]:
            same = torch.equal(ids[row, :prompt_width], ids[first, :prompt_width])
            if int(prompt_lengths[row]) != prompt or not same:
                return None  # one group id, two prompts: not this trainer's batch
        groups.append([(row, prompt_width - prompt, prompt + int(answer_lengths[row])) for row in rows_of_group])
        prefixes.append(prompt)
    layout = _pack(groups, prefixes, rows, length, multiple_of, _pad_token(ids, attended, placeholder_ids))
    layout.representatives = [group[0][0] for group in groups]
    layout.units = [list(counts) for counts in units if len(counts) == rows]
    return layout


def _default_positions(base: torch.nn.Module, kind: str, packed: dict[str, Any], layout: SharedLayout) -> torch.Tensor:
    """The positions the model itself would give the shared rows read as plain right-padded rows."""
    size = layout.shared_length
    device = packed["input_ids"].device
    plain = torch.arange(size, device=device).expand(layout.groups, size)
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
        "inputs_embeds": torch.empty(layout.groups, size, 1, device=device),
        "attention_mask": (layout.segment >= 0).long(),
        "cache": None,
    }
    positions = compute(**{k: v for k, v in candidates.items() if k in accepted})
    return plain.expand(3, -1, -1) if positions is None else positions


def _representatives_of(value: Any, layout: SharedLayout) -> Any:
    """``value`` (one of a batch's inputs that is not per token, or an image encoder's output) for the shared rows:
    the entries of each shared row's first row (:attr:`SharedLayout.representatives`), where its first dimension
    has one entry per row or per unit of :attr:`SharedLayout.units` (images, tiles). :class:`NotImplementedError`
    where it has neither, or several that choose differently (a family's patches of all images in one run)."""
    return entries_of(value, layout.rows, layout.representatives, layout.units)


def _shared_inputs(kwargs: dict[str, Any], layout: SharedLayout) -> dict[str, Any]:
    """The forward's inputs for the shared rows: per-token ones gathered, and with representatives
    (:attr:`SharedLayout.representatives`) the others of each shared row's first row."""
    packed: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key in ("attention_mask", "position_ids"):
            continue
        per_token = isinstance(value, torch.Tensor) and value.dim() >= 2
        if per_token and value.shape[:2] == (layout.rows, layout.length):
            packed[key] = layout.gather(value, fill=layout.pad_token_id if key == "input_ids" else 0)
        elif layout.representatives and key not in ("labels", "shift_labels"):
            packed[key] = _representatives_of(value, layout)
        else:
            packed[key] = value
    if kwargs.get("position_ids") is not None:
        given = kwargs["position_ids"]
        packed["position_ids"] = layout.gather(given, dim=given.dim() - 2)
    return packed


def install_shared_prompt(model: torch.nn.Module | None, position_ids_kind: str) -> None:
    """Wrap the model's (fused-head) forward: while a :class:`SharedLayout` is set on it (:func:`sharing`), a
    ``fused_lm_head`` call on the batch runs as shared rows and answers in the batch's layout. Where a layout's
    representatives' inputs cannot be told apart (:func:`_representatives_of`) the batch runs as rows."""
    if model is None:
        return
    base = unwrap(model)
    inner = base.forward
    if getattr(inner, "_resonance_shared_prompt", False):
        return
    additive = base.config._attn_implementation == "eager"

    @functools.wraps(inner)
    def forward(*args: Any, fused_lm_head: bool = False, labels: Any = None, **kwargs: Any) -> Any:
        layout: SharedLayout | None = base.__dict__.get(_LAYOUT_ATTR)
        rows = kwargs.get("input_ids")
        if not fused_lm_head or layout is None or args or rows is None or rows.shape[0] != layout.rows:
            return inner(*args, fused_lm_head=fused_lm_head, labels=labels, **kwargs)
        layout = layout.to(rows.device)
        try:
            packed = _shared_inputs(kwargs, layout)
        except NotImplementedError as reason:
            if str(reason) not in _SAID:
                _SAID.add(str(reason))
                logger.info("%s: answers run as rows, not over a shared prompt (%s)", type(base).__name__, reason)
            return inner(fused_lm_head=fused_lm_head, labels=labels, **kwargs)
        if "position_ids" not in packed:
            packed["position_ids"] = layout.positions(_default_positions(base, position_ids_kind, packed, layout))
        dtype = base.get_input_embeddings().weight.dtype
        packed["attention_mask"] = layout.attention_mask(dtype, additive)
        outputs = inner(fused_lm_head=True, shift_labels=layout.shift_labels(labels), **packed)
        for key, value in outputs.items():
            if isinstance(value, torch.Tensor) and value.shape[:2] == (layout.groups, layout.shared_length):
                outputs[key] = layout.unpack(value)
        return outputs

    forward._resonance_shared_prompt = True  # type: ignore[attr-defined]
    base.forward = forward


class sharing:  # noqa: N801 (a context manager used like a function)
    """Set ``layout`` on the given models for the duration of a block (``None``: run as rows)."""

    def __init__(self, layout: SharedLayout | None, *models: torch.nn.Module | None):
        self.layout = layout
        self.bases = [unwrap(m) for m in models if m is not None]

    def __enter__(self) -> None:
        if self.layout is not None:
            for base in self.bases:
                base.__dict__[_LAYOUT_ATTR] = self.layout

    def __exit__(self, *exc: Any) -> None:
        for base in self.bases:
            base.__dict__.pop(_LAYOUT_ATTR, None)
