"""Package layout that pyproject.toml alone cannot express.

generated/ is a top-level folder of the repository but imports as ``resonance.generated`` (its
subpackages are one per spec, so they are listed here rather than by hand), and the wheel carries
specs/ and templates/ inside the package so that `resonance scaffold` works for pip users.
"""

from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent


class BuildWithData(build_py):
    """Copy specs/*.yaml, the spec schema their headers name, and templates/*.j2 into resonance/_data/ of the built
    package."""

    def run(self) -> None:
        super().run()
        for folder, pattern in (("specs", "*.yaml"), ("specs", "*.schema.json"), ("templates", "*.j2")):
            target = Path(self.build_lib) / "resonance" / "_data" / folder
            target.mkdir(parents=True, exist_ok=True)
            for source in sorted((ROOT / folder).glob(pattern)):
                self.copy_file(str(source), str(target / source.name))


generated = ["resonance.generated"] + sorted(
    f"resonance.generated.{d.name}" for d in (ROOT / "generated").iterdir() if (d / "__init__.py").is_file()
)

setup(
    packages=find_packages(include=["resonance", "resonance.*"]) + generated,
    package_dir={"resonance.generated": "generated"},
    cmdclass={"build_py": BuildWithData},
)
