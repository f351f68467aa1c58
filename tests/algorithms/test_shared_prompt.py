"""The shared-prompt layout of a DPO batch (resonance.algorithms.shared_prompt), on hand-made batches.

Each family's loss, log-probs and gradients with the layout are checked against TRL's two-row DPOTrainer
in test_dpo_loss_parity; here the bookkeeping itself: which tokens a row holds, what each sees, its
positions and labels, and the map back.
"""

from __future__ import annotations

import pytest
import torch

from resonance.algorithms.shared_prompt import _representatives_of, plan_groups, plan_pairs

IMAGE = 99
PAD = 0


def _batch(rows: list[tuple[list[int], int]], left: bool = False) -> tuple[torch.Tensor, ...]:
    """(input_ids, attention_mask, completion_mask) from (tokens, prompt length) rows, padded with PAD."""
    length = max(len(tokens) for tokens, _ in rows)
    ids = torch.full((len(rows), length), PAD)
    attention = torch.zeros(len(rows), length, dtype=torch.long)
    completion = torch.zeros(len(rows), length, dtype=torch.long)
    for i, (tokens, prompt) in enumerate(rows):
        start = length - len(tokens) if left else 0
        ids[i, start : start + len(tokens)] = torch.tensor(tokens)
        attention[i, start : start + len(tokens)] = 1
        completion[i, start + prompt : start + len(tokens)] = 1
    return ids, attention, completion


# Two pairs: prompts of 4 and 3 tokens (images first), answers of different lengths.
PROMPTS = [[IMAGE, IMAGE, 5, 6], [IMAGE, 7, 8]]
CHOSEN = [[10, 11, 12], [20]]
REJECTED = [[13, 14], [21, 22, 23, 24]]


def _pairs() -> tuple[torch.Tensor, ...]:
    rows = [(p + c, len(p)) for p, c in zip(PROMPTS, CHOSEN, strict=True)]
    rows += [(p + r, len(p)) for p, r in zip(PROMPTS, REJECTED, strict=True)]
    return _batch(rows)


def test_rows_hold_the_prompt_once_then_each_answer() -> None:
    ids, attention, completion = _pairs()
    layout = plan_pairs(ids, attention, completion, [IMAGE])
    assert layout is not None
    shared = layout.gather(ids, fill=layout.pad_token_id)
    # prompt | chosen | copy of the prompt's last token | rejected
    assert shared[0].tolist() == [IMAGE, IMAGE, 5, 6, 10, 11, 12, 6, 13, 14]
    assert shared[1].tolist()[: layout.segment[1].ge(0).sum()] == [IMAGE, 7, 8, 20, 8, 21, 22, 23, 24]
    assert layout.tokens == 10 + 9 < int(attention.sum())
    assert layout.segment[0].tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]


def test_each_answer_sees_the_prompt_and_itself_only() -> None:
    ids, attention, completion = _pairs()
    layout = plan_pairs(ids, attention, completion, [IMAGE])
    mask = layout.attention_mask(torch.float32, additive=False)[0, 0]
    seen = {q: set(mask[q].nonzero().flatten().tolist()) for q in range(10)}
    assert seen[3] == {0, 1, 2, 3}  # the prompt's last token
    assert seen[6] == {0, 1, 2, 3, 4, 5, 6}  # last chosen token: prompt and chosen
    assert seen[7] == {0, 1, 2, 7}  # the copy of the last prompt token: prompt[:-1] and itself
    assert seen[9] == {0, 1, 2, 7, 8, 9}  # last rejected token: never chosen, never the original token 3
    additive = layout.attention_mask(torch.float32, additive=True)[0, 0]
    assert torch.equal(additive == 0, mask)
    # Padding of the shorter row sees itself only (a fully masked row would give NaN in sdpa).
    pad = layout.segment[1].lt(0).nonzero().flatten().tolist()
    full = layout.attention_mask(torch.float32, additive=False)[1, 0]
    assert pad and all(full[q].nonzero().flatten().tolist() == [q] for q in pad)


