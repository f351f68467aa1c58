"""transformers 5.25: ``PaliGemmaProcessor`` returns an unpadded batch's ``labels`` as one numpy array per row.

Its ``__call__`` adds backward-compatible ``labels`` (``-100`` over the prompt), built row by row with
``np.where``, while the batch's ``input_ids`` and ``token_type_ids`` stay lists of rows. TRL 1.16's GRPOTrainer
tokenizes its prompts unpadded (``apply_chat_template`` without padding) and left-pads each per-token field it
finds as a list of lists; any other field it stacks with ``np.array``, which fails ("inhomogeneous shape") for
rows of two lengths. A PaliGemma GRPO batch holding prompts of two lengths ended in that error.

Here the labels of such a batch are a list of rows, as its ``input_ids`` are. With ``return_tensors`` (a padded
batch) they are a tensor as before. A no-op when installed twice.
"""

from __future__ import annotations

import functools
from typing import Any


def install() -> None:
    import numpy as np
    from transformers import PaliGemmaProcessor

    call = PaliGemmaProcessor.__call__
    if getattr(call, "_resonance_row_labels", False):
        return

    @functools.wraps(call)
    def call_with_row_labels(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = call(self, *args, **kwargs)
        labels = result.get("labels")
        if isinstance(labels, list) and any(isinstance(row, np.ndarray) for row in labels):
            result["labels"] = [np.asarray(row).tolist() for row in labels]
        return result

    call_with_row_labels._resonance_row_labels = True  # type: ignore[attr-defined]
    PaliGemmaProcessor.__call__ = call_with_row_labels
