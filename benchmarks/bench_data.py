#!/usr/bin/env python
"""Data loading: load time and peak memory of a large SFT file, as JSONL and as parquet, against a baseline loader.

Writes (into ``--folder``, or a temporary folder) a 100,000-row sharegpt-style SFT file whose rows reference 100
small PNG images (1-3 turns, LLaVA-Instruct-like text lengths; most rows one image, some two, some none), and the
same rows as parquet (images as path strings). Each measurement runs in a FRESH subprocess with its own empty
``HF_DATASETS_CACHE`` (a first load, as a user's first run sees it), so its peak RSS is its own:

- ``resonance_jsonl``   this tree's ``resonance.data.rows.load_rows(FILE, "sft")`` on the JSONL (images checked)
- ``resonance_parquet`` the same on the parquet
- ``baseline_jsonl``    the same call from the ``--baseline`` checkout (its folder first on ``sys.path``)
- ``datasets_json``     ``datasets.load_dataset("json", data_files=FILE)`` alone, for reference
- ``datasets_parquet``  ``datasets.load_dataset("parquet", data_files=FILE)`` alone

Each subprocess reports the wall and CPU time of the load call (CPU time, all threads, is the steadier figure on
a shared machine), its peak RSS (``ru_maxrss``) and its peak RSS after the imports (the import-only baseline, in
the same process); ``load_mb`` is the difference. A load that fails is recorded with its error. With ``--repeat
N`` the measurements run N times in turns (one run of each, then the next turn), so a change in a shared
machine's load falls on all of them; the run of median CPU time is kept. Prints a table with ratios against
``baseline_jsonl`` and writes everything as JSON.

    git worktree add /tmp/resonance-f75d00e f75d00e      # the baseline, outside the repository
    python benchmarks/bench_data.py --baseline /tmp/resonance-f75d00e --out /tmp/bench_data.json
    python benchmarks/bench_data.py --rows 2000 --out /tmp/bench_data_smoke.json   # a quick smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

# What each measurement loads: (loader, file).
MEASUREMENTS: dict[str, tuple[str, str]] = {
    "resonance_jsonl": ("resonance", "jsonl"),
    "resonance_parquet": ("resonance", "parquet"),
    "baseline_jsonl": ("baseline", "jsonl"),
    "datasets_json": ("datasets", "jsonl"),
    "datasets_parquet": ("datasets", "parquet"),
}
REFERENCE = "baseline_jsonl"

_SYLLABLES = ("ka", "lo", "mi", "ten", "ra", "su", "vo", "nel", "pri", "da", "ost", "ul", "be", "gra", "sim", "te")


def log(*parts: Any) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *parts, flush=True)


# ------------------------------------------------------------------------------------------------ data


def write_images(folder: Path, count: int) -> list[str]:
    """``count`` small distinct PNGs (64 x 48 noise) in ``folder/images``; their paths relative to ``folder``."""
    from PIL import Image

    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(1)
    names = []
    for i in range(count):
        name = f"images/img{i:03d}.png"
        Image.frombytes("RGB", (64, 48), rng.randbytes(64 * 48 * 3)).save(folder / name)
        names.append(name)
    return names


def make_rows(count: int, images: list[str]) -> list[dict[str, Any]]:
    """Sharegpt-style SFT rows: ``id``, ``conversations`` of 1-3 human/gpt exchanges (questions of 8-40 words,
    answers of 15-200), ``images``; 85% of rows one image, 5% two, 10% none."""
    rng = random.Random(0)
    words = ["".join(rng.choices(_SYLLABLES, k=rng.randint(1, 4))) for _ in range(3000)]

    def text(low: int, high: int) -> str:
        return " ".join(rng.choices(words, k=rng.randint(low, high))).capitalize() + "."

    rows = []
    for i in range(count):
        draw = rng.random()
        n_images = 0 if draw < 0.10 else 2 if draw < 0.15 else 1
        turns = []
        for turn in range(rng.randint(1, 3)):
            question = text(8, 40) + "?"
            if turn == 0 and n_images:
                question = "<image>\n" * n_images + question
            turns += [{"from": "human", "value": question}, {"from": "gpt", "value": text(15, 200)}]
        rows.append({"id": f"row-{i:06d}", "conversations": turns, "images": rng.sample(images, n_images)})
    return rows


def write_data(folder: Path, count: int, n_images: int) -> None:
    """The images, ``sft.jsonl`` and ``sft.parquet`` (the same rows) in ``folder``."""
    import datasets

    datasets.disable_progress_bars()
    images = write_images(folder, n_images)
    rows = make_rows(count, images)
    files = {"jsonl": folder / "sft.jsonl", "parquet": folder / "sft.parquet"}
    with files["jsonl"].open("w") as out:
        for row in rows:
            out.write(json.dumps(row) + "\n")
    datasets.Dataset.from_list(rows).to_parquet(str(files["parquet"]))


# --------------------------------------------------------------------------------------- measurement


def cpu_seconds() -> float:
    """User plus system CPU time of this process so far, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(name: str, data: str, baseline: str | None) -> dict[str, Any]:
    """Run in the child: import, load ``data`` the way ``name`` says, and report time and memory."""
    loader, _ = MEASUREMENTS[name]
    if loader == "baseline":
        sys.path.insert(0, str(baseline))
    if loader == "datasets":
        import datasets

        suffix = Path(data).suffix.lstrip(".")

        def load() -> Any:
            return datasets.load_dataset("json" if suffix == "jsonl" else suffix, data_files=data, split="train")

        module = datasets.__file__
    else:
        from resonance.data import rows

        def load() -> Any:
            return rows.load_rows(data, "sft")

        module = rows.__file__
        if loader == "baseline" and not Path(module).resolve().is_relative_to(Path(str(baseline)).resolve()):
            raise SystemExit(f"--baseline {baseline}: holds no resonance package; this imported {module}")
    imported_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cpu_start = cpu_seconds()
    start = time.perf_counter()
    result: dict[str, Any] = {"module": module}
    try:
        loaded = load()
    except Exception as exc:  # noqa: BLE001 - a benchmark records a failing loader and goes on
        result["error"] = f"{type(exc).__name__}: {exc}"[:1000]
    else:
        result["rows"] = len(loaded)
    result["load_s"] = time.perf_counter() - start
    result["cpu_s"] = cpu_seconds() - cpu_start
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result.update(import_mb=imported_kb / 1024, peak_mb=peak_kb / 1024, load_mb=(peak_kb - imported_kb) / 1024)
    return result


