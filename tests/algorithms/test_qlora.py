"""QLoRA (``--load_in_4bit`` / ``--load_in_8bit``): on a machine without bitsandbytes or CUDA (CI's) every problem is
one ConfigError (exit 2) before anything loads; the quantisation config keeps the vision tower, projector and LM head
out for every family; the GPU tests (marked gpu) train one step per algorithm on a quantised tiny model."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers
from helpers import FAMILIES, run_resonance, train_argv, write_data
from helpers.rewards import REWARDS
from transformers.quantizers.quantizers_utils import should_convert_module

from resonance.algorithms import quantization
from resonance.algorithms.arguments import ModelArguments
from resonance.algorithms.quantization import INSTALL, quantization_config, quantization_problems
from resonance.base.registry import load_core_mapper
from resonance.commands.train import build_trainer, main, parse
from resonance.errors import EXIT_INPUT, ConfigError


@pytest.fixture
def bare_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """CI's machine, wherever the test runs: bitsandbytes not installed, no CUDA device."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else find_spec(name, *a)
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def qlora_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine with the qlora extra and a GPU, as far as the flag checks can tell."""
    monkeypatch.setattr(quantization, "environment_problems", lambda flag: [])


# -- flags, on a machine without bitsandbytes or CUDA ------------------------------------------------------------


def test_load_in_4bit_without_the_extra_exits_2_before_loading(
    bare_machine: None, tiny_checkpoint: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``resonance train sft --load_in_4bit``: flags parsed, one message naming the flag, the extra and CUDA, exit 2,
    before anything loads (no output folder made)."""
    output_dir = tmp_path / "out"
    argv = train_argv("sft", tiny_checkpoint("llava"), write_data(tmp_path, "sft"), output_dir, load_in_4bit=True)
    assert main("sft", argv) == EXIT_INPUT
    err = capsys.readouterr().err
    assert (
        "error: 2 problems with the flags of resonance train sft:\n"
        f"  --load_in_4bit needs bitsandbytes, which is not installed: {INSTALL}\n"
        "  --load_in_4bit needs a CUDA GPU (bitsandbytes' quantised layers), and torch sees none here\n"
    ) in err
    assert not output_dir.exists()