def test_positions_and_labels_are_those_of_each_own_row() -> None:
    ids, attention, completion = _pairs()
    layout = plan_pairs(ids, attention, completion, [IMAGE])
    plain = torch.arange(layout.shared_length).expand(layout.groups, -1)
    positions = layout.positions(plain)
    assert positions[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 3, 4, 5]
    # 3-D (M-RoPE) positions: every axis restarts the same way.
    assert torch.equal(layout.positions(plain.expand(3, -1, -1) + 7), (positions + 7).expand(3, -1, -1))
    labels = ids.masked_fill(completion == 0, -100)
    shifted = layout.shift_labels(labels)
    # Position 3 (last prompt token) scores chosen's first token; the copy (7) scores rejected's first token.
    assert shifted[0].tolist() == [-100, -100, -100, 10, 11, 12, -100, 13, 14, -100]


def test_outputs_map_back_to_the_two_row_layout() -> None:
    ids, attention, completion = _pairs()
    layout = plan_pairs(ids, attention, completion, [IMAGE])
    labels = ids.masked_fill(completion == 0, -100)
    shifted = layout.shift_labels(labels)
    # A fake per-token output: the label it scores (as the fused head's log-probs are per scored label).
    scored = layout.unpack(shifted.float())
    expected = labels[:, 1:].float()
    assert torch.equal(scored.masked_fill(expected < 0, 0), expected.clamp(min=0)), scored
    assert scored.shape == (4, ids.shape[1] - 1)


def test_prompts_that_differ_before_the_answer_share_their_common_prefix() -> None:
    rows = _batch([([IMAGE, 5, 6, 10, 11], 3), ([IMAGE, 5, 7, 12], 3)])
    layout = plan_pairs(*rows, [IMAGE])
    assert layout is not None
    shared = layout.gather(rows[0], fill=layout.pad_token_id)
    # Common prefix [IMAGE, 5]: the rejected segment restarts at 5 and carries its own prompt token 7.
    assert shared[0].tolist() == [IMAGE, 5, 6, 10, 11, 5, 7, 12]
    assert layout.positions(torch.arange(8).expand(1, -1))[0].tolist() == [0, 1, 2, 3, 4, 1, 2, 3]


def test_batches_that_cannot_share_run_as_two_rows() -> None:
    # Left padding: positions are not column indices.
    assert plan_pairs(*_batch([([IMAGE, 5, 10], 2), ([IMAGE, 5, 11, 12], 2)], left=True), [IMAGE]) is None
    # An image placeholder after the common prefix would get its features twice.
    assert plan_pairs(*_batch([([5, IMAGE, 10], 2), ([6, IMAGE, 11], 2)]), [IMAGE]) is None
    # Nothing in common: no shared token.
    assert plan_pairs(*_batch([([5, 10], 1), ([6, 11], 1)]), [IMAGE]) is None
    # Not a chosen-then-rejected batch.
    assert plan_pairs(*_batch([([5, 10], 1)]), [IMAGE]) is None


# ---------------------------------------------------------------------------------------------- GRPO groups


