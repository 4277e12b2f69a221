"""Convergence curves, the RQ-GMM paper's Fig. 1 analogue: reconstruction RMSE vs iteration, per level, for
RQ-GMM (EM) and RQ-KMeans (Lloyd), read from the quantizers' ``history_`` (fit with ``tol=0`` so every
iteration runs).

Curves (``max_iter=--iters``, default 30 as in the paper's figure, per level):
    rq_kmeans            Lloyd iterations from k-means++ seeds.
    rq_gmm               the default RQ-GMM: 10 Lloyd iterations of k-means init (plotted dashed at iterations
                         1-10), then EM (iterations 11 onwards); same total iteration axis as RQ-KMeans.
    rq_gmm init_iter=0   EM straight from the k-means++ seeds (like the paper's figure, where both start from
                         about the same RMSE).
RMSE at iteration i is the per-element RMSE of the full reconstruction through this level with the parameters of
iteration i (nearest centroid for k-means, MAP component for RQ-GMM); levels > 1 are fit on each method's own
residuals. The second row of the figure shows RQ-GMM's mean log-likelihood per item per EM iteration, which EM
must never decrease (the RMSE need not fall monotonically under EM); the table counts falls larger than 1e-7
relative (smaller ones, ~1e-6 nats out of ~800, are float32 round-off once EM has converged) and gives the largest.
With ``tol=0`` Lloyd still stops at a fixed point (inertia exactly unchanged): such a curve is drawn to its end and
held at its last value when averaging over seeds.

Data: MovieLens-100k item text embeddings (1,682 x 384), L=3, K=64, ``--seeds`` seeds (mean curve, min-max band);
and the synthetic catalogue (100,000 x 64, L=3, K=256, one seed) unless ``--no-synthetic``.

Run: ``.venv/bin/python benchmarks/convergence.py`` (about 1 minute on 2 cores), smoke run with ``--quick``.
Writes ``benchmarks/results/convergence.png`` (MovieLens), ``benchmarks/results/convergence_synthetic.png`` and the
curves to ``benchmarks/results/convergence.json``; prints a summary table.
"""

from __future__ import annotations

import os

# before torch, faiss and scikit-learn start their OpenMP runtimes: idle threads sleep instead of spinning
# (this 2-core machine is shared; see common.OMP_WAIT_NOTE)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import itertools
import statistics
import time
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from common import (
    RESULTS_DIR,
    add_device_argument,
    device_facts,
    format_table,
    movielens_embeddings,
    resolve_device,
    result_name,
    set_threads,
    stage,
    synthetic_embeddings,
    write_json,
)
from torch import Tensor

from torchrec_sid.quantizers import RQGMM, RQKMeans
from torchrec_sid.quantizers.metrics import rmse

STYLE = {"rq_kmeans": ("tab:blue", "RQ-KMeans (Lloyd)"), "rq_gmm": ("tab:red", "RQ-GMM (10 k-means init + EM)"),
         "rq_gmm init_iter=0": ("tab:orange", "RQ-GMM (EM from k-means++ seeds)")}
NEAR_FINAL = 0.001  # "converged": within 0.1% of the level's final RMSE
LL_NOISE = 1e-7  # relative: a log-likelihood fall smaller than this is float32 round-off (E-step matmul), not a bug


def curves_of(quantizer: RQKMeans | RQGMM) -> list[dict[str, list[float]]]:
    """Per level: ``x`` (iteration at this level, from 1), ``rmse``, ``stage`` and, for EM, ``ll``."""
    out = []
    for level in range(quantizer.levels):
        entries = [h for h in quantizer.history_ if h["level"] == level]
        out.append({"x": list(range(1, len(entries) + 1)), "rmse": [h["rmse"] for h in entries],
                    "stage": [h["stage"] for h in entries],
                    "ll": [h.get("log_likelihood") for h in entries]})
    return out


def fit_all(x: Tensor, levels: int, k: int, iters: int, seeds: list[int]) -> dict[str, Any]:
    builders = {
        "rq_kmeans": lambda s: RQKMeans(levels=levels, codebook_size=k, max_iter=iters, tol=0.0, seed=s),
        "rq_gmm": lambda s: RQGMM(levels=levels, codebook_size=k, max_iter=iters, tol=0.0, seed=s),
        "rq_gmm init_iter=0": lambda s: RQGMM(levels=levels, codebook_size=k, max_iter=iters, tol=0.0, init_iter=0,
                                              seed=s),
    }
    methods = {}
    for name, build in builders.items():
        runs = []
        with stage(f"{name} x {len(seeds)} seeds"):
            for seed in seeds:
                q = build(seed).fit(x)
                codes = q.encode(x)
                runs.append({"seed": seed, "levels": curves_of(q),
                             "encode_rmse_per_level": [rmse(x, q.decode(codes[:, : lv + 1])) for lv in range(levels)]})
        methods[name] = {"config": {k_: v for k_, v in build(0).get_params().items() if k_ != "seed"}, "runs": runs}
    return methods


