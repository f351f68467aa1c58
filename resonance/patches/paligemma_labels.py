"""transformers 5.24: ``PaliGemmaProcessor`` fails on a batch of unpadded prompts of different lengths.

Its ``__call__`` adds backward-compatible ``labels`` built with ``np.array(result["input_ids"])``; rows of different
lengths, unpadded, make that a ragged array, which numpy refuses ("inhomogeneous shape"). TRL 1.16's GRPOTrainer
tokenizes its prompts so (``apply_chat_template`` without padding): a PaliGemma GRPO batch holding prompts of two
lengths ended in that error.

Here, while the processor runs, the ``np`` its module reads is numpy but for ``np.array`` of ragged rows, which
stays a list of rows that the labels code can compare and set as it would an array: the labels of such a batch are
then a list per row, as its ``input_ids`` are. A padded batch, or one row, is what numpy makes of it as before.
A no-op when installed twice.
"""

from __future__ import annotations

import functools
from typing import Any


def _ragged(rows: Any) -> bool:
    return isinstance(rows, list) and len({len(row) for row in rows if isinstance(row, list)}) > 1


def install() -> None:
    import numpy as np
    from transformers import PaliGemmaProcessor
    from transformers.models.paligemma import processing_paligemma

    call = PaliGemmaProcessor.__call__
    if getattr(call, "_resonance_ragged_labels", False):
        return

    class _RowWise:
        """``np`` for the processor's labels: a ragged list of rows stays a list of rows."""

        def __getattr__(self, name: str) -> Any:
            return getattr(np, name)

        @staticmethod
        def array(value: Any, *args: Any, **kwargs: Any) -> Any:
            return _Rows([list(row) for row in value]) if _ragged(value) else np.array(value, *args, **kwargs)

    class _Rows(list):
        """Rows of token ids; ``rows[types == 0] = -100`` sets the prompt's positions of each row, as numpy would."""

        def __eq__(self, other: Any) -> Any:  # types == 0: a mask per row
            return _Rows([[item == other for item in row] for row in self])

        def __setitem__(self, mask: Any, value: Any) -> None:
            if not isinstance(mask, _Rows):
                return super().__setitem__(mask, value)
            for row, keep in zip(self, mask, strict=True):
                row[:] = [value if hit else item for item, hit in zip(row, keep, strict=True)]

    @functools.wraps(call)
    def call_rowwise(self: Any, *args: Any, **kwargs: Any) -> Any:
        kept = processing_paligemma.np
        processing_paligemma.np = _RowWise()
        try:
            result = call(self, *args, **kwargs)
        finally:
            processing_paligemma.np = kept
        labels = result.get("labels")
        if isinstance(labels, _Rows):
            result["labels"] = [list(row) for row in labels]
        return result

    call_rowwise._resonance_ragged_labels = True  # type: ignore[attr-defined]
    PaliGemmaProcessor.__call__ = call_rowwise
