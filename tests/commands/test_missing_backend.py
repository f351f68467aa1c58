"""A processor part that needs a package not installed is a spec error naming the spec, the class and the package,
from ``resonance tiny``, ``resonance verify`` and the first use of a checkpoint: never a traceback.

transformers replaces its torchvision image and video processors with placeholder classes when torchvision is
missing, and they raise an ImportError when built. The test hides torchvision from a fresh interpreter
(``sys.modules["torchvision"] = None``: transformers' availability check and ``import torchvision`` both see it
missing) and runs the three commands there; the parsing of transformers' messages is checked in this process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import EXAMPLES
from transformers.utils.import_utils import BACKENDS_MAPPING

from resonance.base.checks import missing_backend
from resonance.errors import EXIT_INPUT

# Runs each command through resonance.cli.main in one interpreter with torchvision hidden; prints one JSON line
# per command: its exit code and what it wrote to stderr.
_SCRIPT = """
import contextlib, io, json, sys
sys.modules["torchvision"] = None
from resonance.cli import main
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    print(json.dumps({"code": code, "stderr": err.getvalue()}))
"""


def test_every_transformers_backend_message_names_the_class_and_package() -> None:
    for backend, (_, template) in BACKENDS_MAPPING.items():
        exc = ImportError(template.format("SomeImageProcessor", ACCELERATE_MIN_VERSION="1.1"))
        problem = missing_backend(exc, needed_by="SomeProcessor")
        assert problem is not None, backend
        assert problem.class_name == "SomeImageProcessor", backend
    torchvision = missing_backend(ImportError(BACKENDS_MAPPING["torchvision"][1].format("X")), "P")
    assert (torchvision.class_name, torchvision.package) == ("X", "torchvision")
    assert missing_backend(ImportError(BACKENDS_MAPPING["vision"][1].format("X")), "P").package == "pillow"
    # SmolVLM's processor words it otherwise; a missing module names itself
    smolvlm = ImportError("Package `num2words` is required to run SmolVLM processor. Install it with `pip install`.")
    assert (missing_backend(smolvlm, "SmolVLMProcessor").class_name, missing_backend(smolvlm, "P").package) == (
        "SmolVLMProcessor",
        "num2words",
    )
    assert missing_backend(ModuleNotFoundError("no", name="decord.bridge"), "P").package == "decord"
    # any other ImportError is not a missing package: it stays the bug it is
    assert missing_backend(ImportError("cannot import name 'X' from 'transformers'"), "P") is None


@pytest.mark.parametrize("family", ["qwen2_vl"])
def test_tiny_verify_and_first_use_name_the_spec_class_and_package(
    family: str, tiny_checkpoint, tmp_path: Path
) -> None:
    checkpoint = tiny_checkpoint(family)  # built where torchvision is installed
    out = tmp_path / "tiny"
    commands = [
        ["tiny", family, str(out)],
        ["verify", family],
        ["data", "inspect", str(EXAMPLES / "data" / "sft.jsonl"), "--model", str(checkpoint)],
    ]
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT, json.dumps(commands)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    tiny, verify, first_use = (json.loads(line) for line in result.stdout.splitlines()[-3:])
    spec = f"specs/{family}.yaml"
    # tiny and verify: at the spec field that names the processor, with its line
    for run in (tiny, verify):
        assert run["code"] == EXIT_INPUT, run
        line = run["stderr"].strip().splitlines()[-1]
        assert line.startswith(f"{spec}:"), line
        assert ": processor_class: Qwen2VLProcessor's video processor needs the torchvision package" in line, line
        assert "Traceback" not in run["stderr"]
    assert not out.exists()  # nothing half-written
    # first use of a checkpoint: the processor part transformers could not build, and the spec that named it
    assert first_use["code"] == EXIT_INPUT, first_use
    assert f"{spec}: processor_class: Qwen2VLVideoProcessor needs the torchvision package" in first_use["stderr"]
    assert "Traceback" not in first_use["stderr"]
