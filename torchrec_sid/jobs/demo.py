"""The README's main job, MovieLens-100k end to end: data -> content embeddings -> SIDs -> sharded 2-process
training of a few DLRM configs through TorchX -> a results table (terminal) and chart (PNG); then the question a
catalogue with a long tail asks, on the synthetic long-tail source (100,000 items, clicks decided by content): at
an equal row budget (1/32 of the catalogue), hashed item ids against SID tokens and table-free SIDE, with the full
id table as the ceiling, on the test period's head, tail (1..5 training impressions) and cold (none) items.

Every stage is a command a user would run by hand (``torchrec-sid quantize --config examples/quantize_*.yaml``,
``torchx run -s local_cwd sid.train --config examples/movielens_*.yaml --nproc 2``). The example configs and the
TorchX components come from the installed package (``torchrec_sid.examples``, ``torchrec_sid.launch``: the
repository's ``examples/`` and ``launch/`` folders, shipped in the wheel and mapped by an editable install), so the
demo runs from any folder; outputs go under ``--out`` (default ``outputs/demo`` in the current folder).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from torchrec_sid.data import movielens
from torchrec_sid.jobs.quantize import QuantizeConfig
from torchrec_sid.jobs.quantize import run as quantize
from torchrec_sid.report import format_metric, format_results

QUANTIZE = ("quantize_rq_kmeans", "quantize_rq_gmm", "quantize_dpca", "quantize_mmq", "quantize_synthetic_tail",
            "quantize_synthetic_tail_dpca")
# finetune_mmq (MMQ stage 2) writes the fine-tuned SIDs that movielens_sid_mmq_ft trains on
TRAIN = ("movielens_id", "movielens_sid_rq_kmeans", "movielens_sid_rq_gmm", "movielens_side", "movielens_sid_mmq",
         "movielens_finetune_mmq", "movielens_sid_mmq_ft", "movielens_hist_din",
         # equal memory on the synthetic long tail: 100,000-row id table vs 3,125 rows of hashed ids / SID tokens
         "synthetic_tail_id", "synthetic_tail_id_hash", "synthetic_tail_sid", "synthetic_tail_side")
SLICES = ("all", "head", "tail", "cold")


def packaged_file(package: str, name: str) -> Path:
    """A file shipped in ``package`` (``torchrec_sid.examples`` or ``torchrec_sid.launch``), as a path on disk."""
    path = Path(str(resources.files(package).joinpath(name)))
    if not path.is_file():
        raise FileNotFoundError(f"{name} is not in the installed {package} ({path}); reinstall torchrec-sid")
    return path


def example(name: str) -> Path:
    """The shipped example config ``name`` (``movielens_id`` -> ``.../torchrec_sid/examples/movielens_id.yaml``)."""
    return packaged_file("torchrec_sid.examples", f"{name}.yaml")


def components_file() -> Path:
    """The TorchX components file (``torchrec_sid/launch/components.py``, registered as ``sid.train`` etc.)."""
    return packaged_file("torchrec_sid.launch", "components.py")


def nearest_titles(embeddings: torch.Tensor, titles: list[str], query: str, k: int = 5) -> list[tuple[str, float]]:
    """The ``k`` titles closest to ``query`` by cosine (``embeddings``: ``[I, D]``, L2-normalised rows)."""
    if query not in titles:
        raise ValueError(f"title {query!r} is not in the catalogue")
    i = titles.index(query)
    scores = embeddings @ embeddings[i]
    scores[i] = -float("inf")
    top = torch.topk(scores, k)
    return [(titles[j], float(s)) for s, j in zip(top.values, top.indices, strict=True)]


def run(ml100k: str | None = None, out: str = "outputs/demo", nproc: int = 2, dry_run: bool = False) -> list[dict]:
    """Runs every stage and returns the training results (also written to ``<out>/results.json`` and ``.png``).

    ``dry_run`` loads and checks every config, asks TorchX for each training job without launching it
    (``torchx run --dryrun``) and prints the plan; it reads no data and returns no results.
    """
    root = Path(out)
    print(f"[demo] examples: {example(QUANTIZE[0]).parent}; TorchX components: {components_file()}; "
          f"outputs: {root.resolve()}")
    if dry_run:
        return _plan(root, ml100k, nproc)
    t0 = time.perf_counter()
    ml = movielens.load(ml100k)
    print(ml.summary())
    content = ml.content()
    titles = ml.items["title"].tolist()
    near = ", ".join(f"{t} ({s:.2f})" for t, s in nearest_titles(content.text, titles, "Star Wars (1977)"))
    print(f"[content] text {tuple(content.text.shape)} ({content.model}); nearest to Star Wars (1977): {near}")

    sids: dict[str, Path] = {}
    for name in QUANTIZE:
        config = _quantize_config(name, root, ml100k)
        fitted = quantize(config)
        if fitted is None:  # only a rank > 0 of a distributed fit returns nothing; the demo runs in one process
            raise RuntimeError(f"quantize {name} returned no SemanticIds")
        m = fitted.metrics
        sids[name.removeprefix("quantize_")] = Path(config.out)
        print(f"[sids] {name.removeprefix('quantize_'):<10} rmse {format_metric(m['rmse'], '.5f')}  cosine loss "
              f"{format_metric(m['cosine_loss'], '.4f')}  utilisation {min(m['utilization']):.3f}  recall@20 "
              f"{m.get('recall@20', float('nan')):.3f}  -> {config.out}")

    results = []
    for name in TRAIN:
        results.append(_train_with_torchx(name, root / "train" / name, sids, ml100k, nproc))
        print(f"[train] {results[-1]['name']:<20} test AUC {results[-1]['metrics']['test']['auc']:.4f}  cold AUC "
              f"{results[-1]['metrics']['cold']['auc']:.4f}")

    print(format_results(results))
    print(format_slices(results))
    (root / "results.json").write_text(json.dumps(results, indent=2))
    plot_results(results, root / "results.png")
    print(f"[demo] results in {root}/results.json and {root}/results.png; {time.perf_counter() - t0:.0f} s in all")
    return results


def _quantize_config(name: str, root: Path, ml100k: str | None) -> QuantizeConfig:
    return QuantizeConfig.from_yaml(example(name), ml100k=ml100k,
                                    out=str(root / f"{name.removeprefix('quantize_')}.safetensors"),
                                    tensorboard=str(root / "tensorboard" / name))


def _plan(root: Path, ml100k: str | None, nproc: int) -> list[dict]:
    """The dry run: every stage's config and command, each training job built by TorchX but not launched."""
    sids: dict[str, Path] = {}
    for name in QUANTIZE:
        config = _quantize_config(name, root, ml100k)
        sids[name.removeprefix("quantize_")] = Path(config.out)
        print(f"[dry-run] quantize {config.method:<10} {example(name)} -> {config.out}")
    for name in TRAIN:
        command = _torchx_command(name, root / "train" / name, sids, ml100k, nproc)
        proc = subprocess.run([*command[:4], "--dryrun", *command[4:]], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"torchx could not build {name} ({' '.join(command)}):\n{proc.stderr[-4000:]}")
        print(f"[dry-run] train {name:<24} torchx {' '.join(command[3:])}")
    print(f"[dry-run] {len(QUANTIZE)} quantize and {len(TRAIN)} TorchX training jobs ready; nothing was run")
    return []


