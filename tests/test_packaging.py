"""What a user of the package gets: its package list, version, light serving import, the wheel's contents
(examples, TorchX components, LICENSE, dependencies) and the demo's dry run from an empty folder."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest

import torchrec_sid

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_package_list_names_every_package() -> None:
    # setuptools cannot mix discovery with the examples/ and launch/ mappings, so the list is explicit
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "torchrec_sid").rglob("__init__.py")
             if "__pycache__" not in p.parts}
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    assert listed == found | {"torchrec_sid.examples", "torchrec_sid.launch"}
    assert PYPROJECT["tool"]["setuptools"]["package-dir"] == {"torchrec_sid.examples": "examples",
                                                              "torchrec_sid.launch": "launch"}


def test_version_is_stated_once() -> None:
    assert torchrec_sid.__version__ == version("torchrec-sid") == PYPROJECT["project"]["version"]


def test_serving_import_loads_no_quantizer_training_or_extra_module(tmp_path: Path) -> None:
    code = ("import sys, torchrec_sid.modules, torchrec_sid.sid\n"
            "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in {'torchrec_sid', 'yaml', 'pandas', "
            "'tensorboard', 'torchx', 'sentence_transformers', 'matplotlib', 'pyarrow'})))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = proc.stdout.split()
    assert "torchrec_sid.modules" in loaded
    assert not [m for m in loaded if m.startswith(("torchrec_sid.quantizers", "torchrec_sid.train",
                                                   "torchrec_sid.jobs", "torchrec_sid.data"))], loaded
    assert not [m for m in loaded if not m.startswith("torchrec_sid")], "an optional dependency was imported"


def test_demo_dry_run_finds_its_configs_and_components_from_any_folder(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "torchrec_sid", "demo", "--dry-run", "--out", "here"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"examples: {ROOT / 'examples'}; TorchX components: {ROOT / 'launch' / 'components.py'}" in proc.stdout
    assert f"outputs: {tmp_path / 'here'}" in proc.stdout
    assert "6 quantize and 12 TorchX training jobs ready; nothing was run" in proc.stdout
    assert list(tmp_path.iterdir()) == [], "a dry run writes nothing"


@pytest.mark.slow
def test_wheel_ships_examples_components_license_and_dependencies(tmp_path: Path) -> None:
    src = tmp_path / "src"  # a copy: setuptools writes build/ and *.egg-info next to the sources
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    for folder in ("torchrec_sid", "examples", "launch"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                           "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("torchrec_sid-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        info = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = z.read(info).decode()
        entry_points = z.read(info.replace("METADATA", "entry_points.txt")).decode()
    examples = {f"torchrec_sid/examples/{p.name}" for p in (ROOT / "examples").glob("*.yaml")}
    assert len(examples) >= 16 and examples <= names
    assert {"torchrec_sid/launch/__init__.py", "torchrec_sid/launch/components.py"} <= names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert not [n for n in names if n.startswith(("examples/", "launch/", "tests/", "benchmarks/"))]
    requires = {line.split(": ", 1)[1] for line in metadata.splitlines() if line.startswith("Requires-Dist: ")}
    assert {"torchrec==1.8.0", "safetensors"} <= requires and any(r.startswith("torch<") for r in requires)
    assert 'fbgemm-gpu==1.8.0+cpu; extra == "cpu"' in requires and 'fbgemm-gpu==1.8.0; extra == "gpu"' in requires
    assert not [r for r in requires if r.startswith(("pandas", "sentence-transformers", "torchx", "matplotlib"))
                and "extra ==" not in r], "optional dependencies are extras"
    assert "sid = torchrec_sid.launch.components" in entry_points and "torchrec-sid = torchrec_sid.cli:main" in \
        entry_points
