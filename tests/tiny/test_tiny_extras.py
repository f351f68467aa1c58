"""resonance.tiny's extra knobs: tiny.parameters, tokenizer.pre_tokenizer_pattern, tiny.extra_tokenizers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from helpers import REPO

from resonance.codegen.project import load_specs
from resonance.codegen.schema import Tiny, TinyTokenizer, WordpieceTokenizer
from resonance.tiny import (
    TinyRecipe,
    build_extra_tokenizer,
    build_processor_and_config,
    build_tiny,
    build_tokenizer,
    set_parameters,
    tiny_from_spec,
)

LLAMA3_SPLIT = (  # tokenizer.json pre_tokenizer of Llama 3
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
WORDPIECE = WordpieceTokenizer(
    kind="wordpiece",
    vocab_size=150,
    pad_token="[PAD]",
    unk_token="[UNK]",
    cls_token="[CLS]",
    sep_token="[SEP]",
    special_tokens=["[DEC]"],
)


def _tiny(name: str) -> TinyRecipe:
    ((_, spec),) = load_specs([REPO / "specs" / f"{name}.yaml"], REPO)
    return tiny_from_spec(spec)


# -- tiny.parameters -----------------------------------------------------------------------------


def test_parameters_fill_matching_names_only() -> None:
    model = torch.nn.ModuleDict({"a": torch.nn.Linear(2, 2), "b": torch.nn.Linear(2, 2)})
    other = model["b"].weight.detach().clone()
    set_parameters(model, {"a.*": 0.5})
    assert torch.all(model["a"].weight == 0.5) and torch.all(model["a"].bias == 0.5)
    assert torch.equal(model["b"].weight, other)
    with pytest.raises(ValueError, match="matches no parameter"):
        set_parameters(model, {"*.gate": 1.0})


def test_parameters_reach_the_saved_checkpoint(tmp_path: Path) -> None:
    """Mllama's zero-initialised tanh gates are opened in the tiny checkpoint, so images reach the text."""
    tiny = _tiny("mllama")
    assert tiny.parameters
    model = transformers.MllamaForConditionalGeneration.from_pretrained(build_tiny(tiny, tmp_path / "m"))
    gates = {name: p for name, p in model.named_parameters() if name.endswith("cross_attn_attn_gate")}
    assert gates and all(torch.all(p == 0.5) for p in gates.values())
    tiny = tiny.model_copy(update={"parameters": {}})
    closed = transformers.MllamaForConditionalGeneration.from_pretrained(build_tiny(tiny, tmp_path / "z"))
    assert all(torch.all(p == 0) for n, p in closed.named_parameters() if n.endswith("cross_attn_attn_gate"))


def test_schema_defaults_are_empty() -> None:
    tiny = Tiny(config_class="LlavaConfig", image_processor_class="CLIPImageProcessorPil", chat_template="x")
    assert tiny.parameters == {} and tiny.extra_tokenizers == {}


# -- tokenizer.pre_tokenizer_pattern -------------------------------------------------------------


def test_pre_tokenizer_pattern_keeps_llama3_newlines_whole() -> None:
    """Llama 3's split regex makes "\\n\\n" one piece whatever follows; GPT-2's (the default) splits it before a
    letter, so a header's "\\n\\n" would tokenize differently at the end of a prompt and inside a turn."""
    spec = TinyTokenizer(vocab_size=300, bos_token="<s>", special_tokens=["<|end_header_id|>"])
    template = "{{ header }}\n\n" * 20  # the text between its tags joins the corpus: "\n\n" gets a merge
    llama3 = build_tokenizer(spec.model_copy(update={"pre_tokenizer_pattern": LLAMA3_SPLIT}), template)
    gpt2 = build_tokenizer(spec, template)
    prompt, turn = "<|end_header_id|>\n\n", "<|end_header_id|>\n\nA cat."
    ids = llama3(prompt, add_special_tokens=False)["input_ids"]
    assert llama3(turn, add_special_tokens=False)["input_ids"][: len(ids)] == ids
    gpt2_ids = gpt2(prompt, add_special_tokens=False)["input_ids"]
    assert gpt2(turn, add_special_tokens=False)["input_ids"][: len(gpt2_ids)] != gpt2_ids
    assert llama3.decode(llama3(turn, add_special_tokens=False)["input_ids"]) == turn


# -- tiny.extra_tokenizers -----------------------------------------------------------------------


