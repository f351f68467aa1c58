"""Checkpoint -> adapter (``config.json`` architectures[0] -> the registry of the adapters in use -> core_mapper);
LoRA -> base. The adapters in use are the packaged ones (``resonance.generated``) or a project's own
``generated/`` (:func:`use_adapters`)."""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from resonance import codegen
from resonance.errors import CheckpointError, ConfigError, UnsupportedModelError
from resonance.generated.registry import FLASH_ATTN_MODELS, MODEL_NICKNAME_MAP

__all__ = [
    "FLASH_ATTN_MODELS",
    "MODEL_NICKNAME_MAP",
    "Adapters",
    "ModelCoreMapper",
    "adapters_in_use",
    "load_core_mapper",
    "use_adapters",
]

logger = logging.getLogger("resonance")

PACKAGED = "resonance.generated"
PROJECT_PACKAGE = "resonance_project"  # the name a project's generated/ is imported under


@dataclass(frozen=True)
class Adapters:
    """A set of generated adapters: the package they import from, its architecture map, and where they come from."""

    package: str
    architectures: dict[str, str]  # config.json architectures[0] -> adapter name (the registry's MODEL_NICKNAME_MAP)
    where: str  # in words, for messages
    packaged: bool


_PACKAGED = Adapters(PACKAGED, MODEL_NICKNAME_MAP, "the specs packaged with resonance", packaged=True)
_in_use = _PACKAGED


def adapters_in_use() -> Adapters:
    """The adapters checkpoints are served by in this process: the packaged ones unless :func:`use_adapters` chose
    a project's."""
    return _in_use


def _forget_project_package() -> None:
    """Drop a previously imported project's adapters, so that another project's can be imported under the same name."""
    for name in [n for n in sys.modules if n == PROJECT_PACKAGE or n.startswith(PROJECT_PACKAGE + ".")]:
        del sys.modules[name]


def _import_project(root: Path) -> Adapters:
    folder = root / codegen.OUTPUT_DIR
    if not (folder / "registry.py").is_file():
        raise ConfigError(
            f"the project {root} has specs/ but no compiled adapters ({codegen.OUTPUT_DIR}/registry.py): run "
            f"`resonance scaffold --project {root}`, or use the packaged specs with --project {codegen.packaged_root()}"
        )
    drift = codegen.compare(codegen.plan(root)).problems()
    if drift:
        raise ConfigError(
            f"the project {root}: {codegen.OUTPUT_DIR}/ is not what its specs compile to ({'; '.join(drift)}); run "
            f"`resonance scaffold --project {root}` (`resonance check` shows the diff), so training uses the specs "
            "as written"
        )
    current = sys.modules.get(PROJECT_PACKAGE)
    if current is None or list(getattr(current, "__path__", [])) != [str(folder)]:
        _forget_project_package()
        spec = importlib.util.spec_from_file_location(
            PROJECT_PACKAGE, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )
        package = importlib.util.module_from_spec(spec)
        sys.modules[PROJECT_PACKAGE] = package
        spec.loader.exec_module(package)
    if str(root) not in sys.path:  # override modules (a spec's overrides.module) are named from the project folder
        sys.path.insert(0, str(root))
    registry = importlib.import_module(f"{PROJECT_PACKAGE}.registry")
    return Adapters(PROJECT_PACKAGE, dict(registry.MODEL_NICKNAME_MAP), f"the project {root}", packaged=False)


def use_adapters(project: str | Path | None) -> Adapters:
    """Serve checkpoints from the adapters of the specs in use (:func:`resonance.codegen.spec_source`): the
    project ``project`` names, else the one found from the current folder, else the packaged ones. A project's
    ``generated/`` must be what its specs compile to (a ConfigError naming the files and the fix otherwise)."""
    global _in_use
    source = codegen.spec_source(None if project is None else Path(project))
    _in_use = _PACKAGED if source.packaged else _import_project(source.root)
    if not _in_use.packaged:
        logger.info("adapters: %s (%s/)", _in_use.where, codegen.OUTPUT_DIR)
    return _in_use


