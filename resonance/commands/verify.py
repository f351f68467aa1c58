"""``resonance verify SPEC``: compile a spec, build its tiny model, and check the spec against it.

The adapter is compiled in memory from the spec as written (no need to scaffold first), so a spec
can be checked before its generated code exists. Every check names the spec field it proves; a
failure is reported as ``specs/x.yaml:LINE:COL: field: message`` and the command exits 1.
"""

from __future__ import annotations

import math
import tempfile
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from resonance import codegen
from resonance.base.checks import image_output_problems, module_problems, video_output_problems
from resonance.base.model import cast_vision_inputs, per_submodel, unwrap
from resonance.codegen.schema import ModelSpec
from resonance.errors import (
    ChatTemplateError,
    FieldProblem,
    MissingBackendError,
    SpecError,
    SpecMismatchError,
    SpecProblem,
)
from resonance.tiny import build_tiny, tiny_from_spec


@dataclass
class Check:
    name: str
    fields: str  # the spec fields it proves
    problems: list[FieldProblem] = field(default_factory=list)
    error: str | None = None  # an exception that is not a spec problem
    skipped: str | None = None
    warnings: list[str] = field(default_factory=list)  # not failures: what would make the family's tests weak

    @property
    def ok(self) -> bool:
        return not self.problems and self.error is None and self.skipped is None


def compile_adapter(project: Path, spec_path: Path) -> types.ModuleType:
    """The adapter module the spec compiles to, imported from memory as ``resonance.generated.<name>``."""

    plan = codegen.plan(project, [spec_path])
    name = spec_path.stem
    source = plan.files[f"{codegen.OUTPUT_DIR}/{name}/__init__.py"]
    module = types.ModuleType(f"resonance.generated.{name}")
    module.__file__ = str(project / codegen.OUTPUT_DIR / name / "__init__.py")
    exec(compile(source, module.__file__, "exec"), module.__dict__)  # noqa: S102 - our own compiled spec
    return module


def _sample_images(count: int) -> list[Any]:
    from PIL import Image

    images = []
    for seed in range(count):
        width, height = 48 + 16 * seed, 40
        pixels = bytes(
            (x * 5 + y * 3 + c * 70 + 40 * seed) % 256 for y in range(height) for x in range(width) for c in range(3)
        )
        images.append(Image.frombytes("RGB", (width, height), pixels))
    return images


def _sample_video(vl_processor: Any) -> Any:
    """A 4 fps clip of 48 x 40 frames (a moving gradient; 8 frames, or the spec's num_frames where more), decoded as
    the collator decodes a file: at the frames the family's video processor samples."""
    import numpy as np
    from transformers.video_utils import VideoMetadata

    from resonance.data.videos import LoadedVideo

    count = max(8, vl_processor.video.num_frames or 0)
    y, x = np.mgrid[0:40, 0:48]
    frames = np.stack(
        [np.stack([(x * 5 + 9 * t) % 256, (y * 3) % 256, (x + y + 30 * t) % 256], -1) for t in range(count)]
    )
    metadata = VideoMetadata(count, 4.0, 48, 40, count / 4.0, "pyav")
    indices = vl_processor.frame_indices(metadata)
    metadata.frames_indices = indices
    return LoadedVideo(frames.astype(np.uint8)[indices], metadata)


