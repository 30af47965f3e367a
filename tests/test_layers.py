"""Layers call down only: an import-rule check over every module file (static, AST).

Layers, bottom to top: ``kspace``, ``models``, ``data``, ``qc``, ``utils`` -> ``lit`` ->
``runs`` -> ``tasks`` -> ``cli`` / ``api``. The bottom layers never import the layers above
them, and ``qc`` (measures and reports) never imports Lightning either. Imports inside
functions count as much as module-level ones. (``data`` may use Lightning: its data modules
are ``LightningDataModule``s.)
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "qcflow"
#: the layers above the bottom ones
UPPER = ("qcflow.tasks", "qcflow.lit", "qcflow.runs", "qcflow.cli", "qcflow.api")
#: what each bottom layer may not import
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "qc": (*UPPER, "pytorch_lightning", "lightning"),
    "models": UPPER,
    "kspace": UPPER,
    "data": UPPER,
    "utils": UPPER,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, module: str) -> list[tuple[int, str]]:
    """``(line, module)`` of every import in ``source`` (any depth; relative ones resolved
    against ``module``, the dotted name of the file; ``from a import b`` yields ``a.b`` too,
    so ``from qcflow import tasks`` counts as importing ``qcflow.tasks``)."""
    out = []
    package = module.split(".")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + (1 if _is_package(module) else 0)]
                name = ".".join([*base, *([node.module] if node.module else [])])
            else:
                name = node.module or ""
            out.append((node.lineno, name))
            out += [(node.lineno, f"{name}.{alias.name}") for alias in node.names]
    return out


def _is_package(module: str) -> bool:
    return (PACKAGE.parent / Path(*module.split(".")) / "__init__.py").is_file()


def violations(source: str, module: str, forbidden: tuple[str, ...]) -> list[str]:
    """``module:line imports name`` for each import of a ``forbidden`` module (or below it)."""
    return [
        f"{module}:{line} imports {name}"
        for line, name in imported_modules(source, module)
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    ]


def _files(layer: str) -> list[Path]:
    return sorted((PACKAGE / layer).rglob("*.py"))


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_bottom_layers_import_nothing_above_them(layer: str) -> None:
    files = _files(layer)
    assert files, f"qcflow/{layer} has no module files"
    found = [
        v
        for path in files
        for v in violations(path.read_text(), _module_name(path), FORBIDDEN[layer])
    ]
    assert not found, "imports that run back up:\n" + "\n".join(found)


def test_the_check_can_fail() -> None:
    """The rule sees module-level, function-level, relative and ``from qcflow import x`` imports."""
    source = """
import pytorch_lightning as pl
from qcflow.qc.iqm import snr

def load():
    from qcflow.runs.flow import load_flow
    import qcflow.tasks.score
    from qcflow import lit
    from ..tasks import common
    from . import plots
"""
    found = violations(source, "qcflow.qc.scorers", FORBIDDEN["qc"])
    assert [v.split(" imports ")[1] for v in found] == [
        "pytorch_lightning",
        "qcflow.runs.flow",
        "qcflow.runs.flow.load_flow",
        "qcflow.tasks.score",
        "qcflow.lit",
        "qcflow.tasks",
        "qcflow.tasks.common",
    ]
    assert violations(source, "qcflow.data.synth", FORBIDDEN["data"])  # tasks, runs, lit
    assert not violations("import torch\nfrom qcflow.qc import iqm\n", "qcflow.qc.x", UPPER)


def test_importing_the_bottom_layers_loads_no_lightning() -> None:
    """At run time too: importing every module of qc, models, kspace (its Lightning adapter
    aside) and the top-level package loads neither Lightning nor the tasks."""
    import subprocess
    import sys

    script = """
import importlib, pkgutil, sys
import qcflow
for pkg in ("qcflow.qc", "qcflow.models", "qcflow.kspace"):
    mod = importlib.import_module(pkg)
    for m in pkgutil.iter_modules(mod.__path__):
        if f"{pkg}.{m.name}" != "qcflow.kspace.lightning":
            importlib.import_module(f"{pkg}.{m.name}")
bad = [k for k in sys.modules if k.split(".")[0] in ("pytorch_lightning", "lightning")
       or k.startswith(("qcflow.tasks", "qcflow.lit", "qcflow.runs", "qcflow.cli", "qcflow.api"))]
print(",".join(sorted(bad)))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", out.stdout
