"""MMQ stage 1 vs RQ-VAE on the same two modalities, at the same token budget (6 tokens of K = 64 codes).

Modalities:
    movielens   text: MiniLM title+genres+year embeddings [1682, 384]; meta: genre multi-hot (19) + release
                decade one-hot (1920s ... 1990s, unknown: 9) = [1682, 28]. A metadata second modality rather
                than a collaborative embedding: stage 1 stays content-only as in the paper (behaviour enters in
                stage 2), every item including cold ones has it, and nothing from the ratings can leak. It is
                weak: the text sentence already names the genres and the year.
    synthetic   ``generate_items(SyntheticConfig(num_items=--synthetic-items))``: text = clustered content
                [N, 64]; meta = genre flags [N, 20] (no year in the generator).

Methods (losses: squared error per modality, the paper's L_recon / L_aux):
    mmq           MMQ(num_shared=2, num_specific=2, K=64, d=64, alpha=12, beta=10, gamma=0.005)
    mmq gamma=0   the same without orthogonal regularisation (the paper's "w/o orthogonal reg." ablation)
    ma_rq_vae     modality-aligned RQ-VAE: VQ-fusion of both modalities into one latent, 6 levels x 64
    ms_rq_vae     modality-separated RQ-VAE: 3 levels x 64 on text + 3 levels x 64 on meta, codes concatenated

Metrics, over every item:
    cos text / cos meta   cosine loss ``1 - cos(x, x_hat)`` of the reconstruction from the SID alone (MMQ: the
                          decoder with the training items' mean gate, since gates are not in the SID); ``gated``:
                          MMQ with each item's own gates.
    sq text / sq meta     ``||x - x_hat||^2`` per item, mean (what the methods are trained on).
    util / entropy        per token: fraction of the 64 codes used, and the entropy of code usage in nats
                          (ln 64 = 4.159 when uniform); mean over the 6 tokens (min utilisation too).
    unique                fraction of items whose 6-token SID no other item shares.
    |cos| weights         expert orthogonality: mean |cos| between the flattened Linear weights of two experts
                          of one group (groups: shared, text-specific, meta-specific; the quantity L_ortho
                          penalises), averaged over pairs and groups.
    |cos| outputs         mean over items and same-group expert pairs of |cos(z_i(x), z_j(x))| of the experts'
                          raw outputs (what the cosine codebooks see); ``centred``: of the outputs minus each
                          expert's mean output over the items.
    s/epoch, encode       training seconds per epoch (fit time / epochs run) and encode throughput (items/s).

Run: ``.venv/bin/python benchmarks/mmq_stage1.py`` (about 4 minutes on 2 cores), smoke run with ``--quick``.
Prints a table per dataset and writes ``benchmarks/results/mmq_stage1.json``.

``--orthogonality`` runs only the orthogonality sweep (MovieLens, one seed, K = 32, d = 32, H = 128, ``--epochs``
epochs without early stopping): each form of ``L_ortho`` (``MMQ.orthogonality``: ``weights``, the flattened
expert weights; ``layers``, per layer; ``outputs``, the experts' centred outputs) at gamma 0, 0.005 (the paper's)
and 0.5, reporting the within-group ``|cos|`` of the flattened centred outputs
(``MMQTokenizer.output_similarity``), the reconstruction loss and the code utilisation. Writes
``benchmarks/results/mmq_orthogonality.json``.
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import time
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from common import (
    add_device_argument,
    device_facts,
    format_table,
    resolve_device,
    result_name,
    set_threads,
    stage,
    time_call,
    write_json,
)
from torch import Tensor

from torchrec_sid.quantizers import MMQ, RQVAE
from torchrec_sid.quantizers.autoencoder import NeuralQuantizer
from torchrec_sid.quantizers.metrics import cosine_loss, perplexity, utilization
from torchrec_sid.quantizers.mmq import flat_weights, mean_abs_cosine
from torchrec_sid.sid.codes import collision_rate

CODEBOOK_SIZE = 64
SIGNALS = {"meta": "mse", "text": "mse"}


def movielens_modalities() -> dict[str, Tensor]:
    """``{"text": [1682, 384], "meta": [1682, 28]}``: MiniLM text; genres + release-decade one-hot (+ unknown)."""
    from torchrec_sid.data import movielens

    return movielens.load().signals(progress=False)


def synthetic_modalities(num_items: int) -> dict[str, Tensor]:
    """``{"text": [N, 64], "meta": [N, 20]}``: the generator's content and genre flags."""
    from torchrec_sid.data.synthetic import SyntheticConfig, generate_items

    return generate_items(SyntheticConfig(num_items=num_items, seed=0)).signals()


