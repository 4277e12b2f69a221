"""SIDE paper Tables 1 and 2 on our data: RQ-VAE, DPCA and FSQ at 24 bits, 1:1 vs VQ-fusion, and neighbour recall.

Data (both have a dense text-like embedding and a categorical genre multi-hot):
    movielens   MovieLens-100k: MiniLM text embeddings [1682, 384] (L2-normalised) and genres [1682, 19].
    synthetic   ``generate_items(SyntheticConfig(num_items=--synthetic-items))``: clustered content [N, 64]
                (L2-normalised) and genre flags [N, 20] drawn from the item's cluster.

Quantizers, 24 bits each (torchrec_sid.quantizers, MLP encoder / decoder, hidden 256):
    rq_vae   3 levels x 256 codes (24 bits), latent 32
    dpca     3 groups x 5 levels of ternary digits (15 digits, 23.8 bits), latent 48
    fsq      8 dimensions x 8 levels (24 bits)

Table 1 (cosine reconstruction loss, mean ``1 - cos(x, x_hat)`` over every item):
    1:1      one 24-bit quantizer per signal, each trained with the cosine loss; the genre multi-hot is treated
             as an embedding (its reconstruction is a unit vector scored against the multi-hot).
    fusion   one 24-bit VQ-fusion quantizer over both signals (so half the bits of the two 1:1 codes), cosine
             loss on each, weights 1.
    delta%   (fusion - 1:1) / 1:1 per signal (mean over seeds; std over seeds of the fusion loss). The paper's
             finding to test: DPCA degrades least under fusion.
    Both signals use the cosine loss, as the paper's two embeddings do: with binary cross-entropy on the genres
    (summed over the flags, the library's ``bce``) at weight 1, the genre term dominated the fused loss and
    fusion's text loss tripled on the synthetic data.
Table 2 (the paper's metric): recall of the raw text embedding's cosine top-20 among the top-20/50/100
neighbours in ``digits`` space, the centred digit vector ``codes - digit_centres`` itself, what SIDE projects
(DPCA and FSQ only), 1,000 seeded queries. A second table, **not** the paper's Table 2, gives the same recall in
reconstructed space (``decoded``: the 1:1 text quantizer's decode of the SID; RQ-VAE has only this one).
Timing: seconds per training epoch (fit wall time / epochs run, including initialisation and validation) and
encode throughput (items/s, median of 3 full encodes), at ``--threads`` threads.

Training: Adam lr 1e-3, 10% seeded validation split, early stopping (patience below), best epoch restored.
Run: ``.venv/bin/python benchmarks/side_tables.py`` (about 5 minutes on 2 cores), smoke run with ``--quick``.
Prints the tables and writes ``benchmarks/results/side_tables.json``.

``--dpca`` runs only the DPCA settings table (MovieLens text, seed 0, ``--epochs`` epochs, no early stopping):
ternary 3 groups x 5 levels (latent 48) with commitment 0, and 0.25 per level / on the full reconstruction
(``commitment_target``); and the paper's ranking setups, 1 group x 9 levels of 4 and of 64 buckets. Columns: cosine
loss of the decoded text, distinct codes among the items, mean digit utilisation, digit-space recall@20 (Table 2's
metric). Writes ``benchmarks/results/dpca_settings.json``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
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

from torchrec_sid.quantizers import DPCA, FSQ, RQVAE
from torchrec_sid.quantizers.autoencoder import NeuralQuantizer
from torchrec_sid.quantizers.metrics import cosine_loss, recall_at_k

METHODS = {  # name -> (class, 24-bit settings)
    "rq_vae": (RQVAE, {"levels": 3, "codebook_size": 256, "latent_dim": 32}),
    "dpca": (DPCA, {"groups": 3, "depth": 5, "latent_dim": 48}),
    "fsq": (FSQ, {"levels": [8] * 8}),
}
SIGNALS = {"text": "cosine", "genres": "cosine"}


def load_data(name: str, synthetic_items: int) -> dict[str, Tensor]:
    """``{"text": [N, D], "genres": [N, G]}`` float32."""
    if name == "movielens":
        from torchrec_sid.data import movielens

        content = movielens.load().content(progress=False)
        return {"text": content.text.float(), "genres": content.genres.float()}
    from torchrec_sid.data.synthetic import SyntheticConfig, generate_items

    generated = generate_items(SyntheticConfig(num_items=synthetic_items, seed=0))
    return {"text": generated.content.float(), "genres": torch.from_numpy(generated.genres).float()}


def fit_timed(q: NeuralQuantizer, x: Tensor | dict[str, Tensor]) -> dict[str, Any]:
    """Fits ``q``; returns epochs run, seconds per epoch and encode throughput."""
    start = time.perf_counter()
    q.fit(x)
    seconds = time.perf_counter() - start
    encode, _ = time_call(lambda: q.encode(x), repeats=3, warmup=0)
    num_items = len(x) if isinstance(x, Tensor) else len(next(iter(x.values())))
    return {"epochs": len(q.history_), "fit_s": seconds, "s_per_epoch": seconds / len(q.history_),
            "encode_items_per_s": num_items / encode["median_s"], "utilization": q.history_[-1]["utilization"]}


def digit_space(q: NeuralQuantizer, codes: Tensor, width: int) -> Tensor:
    """Centred digit vectors ``codes - digit_centres`` (SIDE's input before Omega), zero-padded to ``width``
    columns, which leaves every cosine unchanged and lets ``recall_at_k`` compare them with ``[N, width]``."""
    digits = codes.float() - torch.tensor(q.digit_centres)
    return torch.nn.functional.pad(digits, (0, width - digits.shape[1]))


def run_seed(data: dict[str, Tensor], training: dict[str, Any], seed: int, num_queries: int) -> list[dict[str, Any]]:
    """Every method in 1:1 (text, genres) and fusion; one row per (method, setting, signal)."""
    rows = []
    for method, (cls, settings) in METHODS.items():
        for setting in ("1:1", "fusion"):
            fits = {"text": None, "genres": {"genres": "cosine"}} if setting == "1:1" else {"both": SIGNALS}
            for fit_name, signals in fits.items():
                q = cls(**settings, **training, signals=signals, seed=seed)
                x = data["text"] if fit_name == "text" else {k: data[k] for k in signals}
                with stage(f"{method} {setting} {fit_name} seed {seed}"):
                    timing = fit_timed(q, x)
                codes = q.encode(x)
                # one unnamed signal ("x") is the text
                decoded = {fit_name if k == "x" else k: v for k, v in q.decode_signals(codes).items()}
                row = {"method": method, "setting": setting, "fit": fit_name, "seed": seed, **timing,
                       **{f"cos_{k}": cosine_loss(data[k], v) for k, v in decoded.items()}}
                if fit_name == "text":
                    row["recall_decoded"] = recall_at_k(data["text"], decoded["text"], num_queries=num_queries,
                                                        seed=seed)
                    if q.digit_centres is not None:
                        row["recall_digits"] = recall_at_k(data["text"], digit_space(q, codes, data["text"].shape[1]),
                                                           num_queries=num_queries, seed=seed)
                rows.append(row)
    return rows


def mean(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.fmean(values) if values else None


def table1(dataset: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean cosine loss per (method, setting) for text and genres, its std over seeds, and the fusion delta %."""
    out = []
    for method in METHODS:
        one = [r for r in rows if r["method"] == method and r["setting"] == "1:1"]
        fused = [r for r in rows if r["method"] == method and r["setting"] == "fusion"]
        base = {"text": mean(one, "cos_text"), "genres": mean(one, "cos_genres")}
        out.append({"data": dataset, "setting": "1:1", "method": method, **base, **spread(one)})
        fusion = {"text": mean(fused, "cos_text"), "genres": mean(fused, "cos_genres")}
        deltas = {f"delta_{k}": 100 * (fusion[k] - base[k]) / base[k] for k in fusion}
        out.append({"data": dataset, "setting": "fusion", "method": method, **fusion, **deltas, **spread(fused)})
    return out


def spread(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Standard deviation over seeds of each signal's cosine loss."""
    return {f"std_{k}": statistics.pstdev([r[f"cos_{k}"] for r in rows if f"cos_{k}" in r]) for k in ("text", "genres")}


def table2(dataset: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for method in METHODS:
        text = [r for r in rows if r["method"] == method and r["fit"] == "text"]
        for space in ("decoded", "digits"):
            if f"recall_{space}" not in text[0]:
                continue
            recall = {k: statistics.fmean(r[f"recall_{space}"][k] for r in text) for k in text[0][f"recall_{space}"]}
            out.append({"data": dataset, "method": method, "space": space, **recall})
    return out


def timing(dataset: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for method in METHODS:
        for fit in ("text", "genres", "both"):
            group = [r for r in rows if r["method"] == method and r["fit"] == fit]
            out.append({"data": dataset, "method": method, "fit": fit, "epochs": mean(group, "epochs"),
                        "s_per_epoch": mean(group, "s_per_epoch"), "encode": mean(group, "encode_items_per_s"),
                        "utilization": mean(group, "utilization")})
    return out


DPCA_SETTINGS = {  # name -> DPCA settings of the --dpca table
    "ternary 3x5, commitment 0": {"groups": 3, "depth": 5, "latent_dim": 48},
    "ternary 3x5, commitment 0.25 level": {"groups": 3, "depth": 5, "latent_dim": 48, "commitment": 0.25,
                                           "commitment_target": "level"},
    "ternary 3x5, commitment 0.25 total": {"groups": 3, "depth": 5, "latent_dim": 48, "commitment": 0.25,
                                           "commitment_target": "total"},
    "4 buckets 1x9": {"groups": 1, "depth": 9, "latent_dim": 48, "buckets": 4},
    "64 buckets 1x9": {"groups": 1, "depth": 9, "latent_dim": 48, "buckets": 64},
}


def dpca_table(epochs: int, threads: dict[str, Any], device: torch.device) -> None:
    """The ``--dpca`` table (module docstring)."""
    from torchrec_sid.quantizers.metrics import utilization

    text = load_data("movielens", 0)["text"]
    rows = []
    for name, settings in DPCA_SETTINGS.items():
        with stage(name):
            q = DPCA(**settings, hidden_dim=256, max_epochs=epochs, patience=epochs, batch_size=128, seed=0).fit(text)
        codes = q.encode(text)
        recall = recall_at_k(text, digit_space(q, codes, text.shape[1]), num_queries=1000, seed=0)
        rows.append({"setting": name, "bits": sum(torch.tensor(q.cardinalities).double().log2().tolist()),
                     "cos": cosine_loss(text, q.decode(codes)), "distinct": len(torch.unique(codes, dim=0)),
                     "util": statistics.fmean(utilization(codes, q.cardinalities)), **recall})
    print(format_table(rows, [("setting", "DPCA", None), ("bits", "bits", ".1f"), ("cos", "text cos", ".4f"),
                              ("distinct", "distinct codes", ",.0f"), ("util", "digit util", ".3f"),
                              ("recall@20", "digit R@20", ".4f")],
                       title=f"DPCA settings on MovieLens text ({len(text):,} items, {epochs} epochs, seed 0, "
                             f"{threads['torch']} torch thread(s))"))
    path = write_json(result_name('dpca_settings', device), {'epochs': epochs, 'threads': threads, 'rows': rows,
                                                       'device': {**device_facts(device), 'computed_on': 'cpu'}})
    print(f"\nwrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dpca", action="store_true", help="only the DPCA settings table (module docstring)")
    parser.add_argument("--epochs", type=int, default=60, help="epochs of the --dpca table")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny epochs, 2k synthetic items, 1 seed")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per fit on MovieLens-100k")
    parser.add_argument("--synthetic-items", type=int, default=20_000)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    add_device_argument(parser, "the RQ-VAE, DPCA and FSQ quantizers have no GPU path: on cuda they still train and "
                                "encode on the CPU, and the results go to <name>_cuda.json")
    args = parser.parse_args()
    device = resolve_device(args.device)
    threads = set_threads(args.threads)
    if args.dpca:
        dpca_table(args.epochs, threads, device)
        return
    datasets = {  # name -> (training settings, seeds)
        "movielens": ({"max_epochs": 150, "patience": 15, "batch_size": 128}, args.seeds),
        "synthetic": ({"max_epochs": 30, "patience": 4, "batch_size": 256}, 1),
    }
    synthetic_items = args.synthetic_items
    if args.quick:
        datasets = {name: ({"max_epochs": 2, "patience": 2, "batch_size": 256}, 1) for name in datasets}
        synthetic_items = 2_000
    results: dict[str, Any] = {"threads": threads, "device": {**device_facts(device), "computed_on": "cpu"},
                               "synthetic_items": synthetic_items, "runs": {}, "table1": [],
                               "table2": [], "timing": []}
    for dataset, (training, seeds) in datasets.items():
        print(f"{dataset}:")
        data = load_data(dataset, synthetic_items)
        rows = [r for seed in range(seeds) for r in run_seed(data, {**training, "hidden_dim": 256}, seed, 1000)]
        results["runs"][dataset] = {"num_items": len(data["text"]), "dims": {k: v.shape[1] for k, v in data.items()},
                                    "training": training, "seeds": seeds, "rows": rows}
        results["table1"] += table1(dataset, rows)
        results["table2"] += table2(dataset, rows)
        results["timing"] += timing(dataset, rows)
    print()
    print(format_table(results["table1"], [
        ("data", "data", None), ("setting", "setting", None), ("method", "method", None),
        ("text", "text cos", ".4f"), ("delta_text", "delta %", "+.1f"), ("std_text", "std", ".4f"),
        ("genres", "genres cos", ".4f"), ("delta_genres", "delta %", "+.1f"), ("std_genres", "std", ".4f")],
        title="Table 1: cosine reconstruction loss at 24 bits (1:1 = one quantizer per signal; fusion = one for both)"))
    print()
    recall_columns = [("data", "data", None), ("method", "method", None), ("space", "space", None),
                      ("recall@20", "R@20", ".4f"), ("recall@50", "R@50", ".4f"), ("recall@100", "R@100", ".4f")]
    print(format_table([r for r in results["table2"] if r["space"] == "digits"], recall_columns,
                       title="Table 2: recall of the raw text top-20 among k nearest neighbours in digit space, "
                             "the paper's metric (24-bit 1:1 text codes)"))
    print()
    print(format_table([r for r in results["table2"] if r["space"] == "decoded"], recall_columns,
                       title="Not the paper's Table 2: the same recall among neighbours of the decoded "
                             "reconstructions"))
    print()
    print(format_table(results["timing"], [
        ("data", "data", None), ("method", "method", None), ("fit", "fit on", None), ("epochs", "epochs", ".0f"),
        ("s_per_epoch", "s/epoch", ".3f"), ("encode", "encode items/s", ",.0f"),
        ("utilization", "utilisation", ".3f")], title=f"Training and encoding at {args.threads} thread(s)"))
    path = write_json(result_name("side_tables", device) + ("_quick" if args.quick else ""), results)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