def _conversation(num_images: int, answer: str | None) -> list[dict[str, Any]]:
    content = [{"type": "image", "text": None}] * num_images + [{"type": "text", "text": "What is shown here?"}]
    messages = [{"role": "user", "content": content}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def run_checks(spec: ModelSpec, adapter: types.ModuleType, checkpoint: Path) -> list[Check]:
    """Load ``checkpoint`` through the adapter and check every spec field that can be checked."""
    import transformers

    mapper = adapter.core_mapper
    vl_model, vl_processor_cls = mapper.model, mapper.processor
    checks: list[Check] = []
    state: dict[str, Any] = {}

    def run(name: str, fields: str, body: Callable[[], list[FieldProblem] | None], needs: tuple[str, ...] = ()):
        check = Check(name, fields)
        missing = [key for key in needs if key not in state]
        if missing:
            check.skipped = f"needs {', '.join(missing)}"
        else:
            try:
                check.problems = body() or []
            except SpecMismatchError as exc:
                check.problems = exc.problems
            except Exception as exc:  # noqa: BLE001 - reported as the check's failure
                check.error = f"{type(exc).__name__}: {exc}"
        checks.append(check)

    def load_model() -> list[FieldProblem]:
        # The model as Resonance loads it (VLModel.from_pretrained), without raising at the first bad field
        model_class = getattr(transformers, vl_model.hf_model_class)
        config = model_class.config_class.from_pretrained(str(checkpoint))
        attention = per_submodel(config, "sdpa")
        model = model_class.from_pretrained(str(checkpoint), attn_implementation=attention, use_kernels=False)
        state["model"] = model.eval()
        problems = module_problems(vl_model, unwrap(model))
        if not any(p.field == "modules.vision_tower" for p in problems):
            state["vision tower"] = True
            cast_vision_inputs(vl_model.get_vision_tower(model))
        return problems

    def load_processor() -> None:
        state["processor"] = vl_processor_cls(checkpoint)

    def system() -> list[FieldProblem]:
        processor = state["processor"]
        conversation = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}, *_conversation(1, "A")]
        try:
            processor.render_conversation(conversation, add_generation_prompt=False)
        except ChatTemplateError as exc:
            message = f"the template refuses a system message ({exc}); set false"
            return [FieldProblem("chat_template.system", message)] if processor.takes_system else []
        if not processor.takes_system:
            return [FieldProblem("chat_template.system", "false, but the template renders a system message")]
        return []

    def images_lead() -> list[FieldProblem]:
        processor = state["processor"]
        if not processor.images_lead:
            return []
        later = [*_conversation(0, "A"), *_conversation(1, "B")]  # the image in the second user message
        first = [*_conversation(1, "A"), *_conversation(0, "B")]
        if processor.render_conversation(later, False) != processor.render_conversation(first, False):
            message = "leading, but an image renders otherwise in the second user message than in the first"
            return [FieldProblem("chat_template.images", message)]
        return []

    def process() -> list[FieldProblem]:
        processor = state["processor"]
        count = 2 if spec.image.multi_image else 1
        other = 1 if spec.image.required else 0  # a row without images, unless the family needs one in every row
        batch = processor.process_batch_conv(
            [_conversation(count, "A red chair."), _conversation(other, "Nothing.")],
            [_sample_images(count), _sample_images(other)],
        )
        problems = image_output_problems(processor, batch)
        if not (batch["labels"] != -100).any(1).all():
            problems.append(FieldProblem("chat_template", "an assistant turn got no supervised tokens"))
        state["batch"] = batch
        return problems

    def video() -> list[FieldProblem]:
        processor = state["processor"]
        conversation = _conversation(0, "It moves.")
        conversation[0]["content"].insert(0, {"type": "video", "text": None})
        batch = processor.process_batch_conv(
            [conversation, _conversation(0, "Nothing.")], [[], []], videos=[[_sample_video(processor)], []]
        )
        problems = video_output_problems(processor, batch)
        if problems or "model" not in state:
            return problems
        with torch.no_grad():
            loss = state["model"](**batch).loss
        if not math.isfinite(loss.item()):
            return [FieldProblem("video.inputs", f"the model's loss on a batch with a video is {loss.item()}")]
        return []

    def forward() -> list[FieldProblem]:
        with torch.no_grad():
            out = state["model"](**state["batch"])
        loss = out.loss
        state["logits"] = out.logits
        if not math.isfinite(loss.item()):
            return [FieldProblem("image.inputs", f"the model's loss on a processed batch is {loss.item()}")]
        return []

    def oracle() -> list[FieldProblem]:
        state["warnings"] = degenerate(state["logits"], state["batch"])
        return []

    def freeze() -> list[FieldProblem]:
        model = state["model"]
        vl_model.freeze_vision_tower(model)
        tower = vl_model.get_vision_tower(model)
        if any(p.requires_grad for p in tower.parameters()):
            return [FieldProblem("modules.vision_tower", "freeze_vision_tower left trainable weights in the tower")]
        return []

    def lora() -> list[FieldProblem]:
        from peft import LoraConfig, get_peft_model

        model = state["model"]
        problems = []
        target = vl_model.lora_target_modules(vl_model.default_lora_target)
        experts = vl_model.lora_target_parameters(model, vl_model.default_lora_parameters)
        for index, ending in enumerate(vl_model.default_lora_parameters):
            if not vl_model.lora_target_parameters(model, [ending]):
                message = f"{ending!r} ends no parameter name under {vl_model.language_model_path}"
                problems.append(FieldProblem(f"lora.parameters.{index}", message))
        routers = vl_model.router_modules(model)
        if vl_model.router_paths and not routers:
            problems.append(FieldProblem("moe.router", f"no module under {vl_model.language_model_path} ends so"))
        config = LoraConfig(r=4, lora_alpha=8, target_modules=target, target_parameters=experts or None)
        peft_model = get_peft_model(model, config)
        trained = [n for n, p in peft_model.named_parameters() if p.requires_grad]
        outside = [n for n in trained if f".{vl_model.language_model_path}." not in f".{n}"]
        if not trained:
            problems.append(FieldProblem("lora.targets", f"the LoRA regex {target!r} matched no module"))
        if outside:
            problems.append(FieldProblem("lora.targets", f"LoRA weights outside the language model: {outside[:3]}"))
        # every module the targets name got its LoRA layer: peft 0.21 rewrites the targets of some mixture-of-experts
        # model types (glm4v_moe, qwen3_moe...), dropping the MLP ones for the experts' parameters
        from peft.tuners.lora import LoraLayer

        prefix, targets = vl_model.language_model_path + ".", set(vl_model.default_lora_target)
        named = [n for n, _ in model.named_modules() if n.startswith(prefix) and n.rsplit(".", 1)[-1] in targets]
        bare = [n for n in named if not isinstance(peft_model.base_model.model.get_submodule(n), LoraLayer)]
        if bare:
            problems.append(FieldProblem("lora.targets", f"peft put no LoRA layer on {bare[:3]} ({len(bare)} in all)"))
        missed = sorted(set(experts) - set(peft_model.base_model.targeted_parameter_names))
        if missed:
            problems.append(FieldProblem("lora.parameters", f"LoRA did not reach the expert weights {missed[:3]}"))
        on_routers = [n for n in trained if any(f".{router}." in f".{n}" for router in routers)]
        if on_routers:
            problems.append(FieldProblem("moe.router", f"LoRA reached the routers: {on_routers[:3]}"))
        state["model"] = peft_model.unload()  # the plain model again, for generation
        return problems

    def generate() -> list[FieldProblem]:
        processor, model = state["processor"], state["model"]
        processor.infer()
        try:
            text = processor.render_conversation(_conversation(1, None), add_generation_prompt=True)
            inputs = processor(text=[text], images=[_sample_images(1)])
            kwargs = vl_model.prepare_default_generation_kwargs(model.generation_config)
            kwargs.update(max_new_tokens=3, do_sample=False)
            with torch.no_grad():
                out = model.generate(**inputs, **kwargs)
        finally:
            processor.train()
        if out.shape[1] <= inputs["input_ids"].shape[1]:
            return [FieldProblem("generation", "generate() returned no new tokens")]
        if processor.stop_token is not None:  # what training teaches to end an answer must end generation
            stop_id = processor.tokenizer.convert_tokens_to_ids(processor.stop_token)
            eos = kwargs.get("eos_token_id")
            if stop_id not in (eos if isinstance(eos, list) else [eos]):
                message = (
                    f"{processor.stop_token!r} (id {stop_id}) is not among the ids generation stops at ({eos}): the "
                    "model's generation_config (eos_token_id) must list it"
                )
                return [FieldProblem("chat_template.stop_token", message)]
        return []

    run("model loads; module paths and LoRA targets exist", "modules, lora.targets", load_model)
    run("processor loads; image token is a token", "processor_class, image.token, chat_template", load_processor)
    run("the template takes a system message as the spec says", "chat_template.system", system, ("processor",))
    run("images lead the rendering as the spec says", "chat_template.images", images_lead, ("processor",))
    run(
        "processor outputs the image inputs; labels cover answers", "image.inputs, image.token", process, ("processor",)
    )
    run("forward on the processed batch gives a finite loss", "image.inputs", forward, ("model", "batch"))
    if spec.video is not None:
        run("a video is processed and forwarded as the spec says", "video", video, ("processor",))
    run("the tiny model gives the oracle tests differences to compare", "tiny", oracle, ("logits",))
    checks[-1].warnings = state.pop("warnings", [])
    run("freeze_vision_tower freezes the tower", "modules.vision_tower", freeze, ("model", "vision tower"))
    fields = "lora.targets, lora.parameters, moe.router, modules.language_model"
    run("LoRA auto touches only the language model, experts and never routers", fields, lora, ("model",))
    fields = "generation, padding_side.infer, chat_template.stop_token"
    run("generate with the default kwargs; it stops at the stop token", fields, generate, ("model", "processor"))
    return checks