def fit_timed(q: NeuralQuantizer, x: Tensor | dict[str, Tensor]) -> tuple[float, int]:
    start = time.perf_counter()
    q.fit(x)
    return time.perf_counter() - start, len(q.history_)


def reconstruction(data: dict[str, Tensor], decoded: dict[str, Tensor], prefix: str = "") -> dict[str, float]:
    out = {}
    for m, x in data.items():
        out[f"{prefix}cos_{m}"] = cosine_loss(x, decoded[m])
        out[f"{prefix}sq_{m}"] = ((x - decoded[m]) ** 2).sum(1).mean().item()
    return out


def code_stats(codes: Tensor) -> dict[str, float]:
    cards = [CODEBOOK_SIZE] * codes.shape[1]
    used = utilization(codes, cards)
    return {"util": statistics.fmean(used), "util_min": min(used),
            "entropy": statistics.fmean(math.log(p) for p in perplexity(codes, cards)),
            "unique": 1.0 - collision_rate(codes)}


@torch.no_grad()
def orthogonality(q: MMQ, data: dict[str, Tensor]) -> dict[str, float]:
    """Mean |cos| within expert groups, of flattened weights and of outputs (see the module docstring)."""
    model = q.model_
    groups = model.expert_groups
    outputs = model.expert_outputs(data)
    sizes = [len(g) for g in groups.values()]
    starts = np.cumsum([0, *sizes[:-1]])
    pairs = [(s + i, s + j) for s, n in zip(starts, sizes, strict=True) for i, j in itertools.combinations(range(n), 2)]
    centred = [z - z.mean(0) for z in outputs]
    weight_cos = {name: mean_abs_cosine(flat_weights(g)) for name, g in groups.items() if len(g) > 1}
    return {"cos_weights": statistics.fmean(weight_cos.values()),
            "cos_outputs": statistics.fmean(mean_abs_cos_rows(outputs[i], outputs[j]) for i, j in pairs),
            "cos_outputs_centred": statistics.fmean(mean_abs_cos_rows(centred[i], centred[j]) for i, j in pairs),
            **{f"cos_weights_{k}": v for k, v in weight_cos.items()}}


def mean_abs_cos_rows(a: Tensor, b: Tensor) -> float:
    """Mean over rows of ``|cos(a_i, b_i)|``, ``a, b: [N, d]``."""
    return F.cosine_similarity(a, b, dim=1).abs().mean().item()


def run_mmq(data: dict[str, Tensor], training: dict[str, Any], gamma: float, seed: int) -> dict[str, Any]:
    q = MMQ(SIGNALS, codebook_size=CODEBOOK_SIZE, gamma=gamma, **training, seed=seed)
    fit_s, epochs = fit_timed(q, data)
    codes = q.encode(data)
    encode, _ = time_call(lambda: q.encode(data), repeats=3, warmup=0)
    gated = q.reconstruct_signals(data)
    return {"fit_s": fit_s, "epochs": epochs, "encode_s": encode["median_s"],
            **reconstruction(data, q.decode_signals(codes)), **reconstruction(data, gated, "gated_"),
            **code_stats(codes), **orthogonality(q, data)}