@pytest.mark.parametrize("algorithm", ["sft", "dpo", "rm", "grpo", "ppo"])
def test_every_algorithm_takes_the_flags(bare_machine: None, algorithm: str, tmp_path: Path) -> None:
    """Every ``resonance train X`` parses the QLoRA flags (no unknown-flag error) and refuses them here."""
    flags = {"load_in_8bit": True} if algorithm == "ppo" else {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"}
    argv = train_argv(algorithm, tmp_path, tmp_path / "rows.jsonl", tmp_path / "out", **flags)
    with pytest.raises(ConfigError, match="needs bitsandbytes") as error:
        parse(algorithm, argv)
    assert "unknown" not in str(error.value)


def test_every_problem_at_once(bare_machine: None, tmp_path: Path) -> None:
    """Both widths, full training, a bad 4-bit type and compute dtype, --use_cpu, the missing extra, and the run's
    other bad flags: one message."""
    argv = train_argv(
        "sft",
        tmp_path,
        tmp_path / "rows.jsonl",
        tmp_path / "out",
        load_in_4bit=True,
        load_in_8bit=True,
        lora_target_modules="none",
        bnb_4bit_quant_type="int3",
        bnb_4bit_compute_dtype="float8",
        use_cpu=True,
        per_device_train_batch_size=0,
    )
    with pytest.raises(ConfigError) as error:
        parse("sft", argv)
    message = str(error.value)
    for part in (
        "--load_in_4bit and --load_in_8bit: give one of them, not both",
        "--load_in_4bit with --lora_target_modules none: quantised weights cannot be trained",
        "--bnb_4bit_quant_type int3: expected one of nf4, fp4",
        "--bnb_4bit_compute_dtype float8: expected one of bfloat16, float16, float32",
        "--load_in_4bit with --use_cpu: bitsandbytes' quantised layers train on a CUDA GPU only",
        "needs bitsandbytes",
        "needs a CUDA GPU",
        "--per_device_train_batch_size 0",
    ):
        assert part in message


def test_flag_combinations(qlora_machine: None) -> None:
    """The checks across flags, on a machine that has everything."""
    assert quantization_problems({"load_in_4bit": True, "lora_target_modules": "auto"}) == []
    assert quantization_problems({"load_in_4bit": False, "lora_target_modules": "none"}) == []
    assert quantization_problems({"bnb_4bit_use_double_quant": True, "bnb_4bit_quant_type": "fp4"}) == [
        "--bnb_4bit_quant_type, --bnb_4bit_use_double_quant: 4-bit settings, they need --load_in_4bit"
    ]
    assert quantization_problems({"load_in_4bit": True, "compile_layers": True}) == [
        "--load_in_4bit with --compile_layers: torch.compile fails on bitsandbytes' quantised layers in training; "
        "leave one of them out"
    ]
    assert quantization_problems({"load_in_8bit": True, "bnb_4bit_compute_dtype": "bfloat16", "use_cpu": True}) == [
        "--bnb_4bit_compute_dtype: 4-bit settings, they need --load_in_4bit",
        "--load_in_8bit with --use_cpu: bitsandbytes' quantised layers train on a CUDA GPU only",
    ]


def test_model_arguments_refuse_on_their_own(bare_machine: None) -> None:
    """Code that builds ModelArguments without the command line gets the same refusal."""
    with pytest.raises(ConfigError, match="--load_in_4bit needs bitsandbytes"):
        ModelArguments(model_name_or_path="ckpt", load_in_4bit=True)


# -- what is quantised, for every family (the config and transformers' own matcher: no bitsandbytes needed) ------


@pytest.mark.parametrize("family", FAMILIES)
def test_only_the_language_model_is_quantised(
    qlora_machine: None, family: str, tiny_checkpoint: Callable[[str], Path]
) -> None:
    """transformers converts a Linear unless ``llm_int8_skip_modules`` matches its name (``should_convert_module``,
    what ``replace_with_bnb_linear`` asks): every Linear under the language model is converted; none in the vision
    tower, the projector or elsewhere, nor the LM head."""
    ckpt = tiny_checkpoint(family)
    model_cls = load_core_mapper(ckpt).model
    config = quantization_config(model_cls, vars(ModelArguments(str(ckpt), load_in_4bit=True)), torch.bfloat16)
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_compute_dtype == torch.bfloat16  # the run's precision by default
    with torch.device("meta"):
        model = getattr(transformers, model_cls.hf_model_class)._from_config(
            transformers.AutoConfig.from_pretrained(ckpt)
        )
    linears = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    converted = {name for name in linears if should_convert_module(name, config.llm_int8_skip_modules)}
    language_model = model_cls.language_model_path + "."
    expected = {name for name in linears if name.startswith(language_model) and not name.endswith("lm_head")}
    assert converted and converted == expected
    assert any(name.startswith(model_cls.vision_tower_path + ".") for name in linears)  # the check is not vacuous


# -- one quantised step per algorithm (GPU) ----------------------------------------------------------------------


def _quantised_step(algorithm: str, ckpt: Path, tmp_path: Path, **flags: object) -> None:
    """One bf16 step of ``algorithm`` with ``flags`` (``load_in_4bit`` or ``load_in_8bit``): the language model's
    LoRA-wrapped Linear layers are bitsandbytes layers of that width, the vision tower's and the LM head are plain
    Linear, and every LoRA B matrix moved."""
    import bitsandbytes as bnb
    from peft.tuners.lora import LoraLayer

    quantised = bnb.nn.Linear4bit if flags.get("load_in_4bit") else bnb.nn.Linear8bitLt
    kind = algorithm if algorithm in ("sft", "dpo", "rm") else "prompt"
    online = {"reward_funcs": f"{REWARDS}:token_sum_reward", "learning_rate": "1e-3"} if kind == "prompt" else {}
    argv = train_argv(algorithm, ckpt, write_data(tmp_path, kind), tmp_path / "out", bf16=True, **online, **flags)
    trainer, _ = build_trainer(algorithm, *parse(algorithm, argv))
    model = trainer.policy if algorithm == "ppo" else trainer.model
    model_cls = trainer.vl_model

    language_model = model_cls.get_language_model(model)
    lora = [module for module in language_model.modules() if isinstance(module, LoraLayer)]
    assert lora and all(isinstance(module.get_base_layer(), quantised) for module in lora)
    tower_linears = [m for m in model_cls.get_vision_tower(model).modules() if isinstance(m, torch.nn.Linear)]
    assert tower_linears and not any(isinstance(m, quantised) for m in tower_linears)
    heads = [m for name, m in model.named_modules() if name.endswith("lm_head")]
    assert heads and not any(isinstance(m, quantised) for m in heads)

    lora_b = {name: p.detach().clone() for name, p in model.named_parameters() if ".lora_B.default." in name}
    assert lora_b and all(p.requires_grad for name, p in model.named_parameters() if name in lora_b)
    trainer.train()
    after = dict(model.named_parameters())
    moved = [name for name, before in lora_b.items() if not torch.equal(after[name], before)]
    assert moved, "no LoRA B matrix trained"
    history = trainer.log_history if algorithm == "ppo" else trainer.state.log_history
    key = "policy_loss" if algorithm == "ppo" else "loss"
    values = [entry[key] for entry in history if key in entry]
    assert values and all(torch.isfinite(torch.tensor(values)))


@pytest.mark.gpu
@pytest.mark.parametrize("algorithm", ["sft", "dpo", "rm", "grpo", "ppo"])
def test_one_4bit_step_on_cuda(algorithm: str, tiny_checkpoint, tmp_path: Path) -> None:
    """QLoRA: one step of each algorithm on a 4-bit (nf4, double-quantised) LLaVA."""
    flags = {"load_in_4bit": True, "bnb_4bit_use_double_quant": True}
    _quantised_step(algorithm, tiny_checkpoint("llava"), tmp_path, **flags)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["qwen2_vl", "idefics3"])
