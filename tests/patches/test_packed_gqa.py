"""A single query token's grouped-query attention packed under torch.compile too (resonance.patches.packed_gqa): the
same attention as transformers' repeated keys and values, in float64 on random tensors and in a tiny Qwen2.5-VL's
compiled decode step on the CPU; every other call left to transformers; on a GPU, the same tokens in bf16."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import AttentionInterface, CompileConfig
from transformers.integrations import sdpa_attention
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from resonance.generation import load_for_generation
from resonance.patches import packed_gqa

BATCH, KV_HEADS, GROUPS, LENGTH, KEY_DIM = 3, 2, 3, 7, 8  # 3 query heads a key/value head: head order shows


@pytest.fixture(autouse=True)
def transformers_sdpa() -> Iterator[Callable[..., Any]]:
    """transformers' own "sdpa" function, registered for the test (an earlier test's generation may have installed
    the patch for the whole process); what was registered before is registered again after."""
    registered = ALL_ATTENTION_FUNCTIONS["sdpa"]
    AttentionInterface.register("sdpa", sdpa_attention.sdpa_attention_forward)
    yield sdpa_attention.sdpa_attention_forward
    AttentionInterface.register("sdpa", registered)


@pytest.fixture
def sdpa_queries(monkeypatch: pytest.MonkeyPatch) -> list[torch.Size]:
    """The query shape of every ``scaled_dot_product_attention`` call, in order."""
    shapes: list[torch.Size] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recorded(query: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        shapes.append(query.shape)
        return sdpa(query, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recorded)
    return shapes


def attention_inputs(mask: str, value_dim: int) -> tuple[torch.Tensor, ...]:
    """Query, key, value and mask for one query token, float64; ``mask``: shared (bool / float), per_head, none."""
    generator = torch.Generator().manual_seed(0)
    heads = KV_HEADS * GROUPS

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    query, key = normal(BATCH, heads, 1, KEY_DIM), normal(BATCH, KV_HEADS, LENGTH, KEY_DIM)
    value = normal(BATCH, KV_HEADS, LENGTH, value_dim)
    masks = {
        "shared_bool": torch.arange(LENGTH).expand(BATCH, 1, 1, LENGTH) >= torch.tensor([0, 2, 4]).view(-1, 1, 1, 1),
        "shared_float": normal(BATCH, 1, 1, LENGTH),
        "per_head": normal(BATCH, heads, 1, LENGTH),
        "none": None,
    }
    return query, key, value, masks[mask]


@pytest.mark.parametrize(
    ("mask", "value_dim"),
    # no mask: transformers lets SDPA broadcast the heads (enable_gqa) unless the value's dim differs from the key's
    [("shared_bool", KEY_DIM), ("shared_float", KEY_DIM), ("per_head", KEY_DIM), ("none", 5)],
)
def test_packed_attention_equals_repeated_keys_and_values(
    mask: str,
    value_dim: int,
    transformers_sdpa: Callable[..., Any],
    sdpa_queries: list[torch.Size],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As compiled transformers runs it (``is_torchdynamo_compiling`` true: ``repeat_kv``), the same attention to
    float64 rounding, with the query packed as (batch, kv_heads, n_rep, dim)."""
    monkeypatch.setattr(sdpa_attention, "is_torchdynamo_compiling", lambda: True)
    module = SimpleNamespace(num_key_value_groups=GROUPS, is_causal=True)
    query, key, value, attention_mask = attention_inputs(mask, value_dim)
    expected, _ = transformers_sdpa(module, query, key, value, attention_mask, scaling=0.3)
    assert sdpa_queries.pop() == (BATCH, KV_HEADS * GROUPS, 1, KEY_DIM)  # transformers repeated

    packed_gqa.install()
    output, weights = ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, scaling=0.3)
    assert sdpa_queries == [(BATCH, KV_HEADS, GROUPS, KEY_DIM)]
    assert weights is None and output.shape == expected.shape == (BATCH, 1, KV_HEADS * GROUPS, value_dim)
    assert output.is_contiguous()
    # each output is a softmax-weighted mean of LENGTH values: rounding within an eps of the largest a term
    tolerance = LENGTH * torch.finfo(torch.float64).eps * value.abs().max()
    assert (output - expected).abs().max() <= tolerance


