"""Nothing in the checkout hides an installed package.

Python puts a script's own folder first on ``sys.path`` (``python benchmarks/decode.py`` puts
``benchmarks/``), and ``python -m`` puts the working directory there (``python -m pytest`` run from the
repository puts its root). A module in such a folder named as an installed package is imported in its
place: a top-level ``kernels/`` would be imported where transformers imports the Hugging Face
``kernels`` package, and every import of transformers would fail.
"""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: The folders that come first on ``sys.path`` when something in them (or run from them) starts.
FIRST_ON_PATH = (ROOT, ROOT / "benchmarks", ROOT / "examples", ROOT / "tests", ROOT / "tests" / "tools")


def _module_names(folder: Path) -> set[str]:
    """What ``import NAME`` finds in ``folder`` before an installed package: ``NAME.py`` files and
    folders with an ``__init__.py`` (a folder without one is a namespace package, taken only where no
    other folder on ``sys.path`` has ``NAME``)."""
    return {path.stem for path in folder.glob("*.py")} | {path.parent.name for path in folder.glob("*/__init__.py")}


def test_no_folder_first_on_sys_path_holds_a_module_named_as_an_installed_package():
    installed = set(importlib.metadata.packages_distributions()) - {"sparse_peft"}
    assert {"torch", "transformers", "peft"} <= installed  # the scan sees the environment
    clashes = sorted(f"{folder.relative_to(ROOT)}/{name}" for folder in FIRST_ON_PATH
                     for name in _module_names(folder) & installed)
    assert not clashes, f"these would be imported in place of the installed package of the same name: {clashes}"


def test_transformers_imports_with_the_repository_root_first_on_sys_path():
    """``python -m`` from the repository root (as the README's test command runs) imports transformers'
    model code, which imports its optional and required packages by name."""
    done = subprocess.run([sys.executable, "-c", "import transformers.modeling_utils, sparse_peft"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