@dataclass(frozen=True)
class ModelCoreMapper:
    """Every component of one family's adapter (the seed's ``core_mapper``); generated adapters fill every slot
    (the slots are :data:`resonance.codegen.hooks.SLOTS`)."""

    model: Any
    processor: Any
    sft_collator: Any
    sft_trainer: Any
    dpo_collator: Any
    dpo_trainer: Any
    reward_model: Any
    reward_collator: Any
    reward_trainer: Any
    value_model: Any
    ppo_collator: Any
    ppo_trainer: Any
    grpo_trainer: Any


def read_json_object(file: Path) -> dict[str, Any]:
    """A checkpoint's JSON file as a dict, or a CheckpointError naming the file and what is wrong with it."""
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{file}: not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file}: cannot be read ({exc})") from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(
            f"{file}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); save the checkpoint again "
            "with save_pretrained or restore the file"
        ) from exc
    if not isinstance(value, dict):
        raise CheckpointError(f"{file}: holds a JSON {type(value).__name__}, not an object of settings")
    return value


def lora_base_checkpoint(path: str | Path) -> Path | None:
    """For a LoRA output folder (``adapter_config.json``), the base checkpoint it was trained on; else None.

    The one place a LoRA folder is followed to its base model: for the architecture, the weights, the processor
    and the reward model that shares the policy's backbone.
    """
    adapter = Path(path) / "adapter_config.json"
    if not adapter.is_file():
        return None
    base = read_json_object(adapter).get("base_model_name_or_path")
    if not base or not isinstance(base, str):
        raise CheckpointError(f"{adapter}: names no base_model_name_or_path, so its base model cannot be found")
    return Path(base)


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # owner/name, as the Hugging Face Hub spells it


def checkpoint_folder(path: str | Path, named_by: str = "") -> Path:
    """``path`` when it is a folder; else a CheckpointError saying so, and for a Hub id (``owner/name``) how to get
    the checkpoint: Resonance reads checkpoints from folders only, so it never downloads one behind a run's back.
    ``named_by`` says where the path came from (a file and field) when it did not come from the command line."""
    folder = Path(path)
    if folder.is_dir():
        return folder
    where = f"{named_by} {path}" if named_by else str(path)
    if HUB_ID.fullmatch(str(path)):
        raise CheckpointError(
            f"{where}: no such folder; it looks like a Hugging Face Hub id, and checkpoints are read from folders: "
            f"download it where the Hub is reachable (`hf download {path} --local-dir {folder.name}`), then pass "
            "that folder"
        )
    raise CheckpointError(f"{where}: no such folder; give a checkpoint folder (as save_pretrained writes it)")


MAX_STACKED_ADAPTERS = 16  # LoRA outputs trained one from another (SFT, then DPO on it, ...)


def base_model_checkpoint(path: str | Path) -> Path:
    """The folder holding the base model's config.json and weights: ``path`` itself, or for a LoRA output folder its
    base, followed through outputs trained from other outputs (each adapter names the previous output as its base)."""
    path = Path(path)
    seen = [path.resolve()]
    while not (path / "config.json").is_file():
        base = lora_base_checkpoint(path)
        if base is None:
            return path
        checkpoint_folder(base, named_by=f"{path / 'adapter_config.json'}: base_model_name_or_path")
        if base.resolve() in seen or len(seen) > MAX_STACKED_ADAPTERS:
            chain = " -> ".join(str(p) for p in [*seen, base.resolve()])
            raise CheckpointError(f"{path / 'adapter_config.json'}: its base models go round in a circle ({chain})")
        seen.append(base.resolve())
        path = base
    return path


def processor_checkpoint(path: str | Path) -> Path:
    """Where a checkpoint's processor is: the folder itself, or for a LoRA folder saved without one, its base."""
    path = Path(path)
    for _ in range(MAX_STACKED_ADAPTERS + 1):
        has_processor = any((path / name).is_file() for name in ("processor_config.json", "tokenizer_config.json"))
        base = None if has_processor else lora_base_checkpoint(path)
        if base is None:
            return path
        path = base
    return path


