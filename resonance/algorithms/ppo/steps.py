"""PPO's rollout steps' rows: which prompts each step draws, and the rows read and collated ahead of the step in
``--dataloader_num_workers`` worker processes (with none, in the training process when the step takes them), so
that collating (the processor's image work) overlaps the previous step's generation, scoring and update."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset


@dataclass(frozen=True)
class RowStream:
    """An endless stream of shuffled passes over ``size`` rows (one permutation per pass, seeded by ``seed`` and the
    pass), dealt to ``world`` processes ``rows`` at a time: a resumed run draws the same rows."""

    size: int
    rows: int  # per process and step
    world: int
    rank: int
    seed: int

    def indices(self, step: int) -> list[int]:
        """This process's rows of rollout ``step``."""
        start = (step * self.world + self.rank) * self.rows
        indices, permutations = [], {}
        for position in range(start, start + self.rows):
            epoch, offset = divmod(position, self.size)
            if epoch not in permutations:
                generator = torch.Generator().manual_seed(self.seed + epoch)
                permutations[epoch] = torch.randperm(self.size, generator=generator).tolist()
            indices.append(permutations[epoch][offset])
        return indices


# A step's rows in its generation calls' chunks, each with its collated batch (None where the chunk is not sampled
# in one call: a project's hooks sample each micro-batch themselves).
Chunks = list[tuple[list[dict[str, Any]], dict[str, Any] | None]]


class RolloutSteps(Dataset):
    """Item ``k``: the :data:`Chunks` of rollout step ``first + k``, for steps ``first`` (a resumed run's next) up to
    ``last``. ``collator`` collates each chunk of ``chunk`` rows; None leaves the chunks uncollated."""

    def __init__(
        self,
        dataset: Any,
        stream: RowStream,
        chunk: int,
        collator: Callable[[list[dict[str, Any]]], dict[str, Any]] | None,
        first: int = 0,
        last: int = 0,
    ):
        self.dataset, self.stream, self.chunk, self.collator = dataset, stream, chunk, collator
        self.first, self.last = first, last

    def __len__(self) -> int:
        return max(0, self.last - self.first)

    def __getitem__(self, k: int) -> Chunks:
        rows = [self.dataset[i] for i in self.stream.indices(self.first + k)]
        parts = [rows[begin : begin + self.chunk] for begin in range(0, len(rows), self.chunk)]
        return [(part, None if self.collator is None else self.collator(part)) for part in parts]


def _as_is(item: Any) -> Any:
    return item


def step_loader(steps: RolloutSteps, args: Any) -> DataLoader:
    """The steps in order, read ahead by ``args.dataloader_num_workers`` worker processes (``TrainingArguments``'
    prefetch factor, persistent workers and pinned memory apply as they do to the Trainer's loader)."""
    workers = args.dataloader_num_workers
    return DataLoader(
        steps,
        batch_size=None,  # an item is a whole step
        shuffle=False,
        num_workers=workers,
        collate_fn=_as_is,
        pin_memory=args.dataloader_pin_memory and torch.cuda.is_available() and not args.use_cpu,
        prefetch_factor=args.dataloader_prefetch_factor if workers else None,
        persistent_workers=args.dataloader_persistent_workers if workers else False,
        # its own seed for the workers: drawn from torch's global stream, it would shift a resumed run's sampling
        generator=torch.Generator().manual_seed(args.seed),
    )