def run_measurement(name: str, data: Path, baseline: str | None, scratch: Path) -> dict[str, Any]:
    """``measure`` in a fresh interpreter with an empty datasets cache; its JSON result (or why it gave none)."""
    cache = Path(tempfile.mkdtemp(prefix=f"cache-{name}-", dir=scratch))
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, str(Path(__file__).resolve()), "--measure", name, "--data", str(data)]
    if baseline:
        command += ["--baseline", baseline]
    start = time.perf_counter()
    child = subprocess.run(command, capture_output=True, text=True, env=env, cwd=scratch)
    wall = time.perf_counter() - start
    lines = child.stdout.strip().splitlines()
    if child.returncode or not lines:
        return {"error": f"exit {child.returncode}: {child.stderr.strip()[-1000:]}", "process_s": wall}
    return {**json.loads(lines[-1]), "process_s": wall}


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Of one measurement's runs, the one of median CPU time, with every run's figures as ``load_s_each``,
    ``cpu_s_each`` and ``load_mb_each``; a measurement that failed: its first run."""
    done = sorted((run for run in runs if "rows" in run), key=lambda run: run["cpu_s"])
    if not done:
        return runs[0]
    each = {f"{key}_each": [run[key] for run in runs if "rows" in run] for key in ("load_s", "cpu_s", "load_mb")}
    return {**done[len(done) // 2], **each}


def git_state(folder: Path) -> str:
    """``<short commit>`` of the checkout at ``folder``, with ``+dirty`` when its tracked files differ."""

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + ("+dirty" if git("status", "--porcelain", "-uno") else "")


def table(results: dict[str, dict[str, Any]]) -> str:
    """The results as a markdown table, with time and memory ratios against :data:`REFERENCE`."""
    reference = results.get(REFERENCE, {})
    lines = [
        "| measurement | rows | load s | x ref | CPU s | x ref | peak RSS MB | load MB (peak - imports) | x ref |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, result in results.items():
        if "rows" not in result:
            lines.append(f"| {name} | error: {result.get('error', '?')[:120]} |" + " |" * 7)
            continue
        ratios = {key: "-" for key in ("load_s", "cpu_s", "load_mb")}
        if "rows" in reference:
            ratios = {key: f"{result[key] / reference[key]:.2f}" for key in ratios}
        lines.append(
            f"| {name} | {result['rows']} | {result['load_s']:.1f} | {ratios['load_s']} | {result['cpu_s']:.1f} | "
            f"{ratios['cpu_s']} | {result['peak_mb']:.0f} | {result['load_mb']:.0f} | {ratios['load_mb']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="Where to write the JSON results.")
    parser.add_argument("--baseline", help="A checkout of the baseline commit (git worktree add DIR f75d00e).")
    parser.add_argument("--folder", help="Write the data here (kept); default: a temporary folder.")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=1, help="Runs of each measurement, in turns; median kept.")
    parser.add_argument("--only", default="", help="Comma-separated measurements to run (default: all).")
    parser.add_argument("--measure", choices=sorted(MEASUREMENTS), help=argparse.SUPPRESS)  # the child's mode
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--write", help=argparse.SUPPRESS)  # the data writer's mode: the folder
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.data, args.baseline)))
        return
    if args.write:
        write_data(Path(args.write), args.rows, args.images)
        return
    if not args.out:
        parser.error("--out is required")
    names = [name for name in (args.only.split(",") if args.only else MEASUREMENTS) if name]
    unknown = sorted(set(names) - set(MEASUREMENTS))
    if unknown:
        parser.error(f"unknown measurement(s) {unknown}; choose from {sorted(MEASUREMENTS)}")
    if not args.baseline and REFERENCE in names:
        names.remove(REFERENCE)
        log(f"no --baseline: {REFERENCE} skipped, no ratios")

    report: dict[str, Any] = {
        "tree": git_state(REPO),
        "baseline": git_state(Path(args.baseline)) if args.baseline else None,
        "rows": args.rows,
        "images": args.images,
        "cpus": os.cpu_count(),
        "versions": {"python": platform.python_version(), "datasets": metadata.version("datasets")},
        "results": {},
    }
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(args.folder or temporary)
        folder.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        files = {"jsonl": folder / "sft.jsonl", "parquet": folder / "sft.parquet"}
        # In a child process: the parent stays small, and Linux carries a parent's peak RSS into a child's
        # ru_maxrss across fork and exec.
        write = [sys.executable, str(Path(__file__).resolve()), "--write", str(folder)]
        subprocess.run([*write, "--rows", str(args.rows), "--images", str(args.images)], check=True)
        report["write_s"] = time.perf_counter() - start
        report["file_mb"] = {kind: path.stat().st_size / 2**20 for kind, path in files.items()}
        log(
            f"wrote {args.rows} rows in {report['write_s']:.1f} s:",
            {k: f"{v:.1f} MB" for k, v in report["file_mb"].items()},
        )
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        for turn in range(args.repeat):  # in turns: a change in the machine's load falls on every measurement
            for name in names:
                if runs[name] and "rows" not in runs[name][0]:
                    continue  # a load that failed fails again
                log(name, f"run {turn + 1} of {args.repeat} ...")
                run = run_measurement(name, files[MEASUREMENTS[name][1]], args.baseline, Path(temporary))
                runs[name].append(run)
                log(name, {key: round(value, 2) if isinstance(value, float) else value for key, value in run.items()})
                report["results"][name] = median_run(runs[name])
                Path(args.out).write_text(json.dumps(report, indent=1))
    print(table(report["results"]))
    Path(args.out).write_text(json.dumps(report, indent=1))
    log("wrote", args.out)


if __name__ == "__main__":
    main()
