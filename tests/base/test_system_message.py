"""chat_template.system: false. A family whose template refuses a system message (Molmo2's: roles must alternate)
refuses a row holding one by name, at the data check before training and in a batch, instead of a template error.

The family under test is the tiny Qwen2-VL with its template wrapped to refuse a system message, as Molmo2's does.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import datasets
import pytest
from helpers import SFT_CASES, load_adapter, sft_rows, with_template

from resonance.algorithms.lengths import fit_rows
from resonance.errors import ChatTemplateError, DataError, RowError

REFUSES_SYSTEM = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('roles must alternate') }}{% endif %}"


@pytest.fixture
def refusing(tiny_checkpoint: Callable[[str], Path]):
    ckpt = tiny_checkpoint("qwen2_vl")
    mapper, refusing_cls = with_template(ckpt, REFUSES_SYSTEM + load_adapter(ckpt)[1].hf.chat_template)
    return mapper, refusing_cls, ckpt


def test_a_system_row_is_refused_by_name(refusing, tmp_path: Path) -> None:
    mapper, refusing_cls, ckpt = refusing
    rows = sft_rows(tmp_path, SFT_CASES["single_turn"] + SFT_CASES["system"])
    assert [m["role"] for m in rows[1]["messages"]][0] == "system"

    # as the template says (spec chat_template.system: true): its own refusal, for the row
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        mapper.sft_collator(refusing_cls(ckpt))(rows)

    class NoSystem(refusing_cls):
        takes_system = False

    collator = mapper.sft_collator(NoSystem(ckpt))
    with pytest.raises(RowError, match=r"case:1: a system message, which .* \(spec chat_template.system: false\)"):
        collator(rows)
    with pytest.raises(DataError, match=r"case:1: .*a system message") as refused:
        fit_rows(datasets.Dataset.from_list(rows), collator, skip_invalid_rows=False)
    assert "case:0" not in str(refused.value)
    assert len(fit_rows(datasets.Dataset.from_list(rows), collator, skip_invalid_rows=True)) == 1
    assert collator(rows[:1])["input_ids"].shape[0] == 1  # rows without one train as before