def checkpoint_architecture(path: str | Path) -> str:
    """``architectures[0]`` of a checkpoint, following a LoRA output folder to its base model."""
    config_file = base_model_checkpoint(checkpoint_folder(path)) / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{config_file}: not found; --model_name_or_path must be a checkpoint folder")
    architectures = read_json_object(config_file).get("architectures")
    if not (isinstance(architectures, list) and architectures and all(isinstance(a, str) for a in architectures)):
        raise CheckpointError(
            f"{config_file}: 'architectures' must list the model class, like [\"LlavaForConditionalGeneration\"] "
            f"(got {architectures!r}); it chooses the adapter"
        )
    return architectures[0]


WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
PROCESSOR_CONFIGS = ("processor_config.json", "preprocessor_config.json")


def _safetensors_problem(file: Path) -> str | None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt"):
            return None
    except (SafetensorError, OSError) as exc:
        return f"{file}: not a complete safetensors file ({exc}); copy or save the weights again"


def check_weights(path: str | Path, weights: tuple[str, ...] = WEIGHTS) -> None:
    """A CheckpointError unless ``path`` holds complete weights: ``model.safetensors`` (its header and data all
    there), or an index whose every shard is present and complete, or PyTorch weights."""
    folder = Path(path)
    present = [name for name in weights if (folder / name).is_file()]
    if not present:
        raise CheckpointError(
            f"{folder}: no weights; expected {' or '.join(weights[:2])} (as save_pretrained writes them)"
        )
    name = present[0]
    if name.endswith(".index.json"):
        weight_map = read_json_object(folder / name).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{folder / name}: has no 'weight_map' naming the shards")
        shards = sorted({str(shard) for shard in weight_map.values()})
        missing = [shard for shard in shards if not (folder / shard).is_file()]
        if missing:
            raise CheckpointError(f"{folder / name}: names shards that are missing: {', '.join(missing)}")
        files = [folder / shard for shard in shards if shard.endswith(".safetensors")]
    else:
        files = [folder / name] if name.endswith(".safetensors") else []
    for file in files:
        problem = _safetensors_problem(file)
        if problem:
            raise CheckpointError(problem)


def check_processor_files(path: str | Path) -> None:
    """A CheckpointError unless ``path`` holds a tokenizer and a processor configuration, every JSON file valid."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not found; the processor is loaded from the checkpoint folder")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(
            f"{folder}: no tokenizer files; expected tokenizer.json (as processor.save_pretrained writes it)"
        )
    if not any((folder / name).is_file() for name in PROCESSOR_CONFIGS):
        raise CheckpointError(
            f"{folder}: no processor configuration; expected processor_config.json or preprocessor_config.json "
            "(as processor.save_pretrained writes them)"
        )
    for name in ("tokenizer.json", "tokenizer_config.json", *PROCESSOR_CONFIGS, "special_tokens_map.json"):
        if (folder / name).is_file():
            read_json_object(folder / name)


def load_core_mapper(path: str | Path) -> ModelCoreMapper:
    """The adapter for a checkpoint folder, or an error listing what is supported."""
    architecture = checkpoint_architecture(path)
    adapters = adapters_in_use()
    name = adapters.architectures.get(architecture)
    if name is None:
        supported = "\n  ".join(f"{arch} ({nick})" for arch, nick in sorted(adapters.architectures.items()))
        elsewhere = (
            ""
            if adapters.packaged or architecture not in MODEL_NICKNAME_MAP
            else f"The packaged specs serve it: pass --project {codegen.packaged_root()}, or copy its spec into "
            "the project's specs/ and run `resonance scaffold`.\n"
        )
        raise UnsupportedModelError(
            f"{path}: architecture {architecture!r} has no Resonance adapter in {adapters.where}. "
            f"Supported:\n  {supported}\n"
            f"{elsewhere}To add one, write specs/<name>.yaml for it and run `resonance scaffold specs/<name>.yaml`."
        )
    return importlib.import_module(f"{adapters.package}.{name}").core_mapper
