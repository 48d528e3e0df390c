"""The package's import layers: a module imports modules of its own layer or of lower ones only.

Layers, lowest first (``MODULE_LAYERS`` and ``PACKAGE_LAYERS`` below place every module):

* foundation: small private helpers that import nothing of the package (``_progress``,
  ``_distributed``, ``_validation``, ``_blocks``, ``_cpu_fusion``);
* sparsity: masks, pruners, reports, and what a bitsandbytes-quantized layer's weight and mask are
  (``sparsity/``);
* ops: the sparse ops: their dispatch (``ops.py``), the Triton kernels (``kernels/``), their PyTorch
  twins (``functional/``) and ``delta_linear``;
* tuners: the peft methods (``tuners/``);
* training: callbacks, losses, trainers, block-wise reconstruction after pruning (``training/``);
* face: what users call: the package itself, its registration with peft, ``cli``, ``io``, ``merge``,
  ``evaluation``, ``data``, ``quantized``.

Every import is an edge: at module level or inside a function (lazy), relative or absolute;
``from package import name`` is an edge to the submodule ``package.name`` when that is a module.
(``importlib.import_module`` with a computed name is not seen: ``ops`` loads its own layer's kernels
so.) A module missing from the tables fails, asking for its layer.

Private names stay with their owner: ``from M import _name`` (a name, not a module) is allowed only
inside ``M``'s package, subpackages included (a tuner folder may use a private name of
``tuners/_shared.py``, ``kernels/masked_linear.py`` one of ``kernels/sddmm.py``). A module directly
in ``sparse_peft/`` (``cli``, ``data``, ``io``, ...) is its own owner: no other module takes its
private names. Private modules (``_distributed``, ``kernels/_checks.py``, ``tuners/_shared.py``) are
shared helpers; the layers alone decide who imports them.

Two more checks keep the ops layer in shape: ``sparse_peft.ops`` alone chooses between a kernel and
its PyTorch twin, and each kernel has exactly one twin, in ``functional/``.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import NamedTuple, Optional

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "sparse_peft"

LAYER_NAMES = ("foundation", "sparsity", "ops", "tuners", "training", "face")
FOUNDATION, SPARSITY, OPS, TUNERS, TRAINING, FACE = range(len(LAYER_NAMES))

#: Single modules (a package listed here is its ``__init__`` alone).
MODULE_LAYERS = {
    "sparse_peft._progress": FOUNDATION,
    "sparse_peft._distributed": FOUNDATION,
    "sparse_peft._validation": FOUNDATION,
    "sparse_peft._blocks": FOUNDATION,
    "sparse_peft._cpu_fusion": FOUNDATION,
    "sparse_peft.ops": OPS,
    "sparse_peft.delta_linear": OPS,
    "sparse_peft": FACE,
    "sparse_peft._peft_registry": FACE,
    "sparse_peft.cli": FACE,
    "sparse_peft.recipes": FACE,
    "sparse_peft.recovery": FACE,
    "sparse_peft.io": FACE,
    "sparse_peft.merge": FACE,
    "sparse_peft.evaluation": FACE,
    "sparse_peft.data": FACE,
    "sparse_peft.quantized": FACE,
}
#: Packages: the package and every module under it.
PACKAGE_LAYERS = {
    "sparse_peft.sparsity": SPARSITY,
    "sparse_peft.kernels": OPS,
    "sparse_peft.functional": OPS,
    "sparse_peft.tuners": TUNERS,
    "sparse_peft.training": TRAINING,
}


class Module(NamedTuple):
    name: str
    path: Path
    is_package: bool


class Import(NamedTuple):
    target: str  # the module imported (a submodule when ``from package import submodule``)
    name: Optional[str]  # the name taken from it (``from target import name``), None for a module
    line: int


def package_modules() -> dict[str, Module]:
    modules = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = path.relative_to(ROOT / PACKAGE).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        name = ".".join((PACKAGE, *(parts[:-1] if is_package else parts)))
        modules[name] = Module(name, path, is_package)
    return modules


def imports_of(source: str, module: str, is_package: bool, known: set[str]) -> list[Import]:
    """Every import of ``PACKAGE`` in ``source`` (the module ``module``), at any depth of the tree."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [Import(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1])
                origin = f"{base}.{node.module}" if node.module else base
            else:
                origin = node.module
            for alias in node.names:
                submodule = f"{origin}.{alias.name}"
                if submodule in known:
                    found.append(Import(submodule, None, node.lineno))
                else:
                    found.append(Import(origin, alias.name, node.lineno))
    return [i for i in found if i.target == PACKAGE or i.target.startswith(PACKAGE + ".")]


def layer_of(module: str) -> Optional[int]:
    if module in MODULE_LAYERS:
        return MODULE_LAYERS[module]
    packages = [p for p in PACKAGE_LAYERS if module == p or module.startswith(p + ".")]
    return PACKAGE_LAYERS[max(packages, key=len)] if packages else None


def owner_of(module: str, modules: dict[str, Module]) -> str:
    """Where ``module``'s private names may be used: its own package, or the module itself when it
    is a package or sits directly in ``sparse_peft/``."""
    parent = module.rpartition(".")[0]
    is_package = module in modules and modules[module].is_package
    return module if is_package or parent == PACKAGE else parent


def all_imports() -> dict[str, list[Import]]:
    modules = package_modules()
    return {name: imports_of(m.path.read_text(encoding="utf-8"), name, m.is_package, set(modules))
            for name, m in modules.items()}