@pytest.mark.parametrize(
    "case",
    ["prefill", "one_key_value_head_a_query_head", "enable_gqa", "position_bias", "softcap", "output_attentions"],
)
def test_other_calls_go_to_transformers_unchanged(case: str) -> None:
    heads = KV_HEADS * GROUPS
    query, key, value, attention_mask = attention_inputs("shared_bool", KEY_DIM)
    groups, kwargs = GROUPS, {"dropout": 0.0, "scaling": 0.3, "is_causal": None, "position_bias": None}
    if case == "prefill":
        query = query.expand(BATCH, heads, 4, KEY_DIM)
    elif case == "one_key_value_head_a_query_head":
        groups = 1
    elif case == "enable_gqa":
        attention_mask = None
    elif case == "position_bias":
        kwargs["position_bias"] = torch.zeros(BATCH, heads, 1, LENGTH, dtype=torch.float64)
    else:
        kwargs[case] = 1.0 if case == "softcap" else True
    module = SimpleNamespace(num_key_value_groups=groups, is_causal=True)
    calls = []

    def original(*args: Any, **kwargs: Any) -> tuple[str, None]:
        calls.append((args, kwargs))
        return "transformers", None

    assert packed_gqa.packing(original)(module, query, key, value, attention_mask, **kwargs) == ("transformers", None)
    assert calls == [((module, query, key, value, attention_mask), kwargs)]


def test_install_registers_one_wrapper(transformers_sdpa: Callable[..., Any]) -> None:
    packed_gqa.install()
    installed = ALL_ATTENTION_FUNCTIONS["sdpa"]
    packed_gqa.install()  # twice: still one wrapper
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is installed is not transformers_sdpa
    assert installed.__wrapped__ is transformers_sdpa
    assert ALL_ATTENTION_FUNCTIONS.get_interface("sdpa", None) is installed  # what the models' attention looks up


def compiled_decode(model: Any, compile_config: CompileConfig | None) -> Any:
    """Greedy ``generate`` of five tokens for a left-padded batch of two with the static cache, its decode step
    compiled; the sequences and each step's logits."""
    ids = torch.randint(10, 100, (2, 6), generator=torch.Generator().manual_seed(0)).to(model.device)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    return model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=5,
        do_sample=False,
        cache_implementation="static",
        compile_config=compile_config,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )


def decode_with_and_without(
    checkpoint: Path, device: str, compile_config: CompileConfig | None, monkeypatch: pytest.MonkeyPatch
) -> tuple[Any, Any, list[bool]]:
    """The compiled decode as transformers runs it, then with the patch installed (the attention function is looked
    up while tracing, so the changed registration recompiles the step), and whether each packed call was compiled."""
    torch._dynamo.reset()
    _, model, _ = load_for_generation(checkpoint, device=device)
    text_config = model.config.get_text_config()
    assert text_config.num_key_value_heads < text_config.num_attention_heads
    repeated = compiled_decode(model, compile_config)
    packed_gqa.install()
    compiled: list[bool] = []
    attention = packed_gqa.packed_attention

    def recorded(*args: Any) -> torch.Tensor:
        compiled.append(torch.compiler.is_compiling())
        return attention(*args)

    monkeypatch.setattr(packed_gqa, "packed_attention", recorded)
    return repeated, compiled_decode(model, compile_config), compiled


def test_compiled_decode_step_packs_and_keeps_logits(
    tiny_checkpoint: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the CPU (transformers compiles there when told to), float32: the packed path is traced into the compiled
    step and each step's logits are transformers' to float32 rounding."""
    compile_config = CompileConfig(fullgraph=True)
    compile_config._compile_all_devices = True  # transformers' switch for compiling on the CPU
    repeated, packed, compiled = decode_with_and_without(
        tiny_checkpoint("qwen2_5_vl"), "cpu", compile_config, monkeypatch
    )
    assert compiled and all(compiled)
    assert torch.equal(packed.sequences, repeated.sequences)
    scale = max(logits.abs().max() for logits in repeated.logits)
    for step, (ours, theirs) in enumerate(zip(packed.logits, repeated.logits, strict=True)):
        # two layers of float32 reductions reordered: a few eps of the logits' scale
        assert (ours - theirs).abs().max() <= 16 * torch.finfo(torch.float32).eps * scale, step


@pytest.mark.gpu
def test_compiled_decode_step_packs_on_cuda(
    tiny_checkpoint: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On CUDA in bf16, transformers' own compiled decode (inductor, CUDA graphs): the same greedy tokens, and
    logits to bf16 rounding."""
    assert torch.cuda.is_available(), "a GPU test: run it on the device machine with -m gpu"
    repeated, packed, compiled = decode_with_and_without(tiny_checkpoint("qwen2_5_vl"), "cuda", None, monkeypatch)
    assert compiled and all(compiled)
    assert torch.equal(packed.sequences, repeated.sequences)
    scale = max(logits.abs().max() for logits in repeated.logits)
    for step, (ours, theirs) in enumerate(zip(packed.logits, repeated.logits, strict=True)):
        assert (ours - theirs).abs().max() <= 4 * torch.finfo(torch.bfloat16).eps * scale, step
