"""DPO's flags: TRL's DPOConfig plus how our trainer lays out the pairs."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import DPOConfig


@dataclass
class VLDPOConfig(DPOConfig):
    """TRL's DPOConfig and how our trainer lays out the pairs."""

    shared_prompt: bool = field(
        default=True,
        metadata={
            "help": "Run each pair's chosen and rejected answers in one row over a single copy of their prompt "
            "(and its image tokens), with an attention mask that keeps them apart: the same log-probs as two "
            "rows, for fewer tokens. Needs sdpa or eager attention and right padding; families whose attention "
            "is not plain causal (spec shared_prompt: false) always run two rows."
        },
    )