def upward_imports(imports: dict[str, list[Import]]) -> list[str]:
    problems = []
    for module, found in imports.items():
        for imp in found:
            mine, theirs = layer_of(module), layer_of(imp.target)
            if mine is not None and theirs is not None and theirs > mine:
                problems.append(f"{module} ({LAYER_NAMES[mine]}) imports {imp.target} ({LAYER_NAMES[theirs]}) "
                                f"at line {imp.line}")
    return list(dict.fromkeys(problems))  # one line per import statement, however many names it takes


def private_imports(imports: dict[str, list[Import]], modules: dict[str, Module]) -> list[str]:
    problems = []
    for module, found in imports.items():
        for imp in found:
            if imp.name is None or not imp.name.startswith("_"):
                continue
            owner = owner_of(imp.target, modules)
            if module != owner and not module.startswith(owner + "."):
                problems.append(f"{module} imports the private name {imp.name} of {imp.target} at line {imp.line} "
                                f"(private to {owner})")
    return problems


def test_every_module_has_a_layer():
    missing = sorted(name for name in package_modules() if layer_of(name) is None)
    assert not missing, (f"modules without a layer: {missing}; add each to MODULE_LAYERS (or its package to "
                         "PACKAGE_LAYERS) in tests/test_layering.py")


def test_no_module_imports_a_higher_layer():
    problems = upward_imports(all_imports())
    assert not problems, "imports of a higher layer:\n" + "\n".join(problems)


def test_private_names_stay_with_their_owner():
    problems = private_imports(all_imports(), package_modules())
    assert not problems, "private names imported from another owner:\n" + "\n".join(problems)


def test_only_ops_chooses_the_backend():
    """``sparse_peft.ops`` alone chooses between a Triton kernel and its PyTorch twin: no other module
    calls ``resolve_backend`` or reads ``SPARSE_PEFT_BACKEND``, and no tuner asks whether its tensors
    are on CUDA (the kernels' own device checks say whether a kernel can run at all)."""
    problems = []
    for name, module in package_modules().items():
        if name == "sparse_peft.ops":
            continue
        for node in ast.walk(ast.parse(module.path.read_text(encoding="utf-8"))):
            word = (node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute)
                    else node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None)
            if word in ("resolve_backend", "SPARSE_PEFT_BACKEND") or (
                    word == "is_cuda" and name.startswith("sparse_peft.tuners.")):
                problems.append(f"{name} line {node.lineno}: {word}")
    assert not problems, "backend choices outside sparse_peft.ops:\n" + "\n".join(problems)


def test_each_kernel_has_one_pytorch_twin_beside_the_others():
    """``kernels/<op>.py`` has its twin (``<op>_reference``; the 2:4 file's op is
    ``semi_structured_linear``) in ``functional/<op>.py``, and no module outside ``functional/``
    defines a ``*_reference`` function of its own."""
    modules = package_modules()
    ops = [name.rpartition(".")[2] for name in modules
           if name.startswith("sparse_peft.kernels.") and not name.rpartition(".")[2].startswith("_")]
    assert ops, "no kernel files found"
    defined = {name: {node.name for node in ast.walk(ast.parse(m.path.read_text(encoding="utf-8")))
                      if isinstance(node, ast.FunctionDef)} for name, m in modules.items()}
    missing = [op for op in ops if not any(function.endswith("_reference")
                                           for function in defined.get(f"sparse_peft.functional.{op}", ()))]
    assert not missing, f"kernels without a twin in sparse_peft/functional/<op>.py: {missing}"
    elsewhere = sorted(f"{name}.{function}" for name, functions in defined.items() for function in functions
                       if function.endswith("_reference") and not name.startswith("sparse_peft.functional."))
    assert not elsewhere, f"PyTorch twins outside sparse_peft/functional/: {elsewhere}"


def test_the_scan_sees_lazy_relative_and_submodule_imports():
    """The checks above see nothing if the scan misses imports: the resolver on a known source."""
    source = (
        "from __future__ import annotations\n"
        "import torch\n"
        "from .. import quantized\n"
        "from .._distributed import full_tensor\n"
        "def later():\n"
        "    from ..sparsity.masks import _hidden\n"
        "    import sparse_peft.training.seft as seft\n"
    )
    known = {"sparse_peft.quantized", "sparse_peft._distributed", "sparse_peft.sparsity.masks",
             "sparse_peft.training.seft"}
    found = imports_of(source, "sparse_peft.tuners._shared", False, known)
    assert [(i.target, i.name, i.line) for i in found] == [
        ("sparse_peft.quantized", None, 3),
        ("sparse_peft._distributed", "full_tensor", 4),
        ("sparse_peft.sparsity.masks", "_hidden", 6),
        ("sparse_peft.training.seft", None, 7),
    ]
    imports = {"sparse_peft.tuners._shared": found}
    upward = upward_imports(imports)
    assert len(upward) == 2 and "sparse_peft.quantized (face)" in upward[0] and "training" in upward[1]
    modules = {name: Module(name, Path(), False) for name in known}
    assert private_imports(imports, modules) == [
        "sparse_peft.tuners._shared imports the private name _hidden of sparse_peft.sparsity.masks at line 6 "
        "(private to sparse_peft.sparsity)"]
    # a package's __init__ resolves one level less
    assert imports_of("from ._checks import check_sddmm", "sparse_peft.kernels", True, set()) == [
        Import("sparse_peft.kernels._checks", "check_sddmm", 1)]
    assert "sparse_peft.kernels.sddmm" in package_modules() and layer_of("sparse_peft.kernels.sddmm") == OPS