# Below these, a tiny model's outputs are too flat for the tests that compare log-prob differences (DPO loss and
# gradients against TRL, the step tests' "the weights moved" guards): the shipped families' tiny models spread their
# logits at the answers by about 0.16 over the vocabulary and vary them by about as much from token to token.
MIN_LOGIT_SPREAD = 0.01
MIN_LOGIT_VARIATION = 0.01


def degenerate(logits: torch.Tensor, batch: Any) -> list[str]:
    """What makes a tiny configuration degenerate for the oracle tests, read from a forward pass on verify's batch
    (two rows: one with images, one with fewer or none): near-uniform logits at the answer tokens, logits that
    hardly change from one answer token to the next, rows that collate to the same length (no padding to test)."""
    supervised = batch["labels"][:, 1:] != -100
    scores = logits[:, :-1][supervised].double()
    warnings = []
    spread = scores.std(-1).mean().item()
    if spread < MIN_LOGIT_SPREAD:
        warnings.append(
            f"near-uniform logits at the answers (spread {spread:.2g} over the vocabulary, under {MIN_LOGIT_SPREAD}): "
            "the log-prob differences the DPO and gradient tests compare vanish; raise tiny.config's "
            "initializer_range, or set the head's weights with tiny.parameters"
        )
    variation = scores.std(0).mean().item() if scores.shape[0] > 1 else 0.0
    if variation < MIN_LOGIT_VARIATION:
        warnings.append(
            f"the logits hardly change from one answer token to the next (by {variation:.2g}, under "
            f"{MIN_LOGIT_VARIATION}): the model ignores its input; look for zero-initialised layers in tiny.config"
        )
    lengths = [int(n) for n in batch["attention_mask"].sum(-1).tolist()]
    if len(set(lengths)) == 1:
        warnings.append(
            f"a row with images and one with fewer collate to the same length ({lengths[0]} tokens): padding, which "
            "the parity tests check, never happens; give the tiny image processor sizes that yield more image tokens"
        )
    return warnings