def run_ma_rq_vae(data: dict[str, Tensor], training: dict[str, Any], seed: int) -> dict[str, Any]:
    q = RQVAE(levels=6, codebook_size=CODEBOOK_SIZE, latent_dim=64, signals=SIGNALS, **training, seed=seed)
    fit_s, epochs = fit_timed(q, data)
    codes = q.encode(data)
    encode, _ = time_call(lambda: q.encode(data), repeats=3, warmup=0)
    return {"fit_s": fit_s, "epochs": epochs, "encode_s": encode["median_s"],
            **reconstruction(data, q.decode_signals(codes)), **code_stats(codes)}


def run_ms_rq_vae(data: dict[str, Tensor], training: dict[str, Any], seed: int) -> dict[str, Any]:
    fit_s, epochs, encode_s, codes, decoded = 0.0, 0, 0.0, [], {}
    for m, loss in SIGNALS.items():
        q = RQVAE(levels=3, codebook_size=CODEBOOK_SIZE, latent_dim=64, signals={m: loss}, **training, seed=seed)
        seconds, n = fit_timed(q, {m: data[m]})
        fit_s, epochs = fit_s + seconds, epochs + n
        codes.append(q.encode({m: data[m]}))
        encode, _ = time_call(lambda q=q, m=m: q.encode({m: data[m]}), repeats=3, warmup=0)
        encode_s += encode["median_s"]
        decoded[m] = q.decode(codes[-1])
    return {"fit_s": fit_s, "epochs": epochs, "encode_s": encode_s, **reconstruction(data, decoded),
            **code_stats(torch.cat(codes, dim=1))}


def summarise(dataset: str, method: str, runs: list[dict[str, Any]], num_items: int) -> dict[str, Any]:
    """Mean over seeds of every metric, plus seconds per epoch and items/s."""
    row: dict[str, Any] = {"data": dataset, "method": method, "seeds": len(runs)}
    for key in runs[0]:
        row[key] = statistics.fmean(r[key] for r in runs)
    row["s_per_epoch"] = statistics.fmean(r["fit_s"] / r["epochs"] for r in runs)
    row["encode_items_per_s"] = num_items / row["encode_s"]
    row["std_cos_text"] = statistics.pstdev(r["cos_text"] for r in runs)
    return row