def summarise(methods: dict[str, Any], levels: int) -> list[dict[str, Any]]:
    rows = []
    for name, m in methods.items():
        for level in range(levels):
            per_run = []
            for run in m["runs"]:
                c = run["levels"][level]
                em = [i for i, s in enumerate(c["stage"]) if s != "kmeans_init"]  # Lloyd or EM iterations
                r = [c["rmse"][i] for i in em]
                final = r[-1]
                near = next(i for i, v in enumerate(r) if abs(v - final) <= NEAR_FINAL * final) + 1
                lls = [c["ll"][i] for i in em if c["ll"][i] is not None]
                per_run.append({"encode": run["encode_rmse_per_level"][level], "start": r[0], "final": final,
                                "best": min(r), "near": near,
                                "init_start": c["rmse"][0],
                                "ll_first": lls[0] if lls else None, "ll_last": lls[-1] if lls else None,
                                "ll_decreases": sum(b < a - LL_NOISE * abs(a) for a, b in itertools.pairwise(lls)),
                                "ll_largest_fall": (max([a - b for a, b in itertools.pairwise(lls)] + [0.0])
                                                    if lls else None),
                                "rmse_increases": sum(b > a * (1 + 1e-9) for a, b in itertools.pairwise(r)),
                                "iterations": len(r)})
            mean = {key: (statistics.fmean(p[key] for p in per_run) if per_run[0][key] is not None else None)
                    for key in per_run[0]}
            rows.append({"method": name, "level": level + 1, **mean,
                         "drop_pct": 100 * (1 - mean["final"] / mean["start"]),
                         "drop_from_init_pct": 100 * (1 - mean["final"] / mean["init_start"])})
    return rows


def _pad(values: list[float], length: int) -> list[float]:
    """A curve that stopped early (Lloyd reached a fixed point: ``tol=0`` stops only then) held at its last value."""
    return list(values) + [values[-1]] * (length - len(values))


def _zoom_past_first(ax: Any, curves: list[np.ndarray], what: str, higher_is_better: bool) -> None:
    """Y range over iterations 2.. of ``curves``; iteration 1 (raw k-means++ seeds / first E-step) is far off and
    would flatten everything else, so it is named in a note instead."""
    if not curves:
        return
    rest = np.concatenate([c[1:] for c in curves if len(c) > 1])
    low, high = rest.min(), rest.max()
    pad = 0.06 * (high - low) or 1e-6
    ax.set_ylim(low - pad, high + pad)
    first = min(c[0] for c in curves) if higher_is_better else max(c[0] for c in curves)
    if first < low - pad or first > high + pad:  # rising curves end top right: put the note at the bottom then
        y, va = (0.03, "bottom") if higher_is_better else (0.97, "top")
        ax.annotate(f"iteration 1: {what} down to {first:.4g}, off scale" if higher_is_better
                    else f"iteration 1: {what} up to {first:.4g}, off scale", (0.98, y), xycoords="axes fraction",
                    ha="right", va=va, fontsize=8, color="dimgrey")


