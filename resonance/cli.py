"""The ``resonance`` command line (typer).

Compile-time commands (scaffold, check, schema, models) import neither torch nor transformers;
the training commands import them lazily.
"""

from __future__ import annotations

import dataclasses
import sys
import traceback
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from resonance import codegen
from resonance.algorithms import ALGORITHMS, Algorithm
from resonance.algorithms.arguments import DataArguments
from resonance.codegen.schema_file import WRITE_COMMAND, schema_diff, schema_drift, schema_json, write_schema
from resonance.data.images import DEFAULT_MAX_IMAGE_PIXELS
from resonance.errors import (
    EXIT_FAILED,
    EXIT_INPUT,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    MissingBackendError,
    ResonanceError,
    SpecError,
    user_error,
)

app = typer.Typer(
    help="Align vision-language models from declarative model specs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
train_app = typer.Typer(help="Train a model: " + ", ".join(ALGORITHMS) + ".", no_args_is_help=True)
app.add_typer(train_app, name="train")
data_app = typer.Typer(help="Data before training: inspect a source, list the formats.", no_args_is_help=True)
app.add_typer(data_app, name="data")

out = Console(soft_wrap=True, highlight=False)
err = Console(stderr=True, soft_wrap=True, highlight=False)

Project = Annotated[
    Path | None,
    typer.Option(
        "--project",
        help="Project folder holding specs/ and generated/. Default: the current folder when it holds specs/, else "
        "the nearest folder above it holding both; with none, the specs packaged with resonance.",
        show_default=False,
    ),
]


def _spec_failure(exc: SpecError) -> typer.Exit:
    for problem in exc.problems:
        err.print(str(problem), markup=False)
    return typer.Exit(EXIT_INPUT)


def _report_drift(drift: codegen.Drift, fix: str, show_diff: bool = True) -> None:
    if show_diff and drift.diff:
        out.print(drift.diff, markup=False, end="")
    for problem in drift.problems():
        err.print(problem, markup=False)
    err.print(f"To fix, run: {fix}", markup=False)


def _from_here(command: str, project: Path) -> str:
    """``command`` as the user can run it from the current folder: with ``--project`` when that is not the project."""
    return command if codegen.find_project(Path.cwd()) == project else f"{command} --project {project}"


def _run_check(project: Path, specs: list[Path] | None, show_diff: bool = True) -> None:
    try:
        plan = codegen.plan(project, specs)
    except SpecError as exc:
        raise _spec_failure(exc) from exc
    drift = codegen.compare(plan)
    schema_current = _schema_file_current(project, show_diff)
    if drift.clean:
        if not schema_current:
            raise typer.Exit(EXIT_FAILED)
        err.print(f"generated/ is up to date with {len(plan.files) - 2} spec(s).", markup=False)
        return
    fix = (
        "resonance scaffold --prune" if drift.stale else "resonance scaffold " + " ".join(str(s) for s in (specs or []))
    )
    fix = _from_here(fix.strip(), project)
    if drift.hand_edited:
        fix += " --force  (after moving the hand edits into an override module)"
    _report_drift(drift, fix.strip(), show_diff)
    raise typer.Exit(EXIT_FAILED)


@app.command()
def scaffold(
    specs: Annotated[list[Path] | None, typer.Argument(help="Spec files; all of specs/ when omitted.")] = None,
    check: Annotated[bool, typer.Option("--check", help="Write nothing; exit 1 on any drift.")] = False,
    diff: Annotated[bool, typer.Option("--diff", help="Print the diff that scaffolding would apply.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite generated files edited by hand.")] = False,
    prune: Annotated[bool, typer.Option("--prune", help="Delete generated files whose spec is gone.")] = False,
    project: Project = None,
) -> None:
    """Compile specs into generated/<name>/__init__.py and the registry."""
    project = codegen.files_project(specs, project) if specs else codegen.require_project(project)
    if check:
        _run_check(project, specs or None)
        return
    try:
        plan = codegen.plan(project, specs or None)
    except SpecError as exc:
        raise _spec_failure(exc) from exc
    if diff:
        drift = codegen.compare(plan)
        out.print(drift.diff, markup=False, end="")
        raise typer.Exit(0 if drift.clean else EXIT_FAILED)
    try:
        written = codegen.apply(plan, force=force, prune=prune)
    except PermissionError as exc:
        err.print(f"error: {exc}", markup=False)
        raise typer.Exit(EXIT_FAILED) from exc
    for rel in written:
        err.print(f"wrote {rel}", markup=False)
    if plan.stale and not prune:
        err.print("stale generated files (rerun with --prune to delete): " + ", ".join(plan.stale), markup=False)
    if not written:
        err.print("nothing to do: generated/ is up to date.", markup=False)
    _schema_file_current(project, show_diff=False)  # scaffold writes only generated/: it names the schema's fix


@app.command("check")
def check_cmd(project: Project = None) -> None:
    """Exit 1 when generated/ differs from what specs/ compile to; exit 2 on an invalid spec or with no project."""
    _run_check(codegen.require_project(project), None)


def _schema_file_current(project: Path, show_diff: bool = True) -> bool:
    """Whether the project's specs/resonance-spec.schema.json is current (or absent and unnamed); if not, print
    the diff, what is wrong and the fix."""
    problem = schema_drift(project)
    if problem:
        if show_diff:
            out.print(schema_diff(project), markup=False, end="")
        err.print(problem, markup=False)
        err.print(f"To fix, run: {_from_here(WRITE_COMMAND, project)}", markup=False)
    return problem is None


@app.command()
def schema(
    write: Annotated[
        bool,
        typer.Option("--write", help="Write specs/resonance-spec.schema.json (what spec headers name) instead."),
    ] = False,
    project: Project = None,
) -> None:
    """Print the JSON Schema of a spec file (for editor completion), or write it into the project's specs/."""
    if write:
        project = codegen.require_project(project)
        path = write_schema(project)
        err.print(f"wrote {codegen.relative(path, project)}", markup=False)
        return
    typer.echo(schema_json(), nl=False)


@app.command()
def models(project: Project = None) -> None:
    """List the model families in use (the project's specs, else the packaged ones) and where they come from."""
    source = codegen.spec_source(project)
    try:
        loaded = codegen.load_specs(codegen.project_specs(source.root), source.root)
    except SpecError as exc:
        raise _spec_failure(exc) from exc
    if not loaded:
        raise ResonanceError(f"no specs in {source.describe()}: add {codegen.SPECS_DIR}/NAME.yaml files")
    caption = f"{len(loaded)} spec(s) from {source.describe()}"
    table = Table("name", "architectures", "flash-attn", "multi-image", "transformers", caption=caption)
    for _, spec in loaded:
        table.add_row(
            spec.name,
            ", ".join(spec.architectures),
            "yes" if spec.flash_attention else "no",
            "yes" if spec.image.multi_image else "no",
            spec.transformers,
        )
    out.print(table)


@app.command()
def tiny(
    name: Annotated[str, typer.Argument(help="Adapter name (e.g. llava) from the specs in use, or a spec file.")],
    out_dir: Annotated[Path, typer.Argument(help="Folder to save the tiny model and processor into.")],
    seed: int = 0,
    overwrite: bool = False,
    project: Project = None,
) -> None:
    """Build a family's tiny random-weight model and processor offline, for smoke tests."""
    spec_path, project = codegen.named_spec(name, project)  # an unknown name fails before torch is imported
    from resonance.commands.verify import backend_spec_error
    from resonance.tiny import build_tiny, tiny_from_spec

    try:
        ((_, spec),) = codegen.load_specs([spec_path], project)
    except SpecError as exc:
        raise _spec_failure(exc) from exc
    try:
        path = build_tiny(tiny_from_spec(spec), out_dir, seed=seed, overwrite=overwrite)
    except MissingBackendError as exc:
        raise _spec_failure(backend_spec_error(exc, spec, codegen.relative(spec_path, project))) from exc
    except FileExistsError as exc:
        err.print(f"error: {exc} (pass --overwrite to replace it)", markup=False)
        raise typer.Exit(EXIT_FAILED) from exc
    err.print(f"saved tiny {spec.name} model and processor to {path}", markup=False)


@app.command()
def verify(
    spec_arg: Annotated[
        str, typer.Argument(metavar="SPEC", help="The spec to check: an adapter name (llava) or a file (specs/x.yaml).")
    ],
    checkpoint: Annotated[
        Path | None, typer.Option(help="Check against this checkpoint folder instead of the spec's tiny model.")
    ] = None,
    project: Project = None,
) -> None:
    """Build the spec's tiny model and check every spec field against it (exit 1 naming the bad fields)."""
    from resonance.base.registry import checkpoint_folder
    from resonance.commands.verify import verify as run_verify

    spec_path, project = codegen.named_spec(spec_arg, project)
    if checkpoint is not None:
        checkpoint_folder(checkpoint, named_by="--checkpoint")  # a Hub id or a typo fails before anything loads
    try:
        spec, checks = run_verify(spec_path, project, checkpoint)
    except SpecError as exc:
        raise _spec_failure(exc) from exc
    table = Table("check", "spec fields", "result")
    for check in checks:
        result = "ok" if check.ok else ("skipped: " + check.skipped if check.skipped else "FAILED")
        result += " (warning)" if check.warnings else ""
        table.add_row(check.name, check.fields, result)
    out.print(table)
    rel = codegen.relative(spec_path, project)
    failed = False
    for check in checks:
        for problem in check.problems:
            line, col = spec.position(*(int(k) if k.isdigit() else k for k in problem.field.split(".")))
            err.print(f"{rel}:{line}:{col}: {problem.field}: {problem.message}", markup=False)
        if check.error:
            err.print(f"{rel}: {check.name}: {check.error}", markup=False)
        for warning in check.warnings:  # the field is the tiny section: the line of `tiny:`
            line, col = spec.position("tiny")
            err.print(f"{rel}:{line}:{col}: tiny: warning: {warning}", markup=False)
        failed = failed or not check.ok
    if failed:
        raise typer.Exit(EXIT_FAILED)
    warned = " (with warnings)" if any(check.warnings for check in checks) else ""
    err.print(f"{rel}: every check passed{warned}", markup=False)


@app.command()
def export(
    output: Annotated[Path, typer.Argument(metavar="OUT", help="The --output_dir of a `resonance train` run.")],
    to: Annotated[Path, typer.Option("--to", metavar="DIR", help="Folder to write (must be new, or --overwrite).")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing DIR.")] = False,
    project: Project = None,
) -> None:
    """Merge a LoRA output into its base model's weights and write a folder plain transformers loads
    (AutoModelForImageTextToText, AutoProcessor); reward and value heads are kept beside the merged model; a
    full-training output is copied as it is."""
    from resonance.base.registry import use_adapters
    from resonance.commands.export import main as export_main

    use_adapters(project)
    export_main(output, to, overwrite=overwrite)


_TRAIN_CONTEXT = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


def _train_command(algorithm: Algorithm) -> None:
    """``resonance train <algorithm>``: its flags are parsed by the algorithm's config (``--help`` lists them)."""

    def command(ctx: typer.Context) -> None:
        from resonance.commands.train import leave, main

        leave(main(algorithm.name, list(ctx.args)))

    command.__doc__ = algorithm.help
    train_app.command(algorithm.name, context_settings=_TRAIN_CONTEXT, add_help_option=False)(command)


for _algorithm in ALGORITHMS.values():
    _train_command(_algorithm)


def _data_help(name: str) -> str:
    """A data flag's help, as ``resonance train`` gives it (DataArguments is where the data flags are defined)."""
    return next(f.metadata["help"] for f in dataclasses.fields(DataArguments) if f.name == name)


# The data flags of the commands that read data outside `resonance train`, defined as train defines them.
DataFormatFlag = Annotated[str, typer.Option("--data_format", help=_data_help("data_format"))]
ImageRootFlag = Annotated[str | None, typer.Option("--image_root", help=_data_help("image_root"))]
AllowImageUrlsFlag = Annotated[bool, typer.Option("--allow_image_urls", help=_data_help("allow_image_urls"))]
MaxImagePixelsFlag = Annotated[int, typer.Option("--max_image_pixels", help=_data_help("max_image_pixels"))]
DataConfigFlag = Annotated[str | None, typer.Option("--data_config", help=_data_help("data_config"))]
DataSplitFlag = Annotated[str | None, typer.Option("--data_split", help=_data_help("data_split"))]
DataRevisionFlag = Annotated[str | None, typer.Option("--data_revision", help=_data_help("data_revision"))]
DATA_FLAGS = (
    "data_format",
    "image_root",
    "allow_image_urls",
    "max_image_pixels",
    "data_config",
    "data_split",
    "data_revision",
)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def generate(
    ctx: typer.Context,
    model_name_or_path: Annotated[
        str, typer.Option("--model_name_or_path", help="Checkpoint folder, or a LoRA output folder of `train`.")
    ],
    data_path: Annotated[
        str, typer.Option("--data_path", help="Prompt rows, from any source `train` reads (README, Data).")
    ],
    output: Annotated[Path, typer.Option("--output", help="Answers file to write (JSONL, one object per row).")],
    batch_size: Annotated[int, typer.Option("--batch_size", help="Prompts per generate() call.")] = 8,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output file.")] = False,
    skip_invalid_rows: Annotated[
        bool, typer.Option("--skip_invalid_rows", help="Skip (and count) invalid rows instead of failing.")
    ] = False,
    seed: Annotated[int | None, typer.Option("--seed", help="Random seed, for sampling.")] = None,
    data_format: DataFormatFlag = "auto",
    image_root: ImageRootFlag = None,
    allow_image_urls: AllowImageUrlsFlag = False,
    max_image_pixels: MaxImagePixelsFlag = DEFAULT_MAX_IMAGE_PIXELS,
    data_config: DataConfigFlag = None,
    data_split: DataSplitFlag = None,
    data_revision: DataRevisionFlag = None,
    project: Project = None,
) -> None:
    """Generate an answer for every prompt row. Further --name value flags (--max_new_tokens 64, --do_sample
    true, --temperature 0.7, ...: any transformers GenerationConfig field) override the family's defaults."""
    from resonance.base.registry import use_adapters
    from resonance.commands.generate import main

    use_adapters(project)  # before the data and the flags' values: generate reads the family's defaults
    data_options = {name: ctx.params[name] for name in DATA_FLAGS}  # the data flags above, as read_rows takes them
    options = {
        "batch_size": batch_size,
        "overwrite": overwrite,
        "skip_invalid_rows": skip_invalid_rows,
        "seed": seed,
        "data_options": data_options,
    }
    own = [param.name for param in ctx.command.params if param.name]  # --overwrit: did you mean --overwrite?
    raise typer.Exit(main(model_name_or_path, data_path, str(output), list(ctx.args), own, **options))


@data_app.command("inspect")
def data_inspect(
    ctx: typer.Context,
    path: Annotated[str, typer.Argument(metavar="DATA", help="The data, as --data_path takes it.")],
    kind: Annotated[
        str, typer.Option("--kind", help="auto (from the first row's fields), sft, preference or prompt.")
    ] = "auto",
    model: Annotated[
        list[str] | None,
        typer.Option("--model", help="A checkpoint folder: token lengths and the page per its family (repeatable)."),
    ] = None,
    html: Annotated[Path | None, typer.Option("--html", help="Write a self-contained page of sampled rows.")] = None,
    sample: Annotated[int, typer.Option("--sample", help="Rows shown on the --html page.")] = 8,
    max_problems: Annotated[int, typer.Option("--max_problems", help="Problems listed (the rest are counted).")] = 20,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --html file.")] = False,
    data_format: DataFormatFlag = "auto",
    image_root: ImageRootFlag = None,
    allow_image_urls: AllowImageUrlsFlag = False,
    max_image_pixels: MaxImagePixelsFlag = DEFAULT_MAX_IMAGE_PIXELS,
    data_config: DataConfigFlag = None,
    data_split: DataSplitFlag = None,
    data_revision: DataRevisionFlag = None,
    project: Project = None,
) -> None:
    """Print what a data source holds (format, rows, images, token lengths per --model, unused fields, the first
    problems) before a long job; exit 0 when every row is valid, 1 when some are not, 2 when it cannot be read.
    Loads processors only, never model weights."""
    from resonance.base.registry import use_adapters
    from resonance.commands.data import main as inspect_main

    if model:  # the families of --model checkpoints
        use_adapters(project)

    data_options = {name: ctx.params[name] for name in DATA_FLAGS}  # the data flags above, as read_rows takes them
    options = {"kind": kind, "models": model, "html": html, "sample": sample, "max_problems": max_problems}
    raise typer.Exit(inspect_main(path, overwrite=overwrite, data_options=data_options, **options))


@data_app.command("formats")
def data_formats() -> None:
    """List the data formats rows are recognised in (--data_format NAME), the kinds of rows each feeds and its
    shape."""
    from resonance.data.formats import FORMATS

    table = Table("name", "rows for", "shape")
    for data_format in FORMATS:
        table.add_row(data_format.name, ", ".join(sorted(data_format.kinds)), Text(data_format.summary))
    out.print(table)


def main(argv: list[str] | None = None) -> int:
    """The ``resonance`` entry point: exit 0 ok, 1 a check or run failed, 2 bad input, 3 an internal error.

    A :class:`ResonanceError` that reaches here is one line; anything else is a bug, printed with its traceback
    and exit code 3, so CI can tell a crash from drift (1) or a bad spec (2).
    """
    try:
        app(args=argv, prog_name="resonance")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_FAILED)
    except KeyboardInterrupt:
        err.print("interrupted", markup=False)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the one place a bug becomes an exit code
        error = user_error(exc)  # a ResonanceError, also one raised in a DataLoader worker
        if error is not None:
            err.print(f"error: {error}", markup=False)
            return error.exit_code
        traceback.print_exc()
        err.print(
            "internal error (a bug in resonance or a library it calls, not in your input): please report it "
            "with the traceback above",
            markup=False,
        )
        return EXIT_INTERNAL
    return 0


def entry() -> None:
    """``[project.scripts]``: exit with :func:`main`'s code."""
    sys.exit(main())


if __name__ == "__main__":
    entry()
