"""What the tests share, importable from every test folder as ``helpers`` (pyproject's pytest ``pythonpath``
puts tests/ on sys.path).

* :mod:`helpers.repo`: paths (REPO, EXAMPLES, EXPECTED, FIXTURES) and the families (FAMILIES, TEMPLATE_FAMILIES,
  SUFFIX_FAMILIES);
* :mod:`helpers.images`, :mod:`helpers.messages`: test images, canonical conversations and their conversions;
* :mod:`helpers.references`: the family's own HF processor, the reference side of the parity tests;
* :mod:`helpers.rows`: THE preference rows, the SFT cases, inference prompts, and the data files written from them;
* :mod:`helpers.cli`: THE argv builder for ``resonance train X`` and ``resonance generate``, and the console script;
* :mod:`helpers.rewards`: reward functions, named ``helpers.rewards:NAME`` on the command line;
* :mod:`helpers.cuda`: what the GPU twins of the training tests check.
"""

from helpers.cli import generate_argv, run_resonance, train_argv
from helpers.cuda import one_bf16_step
from helpers.images import make_image, open_rgb, row_images, save_png
from helpers.messages import (
    IMAGE,
    Message,
    assistant,
    count_images,
    has_system,
    prompt_of,
    system,
    to_hf,
    to_text,
    to_trl,
    to_user_format,
    user,
    without_system,
)
from helpers.references import (
    IGNORE_INDEX,
    expected_lora_layers,
    expected_supervision,
    hf_batch,
    hf_ids,
    is_blank_token,
    load_adapter,
    load_hf_processor,
    our_inference_batch,
    prompt_only_inputs,
    repeat_images,
    supervised_positions,
    takes,
    takes_system,
    with_stop_token,
    with_template,
)
from helpers.repo import EXAMPLES, EXPECTED, FAMILIES, FIXTURES, REPO, SUFFIX_FAMILIES, TEMPLATE_FAMILIES, read_spec
from helpers.rewards import REWARDS, TARGET
from helpers.rows import (
    PARITY_CASES,
    PREFERENCE_ROWS,
    SFT_CASES,
    inference_rows,
    preference_rows,
    sft_rows,
    write_data,
    write_jsonl,
)

__all__ = [
    "EXAMPLES",
    "EXPECTED",
    "FAMILIES",
    "FIXTURES",
    "IGNORE_INDEX",
    "IMAGE",
    "PARITY_CASES",
    "PREFERENCE_ROWS",
    "REPO",
    "REWARDS",
    "SFT_CASES",
    "SUFFIX_FAMILIES",
    "TARGET",
    "TEMPLATE_FAMILIES",
    "Message",
    "assistant",
    "count_images",
    "expected_lora_layers",
    "expected_supervision",
    "generate_argv",
    "has_system",
    "hf_batch",
    "hf_ids",
    "inference_rows",
    "our_inference_batch",
    "is_blank_token",
    "load_adapter",
    "load_hf_processor",
    "make_image",
    "one_bf16_step",
    "open_rgb",
    "preference_rows",
    "prompt_of",
    "prompt_only_inputs",
    "read_spec",
    "repeat_images",
    "row_images",
    "run_resonance",
    "save_png",
    "sft_rows",
    "supervised_positions",
    "system",
    "takes",
    "takes_system",
    "to_hf",
    "to_text",
    "to_trl",
    "to_user_format",
    "train_argv",
    "user",
    "without_system",
    "with_stop_token",
    "with_template",
    "write_data",
    "write_jsonl",
]