def orthogonality_sweep(epochs: int, threads: dict[str, Any], device: torch.device) -> None:
    """The ``--orthogonality`` table (module docstring)."""
    data = movielens_modalities()
    rows = []
    for form, gamma in [("weights", 0.0), ("weights", 0.005), ("weights", 0.5), ("layers", 0.005), ("layers", 0.5),
                        ("outputs", 0.005), ("outputs", 0.5)]:
        with stage(f"{form} gamma={gamma}"):
            q = MMQ(SIGNALS, codebook_size=32, latent_dim=32, hidden_dim=128, gamma=gamma, orthogonality=form,
                    max_epochs=epochs, patience=epochs, seed=0).fit(data)
        sims = q.model_.output_similarity(data)
        rows.append({"form": "none" if gamma == 0 else form, "gamma": gamma, "cos": statistics.fmean(sims.values()),
                     **{f"cos_{k}": v for k, v in sims.items()}, "recon": q.history_[-1]["valid_loss"],
                     "util": statistics.fmean(utilization(q.encode(data), q.cardinalities))})
    print(format_table(rows, [("form", "L_ortho on", None), ("gamma", "gamma", "g"), ("cos", "|cos| outputs", ".3f"),
                              ("cos_shared", "shared", ".3f"), ("cos_text", "text", ".3f"), ("cos_meta", "meta", ".3f"),
                              ("recon", "valid recon", ".4f"), ("util", "util", ".3f")],
                       title=f"MMQ orthogonality on MovieLens ({epochs} epochs, seed 0, {threads['torch']} torch "
                             f"thread(s)): "
                             f"within-group |cos| of the experts' centred outputs"))
    path = write_json(result_name('mmq_orthogonality', device), {'epochs': epochs, 'threads': threads, 'rows': rows,
                                                       'device': {**device_facts(device), 'computed_on': 'cpu'}})
    print(f"\nwrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orthogonality", action="store_true", help="only the orthogonality sweep (docstring)")
    parser.add_argument("--epochs", type=int, default=40, help="epochs of the orthogonality sweep")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 epochs, 2k synthetic items, 1 seed")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per method on MovieLens-100k")
    parser.add_argument("--synthetic-items", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    add_device_argument(parser, "the MMQ and RQ-VAE quantizers have no GPU path: on cuda they still train and "
                                "encode on the CPU, and the results go to <name>_cuda.json")
    args = parser.parse_args()
    device = resolve_device(args.device)
    threads = set_threads(args.threads)
    if args.orthogonality:
        orthogonality_sweep(args.epochs, threads, device)
        return
    common = {"hidden_dim": 256}
    datasets = {  # name -> (data, training settings, seeds)
        "movielens": (movielens_modalities, {"max_epochs": 150, "patience": 15, "batch_size": 256}, args.seeds),
        "synthetic": (lambda: synthetic_modalities(args.synthetic_items),
                      {"max_epochs": 25, "patience": 4, "batch_size": 512}, 1),
    }
    if args.quick:
        datasets = {"movielens": (movielens_modalities, {"max_epochs": 2, "patience": 2, "batch_size": 256}, 1),
                    "synthetic": (lambda: synthetic_modalities(2_000),
                                  {"max_epochs": 2, "patience": 2, "batch_size": 256}, 1)}
    results: dict[str, Any] = {"threads": threads, "device": {**device_facts(device), "computed_on": "cpu"},
                               "codebook_size": CODEBOOK_SIZE, "datasets": {}, "rows": []}
    for dataset, (load, training, seeds) in datasets.items():
        print(f"{dataset}:")
        data = load()
        training = {**common, **training}
        methods = {
            "mmq": partial(run_mmq, data, training, 0.005),
            "mmq gamma=0": partial(run_mmq, data, training, 0.0),
            "ma_rq_vae": partial(run_ma_rq_vae, data, training),
            "ms_rq_vae": partial(run_ms_rq_vae, data, training),
        }
        runs: dict[str, list[dict[str, Any]]] = {}
        for method, run in methods.items():
            for seed in range(seeds):
                with stage(f"{method} seed {seed}"):
                    runs.setdefault(method, []).append(run(seed))
        num_items = len(data["text"])
        results["datasets"][dataset] = {"num_items": num_items, "dims": {k: v.shape[1] for k, v in data.items()},
                                        "training": training, "seeds": seeds, "runs": runs}
        results["rows"] += [summarise(dataset, method, r, num_items) for method, r in runs.items()]
    print()
    print(format_table(results["rows"], [
        ("data", "data", None), ("method", "method", None), ("cos_text", "cos text", ".4f"),
        ("std_cos_text", "std", ".4f"), ("cos_meta", "cos meta", ".4f"), ("gated_cos_text", "gated text", ".4f"),
        ("gated_cos_meta", "gated meta", ".4f"), ("sq_text", "sq text", ".4f"), ("sq_meta", "sq meta", ".4f")],
        title="Reconstruction from the 6-token SID (cosine loss and squared error per modality; gated: MMQ with "
              "each item's own gates)"))
    print()
    print(format_table(results["rows"], [
        ("data", "data", None), ("method", "method", None), ("util", "util", ".3f"), ("util_min", "util min", ".3f"),
        ("entropy", "entropy", ".3f"), ("unique", "unique", ".3f"), ("cos_weights", "|cos| weights", ".4f"),
        ("cos_outputs", "|cos| outputs", ".4f"), ("cos_outputs_centred", "centred", ".4f"),
        ("epochs", "epochs", ".0f"), ("s_per_epoch", "s/epoch", ".3f"),
        ("encode_items_per_s", "encode items/s", ",.0f")],
        title=f"Codes, expert orthogonality and speed (K = {CODEBOOK_SIZE}, entropy in nats, ln K = "
              f"{math.log(CODEBOOK_SIZE):.3f}; {args.threads} thread(s))"))
    path = write_json(result_name("mmq_stage1", device) + ("_quick" if args.quick else ""), results)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