def plot(methods: dict[str, Any], levels: int, title: str, path: Path) -> None:
    fig, axes = plt.subplots(2, levels, figsize=(5.2 * levels, 8.2), squeeze=False)
    for level in range(levels):
        ax, ax_ll = axes[0, level], axes[1, level]
        ll_curves: list[np.ndarray] = []
        for name, m in methods.items():
            color, label = STYLE[name]
            runs = [run["levels"][level] for run in m["runs"]]
            longest = max(runs, key=lambda run: len(run["x"]))
            xs = np.array(longest["x"])
            r = np.array([_pad(run["rmse"], len(xs)) for run in runs])
            is_init = np.array([s == "kmeans_init" for s in longest["stage"]])
            mean = r.mean(0)
            if is_init.any():  # dashed k-means init, solid EM, joined at the switch
                last_init = int(np.flatnonzero(is_init)[-1])
                ax.plot(xs[: last_init + 2], mean[: last_init + 2], color=color, ls=(0, (4, 3)), lw=1.4, zorder=3)
                ax.plot(xs[last_init + 1 :], mean[last_init + 1 :], color=color, lw=2, label=label, zorder=2)
                ax.axvline(xs[last_init] + 0.5, color="grey", ls=":", lw=1)
                ax.annotate(" EM starts", (xs[last_init] + 0.5, 0.03), xycoords=("data", "axes fraction"),
                            fontsize=8, color="grey", va="bottom")
            else:
                ax.plot(xs, mean, color=color, lw=3.2 if name == "rq_kmeans" else 2, label=label,
                        zorder=1 if name == "rq_kmeans" else 2, alpha=0.85 if name == "rq_kmeans" else 1)
            if len(runs) > 1:
                ax.fill_between(xs, r.min(0), r.max(0), color=color, alpha=0.15, lw=0)
            lls = [[v for v in run["ll"] if v is not None] for run in runs]
            if lls[0]:
                ll = np.array([_pad(v, max(map(len, lls))) for v in lls]).mean(0)
                ax_ll.plot(np.arange(1, len(ll) + 1), ll, color=color, lw=2, label=label)
                ll_curves.append(ll)
        ax.set_title(f"level {level + 1}: RMSE of the reconstruction through level {level + 1}", fontsize=10)
        ax.set_xlabel("iteration at this level (Lloyd; RQ-GMM: k-means init, then EM)")
        ax.set_ylabel("per-element RMSE")
        ax.grid(alpha=0.3)
        means = [np.mean([_pad(run["levels"][level]["rmse"], max(len(r["levels"][level]["rmse"]) for r in m["runs"]))
                          for run in m["runs"]], 0) for m in methods.values()]
        _zoom_past_first(ax, means, "RMSE", higher_is_better=False)
        _zoom_past_first(ax_ll, ll_curves, "LL", higher_is_better=True)
        ax_ll.set_title(f"level {level + 1}: RQ-GMM mean log-likelihood per item", fontsize=10)
        ax_ll.set_xlabel("EM iteration")
        ax_ll.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax_ll.set_ylabel("mean log-likelihood (nats)")
        ax_ll.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.suptitle(title, fontsize=12)
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=10, frameon=False,
               bbox_to_anchor=(0.5, 0.955))
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_summary(name: str, rows: list[dict[str, Any]]) -> None:
    columns = [("method", "method", None), ("level", "level", None), ("init_start", "RMSE it 1", ".5f"),
               ("start", "RMSE EM/Lloyd start", ".5f"), ("final", "RMSE last it", ".5f"), ("best", "best", ".5f"),
               ("encode", "encode RMSE", ".5f"),
               ("drop_pct", "drop %", ".2f"), ("near", "its to 0.1% of final", ".1f"),
               ("rmse_increases", "RMSE rises", ".1f"), ("ll_first", "LL first", ".2f"), ("ll_last", "LL last", ".2f"),
               ("ll_decreases", "LL falls", ".1f"), ("ll_largest_fall", "largest LL fall", ".1e")]
    print(format_table(rows, columns, f"\n== {name} =="))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 5 iterations, 1 seed, no synthetic")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=3, help="seeds on MovieLens-100k (mean curve, min-max band)")
    parser.add_argument("--no-synthetic", action="store_true", help="skip the synthetic 100k catalogue")
    parser.add_argument("--synthetic-items", type=int, default=100_000)
    parser.add_argument("--threads", type=int, default=2)
    add_device_argument(parser, "RQ-KMeans and RQ-GMM have no GPU path: on cuda they still fit on the CPU, and the "
                                "results go to convergence*_cuda[_quick].json / .png")
    args = parser.parse_args()
    device = resolve_device(args.device)
    if args.quick:
        args.iters, args.seeds, args.no_synthetic = 5, 1, True
    threads = set_threads(args.threads)
    started = time.perf_counter()
    suffix = result_name("", device) + ("_quick" if args.quick else "")  # *_quick.* files are git-ignored
    datasets = []
    x = movielens_embeddings()
    specs = [("movielens-100k", x, 3, 64, list(range(args.seeds)), RESULTS_DIR / f"convergence{suffix}.png")]
    if not args.no_synthetic:
        xs, _ = synthetic_embeddings(args.synthetic_items)
        specs.append((f"synthetic-{args.synthetic_items // 1000}k", xs, 3, 256, [0],
                      RESULTS_DIR / f"convergence_synthetic{suffix}.png"))
    for name, data, levels, k, seeds, png in specs:
        print(f"\n{name}: N={len(data)}, D={data.shape[1]}, L={levels}, K={k}, {args.iters} iterations, seeds {seeds}")
        methods = fit_all(data, levels, k, args.iters, seeds)
        rows = summarise(methods, levels)
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        plot(methods, levels, f"{name} (N={len(data)}, D={data.shape[1]}, K={k}): convergence per level "
                              f"(mean of {len(seeds)} seed{'s' if len(seeds) > 1 else ''}"
                              f"{', band = min-max' if len(seeds) > 1 else ''})", png)
        datasets.append({"dataset": name, "num_items": len(data), "dim": data.shape[1], "levels": levels,
                         "codebook_size": k, "seeds": seeds, "png": png, "summary": rows, "methods": methods})
    for d in datasets:
        print_summary(f"{d['dataset']}: L={d['levels']}, K={d['codebook_size']}, mean over seeds {d['seeds']}",
                      d["summary"])
    path = write_json(f"convergence{suffix}", {"settings": {**vars(args), "threads_set": threads,
                                                            **device_facts(device), "computed_on": "cpu"},
                                               "wall_s": time.perf_counter() - started, "datasets": datasets})
    print(f"\nwrote {path} and {', '.join(str(d['png']) for d in datasets)} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
