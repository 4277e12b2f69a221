"""The package's layers (docs/architecture.md): no module imports a higher layer, lazily or not."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "torchrec_sid"

# layer -> the layers it may import (besides itself); a module's layer is its first path component under the package
BASE = {"io", "_dist", "metrics", "report", "typed_config"}
ALLOWED: dict[str, set[str]] = {
    "base": set(),
    "sid": {"base"},
    "modules": {"base", "sid"},
    "data": {"base", "sid"},
    "models": {"base", "sid", "modules", "data"},
    "quantizers": {"base", "sid", "modules"},
    "train": {"base", "sid", "modules", "data", "models", "quantizers"},
    "serving": {"base", "sid", "modules", "models"},
    "top": {"base", "sid", "modules", "data", "models", "quantizers", "train", "serving", "jobs", "top"},
}


def layer_of(module: str) -> str:
    """``torchrec_sid.quantizers.base`` -> ``quantizers``; the package face, cli and jobs are the top."""
    parts = module.split(".")
    if len(parts) == 1:
        return "top"
    head = parts[1]
    if head in BASE:
        return "base"
    if head in ALLOWED:
        return head
    return "top"  # cli, __main__, jobs, examples, launch


def imports_of(path: Path) -> set[str]:
    """Every ``torchrec_sid...`` module a file imports, at module level or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("torchrec_sid"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("torchrec_sid")}
    return found


def test_no_module_imports_a_higher_layer() -> None:
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(("torchrec_sid", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(
            ".__init__")
        if module == "torchrec_sid":
            continue  # the package face re-exports lazily (importlib), reading no layer at import
        mine = layer_of(module)
        for target in imports_of(path):
            theirs = layer_of(target)
            if theirs != mine and theirs not in ALLOWED[mine]:
                violations.append(f"{module} ({mine}) imports {target} ({theirs})")
    assert not violations, "\n".join(violations)


@pytest.mark.parametrize("package, absent", [
    ("torchrec_sid.modules", ("torchrec_sid.quantizers", "torchrec_sid.train", "torchrec_sid.data",
                              "torchrec_sid.jobs", "pandas", "sentence_transformers", "matplotlib", "yaml")),
    ("torchrec_sid.sid", ("torchrec_sid.quantizers", "torchrec_sid.modules", "torchrec_sid.train", "torchrec")),
    ("torchrec_sid.serving.artifact", ("torchrec_sid.quantizers", "torchrec_sid.train", "torchrec_sid.data",
                                       "torchrec_sid.models", "torchrec_sid.modules", "torchrec", "pandas", "yaml")),
    ("torchrec_sid.serving.serve", ("torchrec_sid.quantizers", "torchrec_sid.train", "torchrec_sid.data",
                                    "torchrec_sid.jobs", "pandas", "yaml")),
])
def test_importing_a_low_layer_loads_nothing_above_it(package: str, absent: tuple[str, ...]) -> None:
    code = (f"import sys, {package}\n"
            f"print(sorted(m for m in sys.modules for a in {absent!r} if m == a or m.startswith(a + '.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"import {package} loaded {out.strip()}"