def _grpo(rows: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(input_ids, attention_mask, completion columns) of (prompt, completion) rows as TRL lays them out: prompts
    padded on the left, completions on the right."""
    width = max(len(prompt) for prompt, _ in rows)
    keep = max(len(completion) for _, completion in rows)
    ids = torch.full((len(rows), width + keep), PAD)
    attention = torch.zeros(len(rows), width + keep, dtype=torch.long)
    for i, (prompt, completion) in enumerate(rows):
        ids[i, width - len(prompt) : width] = torch.tensor(prompt)
        ids[i, width : width + len(completion)] = torch.tensor(completion)
        attention[i, width - len(prompt) : width + len(completion)] = 1
    return ids, attention, keep


# Two groups of a shuffled batch: prompt A (4 tokens) for rows 0, 2, 3 and prompt B (3 tokens) for rows 1, 4.
A, B = [IMAGE, IMAGE, 5, 6], [IMAGE, 7, 8]
GROUP_ROWS = [(A, [10, 11]), (B, [20, 21, 22]), (A, [12]), (A, [13, 14, 15]), (B, [23])]
GROUPS = torch.tensor([0, 1, 0, 0, 1])


def test_a_group_holds_its_prompt_once_then_each_completion() -> None:
    ids, attention, keep = _grpo(GROUP_ROWS)
    layout = plan_groups(ids, attention, keep, GROUPS, [IMAGE])
    assert layout is not None and layout.groups == 2 and layout.representatives == [0, 1]
    shared = layout.gather(ids, fill=layout.pad_token_id)
    # prompt | completion of row 0 | copy of the last prompt token, completion of row 2 | the same for row 3
    assert shared[0].tolist() == [IMAGE, IMAGE, 5, 6, 10, 11, 6, 12, 6, 13, 14, 15]
    assert shared[1].tolist()[: int(layout.segment[1].ge(0).sum())] == [IMAGE, 7, 8, 20, 21, 22, 8, 23]
    assert layout.segment[0].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 3]
    assert layout.tokens == 12 + 8 < int(attention.sum())
    positions = layout.positions(torch.arange(layout.shared_length).expand(2, -1))
    assert positions[0].tolist() == [0, 1, 2, 3, 4, 5, 3, 4, 3, 4, 5, 6]
    mask = layout.attention_mask(torch.float32, additive=False)[0, 0]
    assert set(mask[9].nonzero().flatten().tolist()) == {0, 1, 2, 8, 9}  # row 3's 1st token: never rows 0 or 2


def test_group_outputs_map_back_to_the_rows() -> None:
    ids, attention, keep = _grpo(GROUP_ROWS)
    layout = plan_groups(ids, attention, keep, GROUPS, [IMAGE])
    labels = ids.masked_fill(attention == 0, -100)
    labels[:, :-keep] = -100  # TRL's GRPO: only the completion is scored
    scored = layout.unpack(layout.shift_labels(labels).float())
    expected = labels[:, 1:].float()
    assert scored.shape == expected.shape
    assert torch.equal(scored.masked_fill(expected < 0, 0), expected.clamp(min=0))


def test_batches_whose_groups_cannot_share_run_as_rows() -> None:
    ids, attention, keep = _grpo(GROUP_ROWS)
    assert plan_groups(ids, attention, keep, torch.arange(5), [IMAGE]) is None  # no prompt twice
    assert plan_groups(ids, attention, keep, torch.zeros(5, dtype=torch.long), [IMAGE]) is None  # one id, two prompts
    ids, attention, keep = _grpo([(A, [10, IMAGE]), (A, [11])])
    assert plan_groups(ids, attention, keep, torch.zeros(2, dtype=torch.long), [IMAGE]) is None  # placeholder
    ids, attention, keep = _grpo([(A, [10, 12]), (A, [11, 13])])
    attention[0, -2] = 0  # a hole in a completion: neither left nor right padding
    assert plan_groups(ids, attention, keep, torch.zeros(2, dtype=torch.long), [IMAGE]) is None


def test_each_shared_row_takes_its_first_rows_other_inputs() -> None:
    ids, attention, keep = _grpo(GROUP_ROWS)
    images, tiles = [1, 2, 1, 1, 2], [2, 1, 2, 2, 1]  # rows 0, 2, 3: one image of two tiles; rows 1, 4: two of one
    layout = plan_groups(ids, attention, keep, GROUPS, [IMAGE], [images, tiles])
    per_row = torch.arange(5)
    per_image = torch.arange(7)  # row 1's images are 1 and 2
    per_tile = torch.arange(8) + 100  # row 0's tiles 100, 101; row 1's 102
    assert _representatives_of(per_row, layout).tolist() == [0, 1]
    assert _representatives_of(per_image, layout).tolist() == [0, 1, 2]
    assert _representatives_of(per_tile, layout).tolist() == [100, 101, 102]
    features = {"image": {"pooler_output": tuple(torch.full((2,), i) for i in range(7))}}
    picked = _representatives_of(features, layout)["image"]["pooler_output"]
    assert [int(t[0]) for t in picked] == [0, 1, 2]
    with pytest.raises(NotImplementedError, match="neither per row nor per image"):
        _representatives_of(torch.arange(9), layout)  # e.g. every image's patches in one run