def _torchx_command(name: str, out: Path, sids: dict[str, Path], ml100k: str | None, nproc: int) -> list[str]:
    """``torchx run -s local_cwd <installed components.py>:train`` on one shipped example config."""
    import yaml

    path = example(name)
    config = yaml.safe_load(path.read_text())
    command = [sys.executable, "-m", "torchx.cli.main", "run", "-s", "local_cwd", f"{components_file()}:train",
               "--config", str(path), "--nproc", str(nproc), "--out", str(out)]
    if config.get("semantic_ids"):
        method = Path(config["semantic_ids"]).stem.removeprefix("movielens_")
        command += ["--semantic_ids", str(sids[method])]
    if config.get("tokenizer"):  # MMQ stage 2: the demo's stage-1 tokenizer in, the fine-tuned SIDs out
        sids["mmq_ft"] = sids["mmq"].with_name("mmq_ft.safetensors")
        command += ["--tokenizer", str(QuantizeConfig(out=str(sids["mmq"])).quantizer_path),
                    "--export_semantic_ids", str(sids["mmq_ft"])]
    if ml100k:
        command += ["--ml100k", ml100k]
    return command


def _train_with_torchx(name: str, out: Path, sids: dict[str, Path], ml100k: str | None, nproc: int) -> dict:
    """Runs one example config through TorchX (2 local processes by default); returns its results."""
    command = _torchx_command(name, out, sids, ml100k, nproc)
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0 or not (out / "results.json").is_file():
        raise RuntimeError(f"training {name} failed ({' '.join(command)}):\n{proc.stderr[-4000:]}")
    return json.loads((out / "results.json").read_text())