def backend_spec_error(exc: MissingBackendError, spec: ModelSpec, spec_file: str) -> SpecError:
    """A package missing for the spec's tiny processor, as a spec problem at the field naming the class (its image
    processor's, or the processor's for the processor and the parts it makes itself)."""
    field = "tiny.image_processor_class" if exc.class_name == spec.tiny.image_processor_class else "processor_class"
    line, col = spec.position(*field.split("."))
    message = str(MissingBackendError("", exc.class_name, exc.package))
    return SpecError([SpecProblem(spec_file, line, col, field, message)])


def verify(spec_path: Path, project: Path, checkpoint: Path | None = None) -> tuple[ModelSpec, list[Check]]:
    """Compile ``spec_path``, build its tiny checkpoint (unless ``checkpoint`` is given) and run the checks."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    ((_, spec),) = codegen.load_specs([spec_path], project)
    adapter = compile_adapter(project, spec_path)
    with tempfile.TemporaryDirectory(prefix=f"resonance-verify-{spec.name}-") as tmp:
        if checkpoint is None:
            try:
                checkpoint = build_tiny(tiny_from_spec(spec), Path(tmp) / "tiny")
            except MissingBackendError as exc:
                raise backend_spec_error(exc, spec, codegen.relative(spec_path, project)) from exc
        return spec, run_checks(spec, adapter, checkpoint)