def test_wordpiece_tokenizer_is_bert_like() -> None:
    tokenizer = build_extra_tokenizer(WORDPIECE)
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("What is SHOWN?")["input_ids"])
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]"
    assert "what" in tokens and "?" in tokens  # lower-cased, punctuation split off
    assert tokenizer.convert_tokens_to_ids(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[DEC]"]) == [0, 1, 2, 3, 4]
    assert tokenizer.pad_token_id == 0
    assert tokenizer.convert_ids_to_tokens(tokenizer("What")["input_ids"])[1] == "what"
    cased = build_extra_tokenizer(WORDPIECE.model_copy(update={"lowercase": False}))
    assert cased.convert_ids_to_tokens(cased("What")["input_ids"])[1] != "what"


def test_extra_tokenizer_fills_processor_and_config(tmp_path: Path) -> None:
    tiny = _tiny("instructblip")
    processor, config = build_processor_and_config(tiny)
    qformer = processor.qformer_tokenizer
    assert config.qformer_config.vocab_size == len(qformer)
    assert config.qformer_config.pad_token_id == qformer.convert_tokens_to_ids("[PAD]")
    # Saved in the processor's subfolder and loaded back by AutoProcessor.
    out = build_tiny(tiny, tmp_path / "ib")
    reloaded = transformers.AutoProcessor.from_pretrained(out).qformer_tokenizer
    assert reloaded.get_vocab() == qformer.get_vocab()
    assert reloaded("a cat")["input_ids"] == qformer("a cat")["input_ids"]


def test_missing_extra_tokenizer_is_named() -> None:
    tiny = _tiny("instructblip").model_copy(update={"extra_tokenizers": {}})
    with pytest.raises(ValueError, match="qformer_tokenizer: describe it in tiny.extra_tokenizers"):
        build_processor_and_config(tiny)


# -- tokenizer.config_token_ids lists, tiny.derived ---------------------------------------------------------------


def test_token_id_lists_and_derived_sizes_reach_the_config() -> None:
    recipe = _tiny("qwen2_vl")
    tokenizer = recipe.tokenizer.model_copy(
        update={
            "config_token_ids": {**recipe.tokenizer.config_token_ids, "eos_token_id": ["<|im_end|>", "<|im_start|>"]}
        }
    )
    derived = {
        "text_config.max_window_layers": "tokenizer.length",  # any int field of the text config will do here
        "vision_config.embed_dim": "text_config.hidden_size",
        "vision_config.hidden_size": "vision_config.embed_dim",  # read before any derived value is set
    }
    _, config = build_processor_and_config(recipe.model_copy(update={"tokenizer": tokenizer, "derived": derived}))
    _, plain = build_processor_and_config(recipe)
    processor_tokenizer = build_tokenizer(recipe.tokenizer, recipe.chat_template)
    ids = [processor_tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|im_start|>")]
    assert config.eos_token_id == ids and len(set(ids)) == 2
    assert config.text_config.max_window_layers == len(processor_tokenizer) != plain.text_config.max_window_layers
    assert config.vision_config.embed_dim == plain.text_config.hidden_size != plain.vision_config.embed_dim
    assert config.vision_config.hidden_size == plain.vision_config.embed_dim


def test_a_derived_source_that_is_no_config_value_is_named() -> None:
    recipe = _tiny("qwen2_vl").model_copy(update={"derived": {"vision_config.embed_dim": "text_config.no_such_size"}})
    with pytest.raises(ValueError, match=r"tiny.derived: 'text_config.no_such_size' .*'no_such_size' is missing"):
        build_processor_and_config(recipe)


def test_token_lists_are_validated_like_tokens() -> None:
    with pytest.raises(ValueError, match="at least 1 item"):
        TinyTokenizer(config_token_ids={"eos_token_id": []})
    with pytest.raises(ValueError, match="not a single token"):
        build_processor_and_config(
            _tiny("qwen2_vl").model_copy(
                update={
                    "tokenizer": _tiny("qwen2_vl").tokenizer.model_copy(update={"config_token_ids": {"x": ["<nope>"]}})
                }
            )
        )


def test_a_variant_without_its_own_video_processor_gets_its_processor_s() -> None:
    # transformers 5.24 maps no video processor to glm4v_moe (GLM-4.5V), whose processor is glm4v's Glm4vProcessor
    from resonance.tiny import _default_part

    recipe = _tiny("qwen2_vl").model_copy(update={"config_class": "Glm4vMoeConfig"})
    assert type(_default_part(recipe, "Glm4vProcessor", "video_processor")).__name__ == "Glm4vVideoProcessor"
    with pytest.raises(ValueError, match="NoSuchProcessor needs a video processor; none is mapped for glm4v_moe"):
        _default_part(recipe, "NoSuchProcessor", "video_processor")