def test_one_4bit_sft_step_on_other_families(family: str, tiny_checkpoint, tmp_path: Path) -> None:
    """Families whose vision tower and projector sit elsewhere (Qwen's merger inside the tower, Idefics3's
    connector): fp4 with a float32 compute dtype."""
    flags = {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "bnb_4bit_compute_dtype": "float32"}
    _quantised_step("sft", tiny_checkpoint(family), tmp_path, **flags)


@pytest.mark.gpu
def test_one_8bit_step_on_cuda(tiny_checkpoint, tmp_path: Path) -> None:
    """LLM.int8(): the same step with 8-bit language-model layers."""
    _quantised_step("sft", tiny_checkpoint("llava"), tmp_path, load_in_8bit=True)


@pytest.mark.gpu
def test_4bit_run_through_the_command_saves_an_adapter_that_reloads(tiny_checkpoint, tmp_path: Path) -> None:
    """``resonance train sft --load_in_4bit`` as users run it: exit 0, a LoRA adapter saved, and that folder loads
    back (on an unquantised base) with trained LoRA B matrices."""
    from resonance.base.model import VLModel

    ckpt, output_dir = tiny_checkpoint("llava"), tmp_path / "out"
    argv = train_argv("sft", ckpt, write_data(tmp_path, "sft"), output_dir, bf16=True, load_in_4bit=True)
    result = run_resonance("train", "sft", *argv, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in output_dir.iterdir()}
    model_cls: type[VLModel] = load_core_mapper(ckpt).model
    reloaded = model_cls.from_pretrained(output_dir, dtype=torch.float32)
    lora_b = [p for name, p in reloaded.named_parameters() if ".lora_B." in name]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)