def format_slices(results: list[dict]) -> str:
    """A table of the test period by the candidate's training impressions: AUC and GAUC of all items, head, tail
    (1..k) and cold (none), with each run's item-embedding rows (``item_rows``: the memory it spends on items)."""
    head = f"{'run':<28} {'item rows':>10}" + "".join(f" {s + ' AUC':>9}" for s in SLICES) + \
        "".join(f" {s + ' GAUC':>10}" for s in ("all", "tail", "cold"))
    lines = ["Test period by training impressions (tail: 1..k, cold: none; GAUC: per-user AUC weighted by "
             "impressions, users with one class skipped)", head]
    for r in results:
        m = r["metrics"]
        if "slice_all" not in m:
            continue
        lines.append(f"{r['name']:<28} {r.get('item_rows', 0):>10,}" + "".join(
            f" {m[f'slice_{s}']['auc']:>9.4f}" for s in SLICES) + "".join(
            f" {m[f'slice_{s}'].get('gauc') or float('nan'):>10.4f}" for s in ("all", "tail", "cold")))
    k = next((r["metrics"]["slice_tail"]["tail_impressions"] for r in results if "slice_tail" in r["metrics"]), None)
    return "\n".join(lines) + (f"\n(k = {k})" if k is not None else "")


def plot_results(results: list[dict], path: Path) -> None:
    """Bar chart of test and cold-start AUC per run, and of the slices' AUC of the equal-memory runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sliced = [r for r in results if r["config"]["data"] == "synthetic" and "slice_all" in r["metrics"]]
    results = [r for r in results if r not in sliced]
    names = [r["name"] for r in results]
    fig, (ax, bottom) = plt.subplots(2, 1, figsize=(1.6 * max(len(names), len(sliced), 4) + 2, 8.5))
    width = 0.38
    for offset, split in ((-width / 2, "test"), (width / 2, "cold")):
        values = [r["metrics"][split]["auc"] for r in results]
        bars = ax.bar([i + offset for i in range(len(names))], values, width, label=f"{split} AUC")
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=15)
    ax.set_ylim(0.5, max((r["metrics"]["test"]["auc"] for r in results), default=0.7) + 0.05)
    ax.set_ylabel("AUC")
    ax.set_title("MovieLens-100k: temporal test split and cold-start items (2-process sharded training)")
    ax.legend()
    _plot_slices(bottom, sliced)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_slices(ax: Any, results: list[dict]) -> None:
    """The equal-memory runs: AUC of every slice, the item rows in the labels."""
    width = 0.8 / len(SLICES)
    for k, name in enumerate(SLICES):
        values = [r["metrics"][f"slice_{name}"]["auc"] for r in results]
        bars = ax.bar([i + (k - 1.5) * width for i in range(len(results))], values, width, label=f"{name} AUC")
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.set_xticks(range(len(results)), [f"{r['name']}\n{r.get('item_rows', 0):,} item rows" for r in results])
    ax.set_ylim(0.45, 0.75)
    ax.set_ylabel("AUC")
    ax.set_title("Synthetic long tail, equal memory: AUC by training impressions (tail 1..5, cold 0)")
    ax.legend(ncol=4, fontsize=8)
