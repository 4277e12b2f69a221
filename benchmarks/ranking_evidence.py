"""Issue 16's evidence: where semantic IDs matter. Equal-memory item representations, SID-only models and history
blocks on long histories, on a long-tail synthetic catalogue and on MovieLens latest-small, each arm over seeds
(SIDs refitted per seed), mean ± std, every claim given a verdict against the seed noise.

Experiments (``--experiments``):
    memory_synthetic   200,000 items, Zipf popularity within 256 planted content clusters, clicks driven by the
                       user's affinity to the item's cluster (``SYNTHETIC_TAIL``): most test items have few or no
                       training impressions.
    memory_latest      MovieLens latest-small (9,066 movies, most rated 5 times or fewer).
    history_synthetic  2,000-item catalogue, 200 users with 1,000-10,000 clicked events each (``SYNTHETIC_LONG``);
                       the blocks see whole histories (``max_history`` 10,000: nothing is truncated).
    history_latest     MovieLens latest-small restricted to its ``LONGEST_USERS`` users with the most ratings (599 to
                       2,014 each; :func:`data_view` cuts the train job's splits to their samples); the blocks see
                       whole histories (``max_history`` 2,048: nothing is truncated).

Arms of the memory experiments (``MEMORY_ARMS``), with B = catalogue / 8 and catalogue / 32 rows:
    id_full        item-id table, one row per item (the ceiling; an untrained item's row reads as zero)
    id_hash_B      item ids hashed into B rows (``model.id_buckets``)
    sid_prefix_B   SID per-level tokens + prefix 2- and 3-grams sharing B rows (``sid_tokens.row_budget``), no id
    sid_ngram_B    SID per-level tokens + sliding bigrams sharing B rows, no id table
    id_hash_sid_B  item ids hashed into one more token table beside sid_prefix_B's, all sharing the B rows (the
                   id table gets an equal share of what the exact per-level tables leave: ``model.id_buckets`` with
                   ``sid``)
    sid_spm_B      SID per-level tokens (3 x K rows) + SentencePiece pieces of the SIDs (BPE, B - 3 x K pieces:
                   ``sid_tokens.spm_vocab_size``, fitted on the run's SIDs) sharing B rows, no id table; an item's
                   vector sums its 3 code rows and the rows of its 1 to 3 pieces
    sid_unigram    per-level tokens only (3 x K rows), no id table
    side           SIDE: a projection of the packed SID, no embedding rows at all (DPCA SIDs: 3 groups x 5
                   ternary digits; SIDE reads ordinal digits)
    id_sid         the full id table + sid_prefix_8's tokens (id + SID)
    id_sid_dropout id_sid with ``model.id_dropout`` 0.5: in training, half the item vectors lose their id part, so
                   the model also learns SID-only vectors, the only part a cold item has (the cold-regression
                   ablation)
History arms (``HISTORY_ARMS``): pooling, PMA, DIN, SIM (top 50 events sharing the candidate's first SID level),
DMQN, each on the id table, with the same data and the same steps of the same batches (equal training budget:
``HISTORY_TRAIN_SYNTHETIC``, 256 steps of 16; ``HISTORY_TRAIN_LATEST``, 64 steps of 64); their cost is the training
examples/s.

Each run is :func:`torchrec_sid.train.loop.run` in this one process (one-process group; OpenMP threads:
``--threads``). SIDs: RQ-KMeans, 3 levels, refitted with the run's seed (the synthetic content: K = 256; MovieLens:
the MiniLM embeddings of "title (year) | genres" through ``torchrec-sid quantize`` with ``data: movielens_latest``,
K = 32). The data are the same for every seed (generator seed 0; MovieLens's fixed split); seeds change the SIDs,
the model initialisation and the shuffle.

Metrics: the test period's slices (``torchrec_sid.train.loop.slice_metrics``): ``all`` (test samples + the cold
split's samples of the test period), ``head`` (items with more than k = 5 training impressions), ``tail`` (1 to 5)
and ``cold`` (none); AUC, GAUC (per-user AUC weighted by impressions, users with one class skipped) and NE.
A claim compares two arms' means: "beyond noise" when the difference exceeds the pooled std of the two arms over
seeds (``sqrt((s_a^2 + s_b^2) / 2)``), with the seeds on which it holds (arms share seeds and SIDs: paired).

Run: ``.venv/bin/python benchmarks/ranking_evidence.py`` (3 seeds, all experiments); ``--quick``: 1 seed, 30 steps.
``--device cpu`` (the default) hides any GPU; ``--device cuda`` trains on it. Writes
``benchmarks/results/ranking_evidence.json`` (every run's metrics and config) and ``ranking_evidence.png``; the
experiments not run this time keep their runs from the file already there. Finished runs are reused (``--work``,
default ``outputs/bench_evidence``) when their config is unchanged.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep: the machine is shared

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import RESULTS_DIR, format_table, set_threads, write_json

REPO = Path(__file__).resolve().parents[1]
TAIL_K = 5
SLICES = ("all", "head", "tail", "cold")
SYNTHETIC_TAIL: dict[str, Any] = {
    "num_items": 200_000, "num_users": 2_000, "num_clusters": 256, "content_dim": 32, "min_history": 20,
    "max_history": 200, "samples_per_user": 100, "popularity_exponent": 1.0, "explore_frac": 0.5,
    "quality_weight": 0.5, "cold_frac": 0.1, "seed": 0}
SYNTHETIC_LONG: dict[str, Any] = {
    "num_items": 2_000, "num_users": 200, "num_clusters": 32, "content_dim": 32, "min_history": 1_000,
    "max_history": 10_000, "samples_per_user": 30, "cold_frac": 0.1, "seed": 0}
SIDS = "sids"  # an arm's key naming the quantizer of its SIDs (default rq_kmeans)
# equal training budget within each history experiment: these steps of these batches for every block. The blocks
# see whole histories padded to max_history (10,000 synthetic, 2,048 MovieLens): on one shared core DMQN trains at
# about 5 examples/s at 10,000 and 30 at 2,048, so the budgets are small (both experiments: about 20 minutes on 1
# thread, 3 seeds)
HISTORY_TRAIN_SYNTHETIC = {"batch_size": 16, "epochs": 1, "max_steps": 256}
HISTORY_TRAIN_LATEST = {"batch_size": 64, "epochs": 1, "max_steps": 64}
ID_DROPOUT = 0.5
LONGEST_USERS = 20  # history_latest: MovieLens latest's users with the most ratings
BASE_MODEL = {"embedding_dim": 16, "history_block": "pooling", "max_history": 50, "dense_layers": [32],
              "over_layers": [64, 32]}


@dataclass(frozen=True)
class Dataset:
    """A data source of the train job and how its SIDs are fitted."""

    name: str
    data: str
    num_items: int
    codebook_size: int
    synthetic: dict[str, Any] = field(default_factory=dict)
    longest_users: int | None = None  # keep only the samples of this many users with the longest histories


SYNTHETIC = Dataset("synthetic_tail", "synthetic", SYNTHETIC_TAIL["num_items"], 256, SYNTHETIC_TAIL)
LATEST = Dataset("movielens_latest", "movielens_latest", 9_066, 32)
LONG = Dataset("synthetic_long", "synthetic", SYNTHETIC_LONG["num_items"], 32, SYNTHETIC_LONG)
LATEST_LONG = Dataset("movielens_latest", "movielens_latest", 9_066, 32, longest_users=LONGEST_USERS)


def memory_arms(num_items: int, codebook_size: int) -> dict[str, dict[str, Any]]:
    """Arm name -> model settings (beyond :data:`BASE_MODEL`) of the equal-memory experiment (3-level SIDs of
    ``codebook_size`` codes per level)."""
    arms: dict[str, dict[str, Any]] = {"id_full": {"item_representation": ["id"]}}
    for share in (8, 32):
        budget = num_items // share
        arms[f"id_hash_{share}"] = {"item_representation": ["id"], "id_buckets": budget}
        arms[f"sid_prefix_{share}"] = {"item_representation": ["sid"], "sid_tokens": {
            "ngram_orders": [1], "prefix_lengths": [2, 3], "num_levels": 3, "row_budget": budget}}
        arms[f"sid_ngram_{share}"] = {"item_representation": ["sid"], "sid_tokens": {
            "ngram_orders": [1, 2], "num_levels": 3, "row_budget": budget}}
        arms[f"id_hash_sid_{share}"] = {"item_representation": ["id", "sid"], "id_buckets": budget, "sid_tokens": {
            **arms[f"sid_prefix_{share}"]["sid_tokens"]}}  # the hashed id: one more table of the same B rows
        arms[f"sid_spm_{share}"] = {"item_representation": ["sid"], "sid_tokens": {  # pieces: what 3 x K leave
            "ngram_orders": [1], "num_levels": 3, "row_budget": budget, "spm_vocab_size": budget - 3 * codebook_size}}
    arms["sid_unigram"] = {"item_representation": ["sid"], "sid_tokens": {"ngram_orders": [1], "num_levels": 3}}
    arms["side"] = {"item_representation": ["side"], SIDS: "dpca"}  # SIDE reads ordinal digits: DPCA's
    arms["id_sid"] = {"item_representation": ["id", "sid"], "sid_tokens": arms["sid_prefix_8"]["sid_tokens"]}
    arms["id_sid_dropout"] = {**arms["id_sid"], "id_dropout": ID_DROPOUT}
    return arms


HISTORY_ARMS: dict[str, dict[str, Any]] = {
    "pooling": {"history_block": "pooling"},
    "pma": {"history_block": "pma", "history_options": {"num_outputs": 2, "num_heads": 2}},
    "din": {"history_block": "din"},
    "sim": {"history_block": "sim", "history_options": {"top_k": 50}},
    "dmqn": {"history_block": "dmqn", "history_options": {"num_codebooks": 4, "codebook_size": 16,
                                                           "latent_dim": 16}},
}


@dataclass(frozen=True)
class Experiment:
    name: str
    dataset: Dataset
    arms: dict[str, dict[str, Any]]
    train: dict[str, Any]  # TrainConfig fields
    model: dict[str, Any]  # model fields common to every arm


EXPERIMENTS = {
    "memory_synthetic": Experiment("memory_synthetic", SYNTHETIC,
                                   memory_arms(SYNTHETIC.num_items, SYNTHETIC.codebook_size),
                                   {"batch_size": 512, "epochs": 1}, {}),
    "memory_latest": Experiment("memory_latest", LATEST, memory_arms(LATEST.num_items, LATEST.codebook_size),
                                {"batch_size": 256, "epochs": 2}, {}),
    "history_synthetic": Experiment("history_synthetic", LONG, HISTORY_ARMS, HISTORY_TRAIN_SYNTHETIC,
                                    {"item_representation": ["id"], "max_history": SYNTHETIC_LONG["max_history"]}),
    "history_latest": Experiment("history_latest", LATEST_LONG, HISTORY_ARMS, HISTORY_TRAIN_LATEST,
                                 {"item_representation": ["id"], "max_history": 2_048}),
}


@dataclass(frozen=True)
class Comparison:
    experiment: str
    a: str
    b: str
    metric: str  # <slice>_<auc|gauc|ne>, or examples_per_s


# the questions of the issue, each a list of comparisons "a is better than b"
QUESTIONS: dict[str, list[Comparison]] = {
    "memory: SID tokens beat hashed ids at equal rows": [
        Comparison(e, f"sid_{kind}_{s}", f"id_hash_{s}", f"{sl}_auc") for e in ("memory_synthetic", "memory_latest")
        for s in (8, 32) for kind in ("prefix", "ngram") for sl in ("all", "tail", "cold")],
    "memory: hashed id + SID tokens vs hashed id alone at equal rows": [
        Comparison(e, f"id_hash_sid_{s}", f"id_hash_{s}", f"{sl}_auc") for e in ("memory_synthetic", "memory_latest")
        for s in (8, 32) for sl in ("all", "head", "tail", "cold")],
    "memory: hashed id + SID tokens vs SID tokens alone at equal rows": [
        Comparison(e, f"id_hash_sid_{s}", f"sid_prefix_{s}", f"{sl}_auc") for e in ("memory_synthetic",
                                                                                   "memory_latest")
        for s in (8, 32) for sl in ("all", "head", "tail", "cold")],
    "memory: SentencePiece SID pieces vs hashed ids and vs SID prefix tokens at equal rows": [
        Comparison(e, f"sid_spm_{s}", f"{b}_{s}", f"{sl}_auc") for e in ("memory_synthetic", "memory_latest")
        for s in (8, 32) for b in ("id_hash", "sid_prefix") for sl in ("all", "head", "tail", "cold")],
    "memory: table-free SIDE vs hashed ids at 1/32": [
        Comparison(e, "side", "id_hash_32", f"{sl}_auc") for e in ("memory_synthetic", "memory_latest")
        for sl in ("all", "tail", "cold")],
    "memory: the full id table is the ceiling on head items": [
        Comparison(e, "id_full", "sid_prefix_8", "head_auc") for e in ("memory_synthetic", "memory_latest")],
    "long tail and new items: id + SID beats id-only": [
        Comparison(e, "id_sid", "id_full", f"{sl}_{m}") for e in ("memory_synthetic", "memory_latest")
        for sl in ("tail", "cold") for m in ("auc", "gauc")],
    "cold regression: id dropout restores id + SID's cold AUC": [
        Comparison(e, "id_sid_dropout", b, f"cold_{m}") for e in ("memory_synthetic", "memory_latest")
        for b in ("id_sid", "id_full") for m in ("auc", "gauc")],
    "long tail and new items: SID-only (no id table) vs id-only": [
        Comparison(e, "sid_prefix_8", "id_full", f"{sl}_auc") for e in ("memory_synthetic", "memory_latest")
        for sl in ("all", "tail", "cold")],
    "long histories: DMQN vs DIN, SIM, PMA, pooling": [
        Comparison(e, "dmqn", b, m) for e in ("history_synthetic", "history_latest")
        for b in ("din", "sim", "pma", "pooling") for m in ("all_auc", "all_gauc", "all_ne")],
    "long histories: DIN vs pooling": [
        Comparison(e, "din", "pooling", m) for e in ("history_synthetic", "history_latest")
        for m in ("all_auc", "all_gauc", "all_ne")],
    "long histories, cost: DMQN's training examples/s vs the others'": [
        Comparison(e, "dmqn", b, "examples_per_s") for e in ("history_synthetic", "history_latest")
        for b in ("din", "sim", "pma", "pooling")],
}
LOWER_IS_BETTER = ("_ne",)


# ------------------------------------------------------------------------------------------------------- runs


def fit_sids(dataset: Dataset, seed: int, work: Path, method: str = "rq_kmeans") -> Path:
    """SIDs of ``dataset``'s items fitted with ``seed``, reused when already written: RQ-KMeans (3 levels) or DPCA
    (3 groups x 5 ternary digits, for SIDE; 3 epochs on the synthetic catalogue, 50 on MovieLens)."""
    suffix = "" if method == "rq_kmeans" else f"_{method}"
    path = work / "sids" / f"{dataset.name}_seed{seed}{suffix}.safetensors"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    settings: dict[str, Any] = {"levels": 3, "codebook_size": dataset.codebook_size, "max_iter": 20, "seed": seed}
    if method == "dpca":
        synthetic = dataset.data == "synthetic"
        settings = {"groups": 3, "depth": 5, "latent_dim": 24 if synthetic else 48,
                    "max_epochs": 3 if synthetic else 50, "batch_size": 2048 if synthetic else 256, "seed": seed}
    if dataset.data == "synthetic":
        from torchrec_sid.data.synthetic import SyntheticConfig, generate_items
        from torchrec_sid.jobs.quantize import publish
        from torchrec_sid.quantizers.base import build_quantizer

        content = generate_items(SyntheticConfig(**dataset.synthetic)).content
        quantizer = build_quantizer(method, **settings).fit(content, progress=False)
        publish(quantizer.semantic_ids(content), quantizer, path)
    else:
        from torchrec_sid.jobs.quantize import QuantizeConfig
        from torchrec_sid.jobs.quantize import run as quantize

        quantize(QuantizeConfig(method=method, data=dataset.data, quantizer=settings, out=str(path),
                                collision_suffix=False, metrics_sample=2_000))
    return path


def train_config(experiment: Experiment, arm: str, seed: int, sids: Path, work: Path,
                 max_steps: int | None) -> dict[str, Any]:
    model = {**BASE_MODEL, **experiment.model, **{k: v for k, v in experiment.arms[arm].items() if k != SIDS}}
    users = experiment.dataset.longest_users
    return {"name": f"{experiment.name}/{arm}" + (f" (longest {users} users)" if users else ""),
            "data": experiment.dataset.data,
            "synthetic": experiment.dataset.synthetic, "semantic_ids": str(sids), "model": model,
            "learning_rate": 0.001, "embedding_learning_rate": 0.05, "seed": seed,
            "out": str(work / experiment.name / arm / f"seed{seed}"), "eval_splits": ["test", "cold"],
            "tail_impressions": TAIL_K, "max_steps": max_steps,
            **{k: v for k, v in experiment.train.items() if k != "max_steps" or max_steps is None}}


def longest_users(data: Any, users: int) -> Any:
    """``data`` (an ``InteractionData``) with every split cut to the samples of its ``users`` users with the longest
    histories (ties by user id); catalogue and histories unchanged."""
    import numpy as np

    lengths = data.histories.lengths()
    if not 1 <= users <= len(lengths):
        raise ValueError(f"longest_users must be in [1, {len(lengths)}] (the users of {data.name}), got {users}")
    keep = np.sort(np.argsort(-lengths, kind="stable")[:users])
    return dataclasses.replace(data, splits={name: s.subset(np.isin(s.users, keep))
                                             for name, s in data.splits.items()})


def describe_histories(data: Any, max_history: int) -> dict[str, Any]:
    """What the history blocks see of ``data``: users with samples, their history lengths (events in all) and the
    longest history before a sample, against ``max_history`` (the model's padded length)."""
    import numpy as np

    users = np.unique(np.concatenate([s.users for s in data.splits.values()]))
    lengths = data.histories.lengths()[users]
    longest = max(int(s.history_lengths.max()) for s in data.splits.values() if len(s))
    return {"users": len(users), "user_history_min": int(lengths.min()), "user_history_median": float(
        np.median(lengths)), "user_history_max": int(lengths.max()), "longest_sample_history": longest,
        "mean_train_history": float(data.splits["train"].history_lengths.mean()), "max_history": max_history,
        "truncated": longest > max_history}


@contextlib.contextmanager
def data_view(dataset: Dataset, max_history: int) -> Iterator[dict[str, Any]]:
    """While open, the train job's data are cut to ``dataset.longest_users`` (when set); the yielded dict is filled
    with :func:`describe_histories` of what the run trains and evaluates on."""
    from unittest import mock

    from torchrec_sid.train import loop

    seen: dict[str, Any] = {}
    load = loop.load_data

    def load_view(config: Any) -> Any:
        data, signals = load(config)
        if dataset.longest_users is not None:
            data = longest_users(data, dataset.longest_users)
        seen.update(describe_histories(data, max_history))
        return data, signals

    with mock.patch.object(loop, "load_data", load_view):
        yield seen


def train(config: dict[str, Any], dataset: Dataset) -> dict[str, Any]:
    """One training run in this process on ``dataset``'s data; its results (reused when ``out`` holds those of the
    same config), with ``histories``: :func:`describe_histories`."""
    from torchrec_sid.train.config import TrainConfig
    from torchrec_sid.train.loop import run

    out = Path(config["out"])
    done = out / "results.json"
    typed = TrainConfig.from_dict(config)
    if done.is_file():
        previous = json.loads(done.read_text())
        if previous.get("config") == json.loads(json.dumps(typed.to_dict())):
            return {**previous, "cached": True}
    start = time.perf_counter()
    with data_view(dataset, typed.model.max_history) as seen:
        results = run(typed)
    assert results is not None  # one process: rank 0
    results["wall_s"] = time.perf_counter() - start
    results["histories"] = seen
    done.write_text(json.dumps(results, default=str))
    return results


# ---------------------------------------------------------------------------------------------------- summary


def value(run: dict[str, Any], metric: str) -> float:
    if metric == "examples_per_s":
        return float(run["train_examples_per_second"])
    slice_name, key = metric.rsplit("_", 1)
    v = run["metrics"][f"slice_{slice_name}"][key]
    return float("nan") if v is None else float(v)


def mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def summarise(runs: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    rows = []
    for arm, arm_runs in runs.items():
        row: dict[str, Any] = {"arm": arm, "seeds": len(arm_runs),
                               "rows": arm_runs[0]["parameters"]["embedding"] // arm_runs[0]["config"]["model"][
                                   "embedding_dim"],
                               "examples_per_s": statistics.median(value(r, "examples_per_s") for r in arm_runs),
                               "wall_s": statistics.median(r.get("wall_s", float("nan")) for r in arm_runs)}
        for sl in SLICES:
            for key in ("auc", "gauc", "ne"):
                m, s = mean_std([value(r, f"{sl}_{key}") for r in arm_runs])
                row[f"{sl}_{key}"], row[f"{sl}_{key}_std"] = m, s
                row[f"{sl}_{key}_cell"] = f"{m:.4f}" + ("" if s is None else f" ± {s:.4f}")
            row[f"{sl}_count"] = arm_runs[0]["metrics"][f"slice_{sl}"]["count"]
        rows.append(row)
    return rows


def compare(c: Comparison, results: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any] | None:
    runs = results.get(c.experiment, {})
    if c.a not in runs or c.b not in runs:
        return None
    sign = -1.0 if c.metric.endswith(LOWER_IS_BETTER) else 1.0
    a = [value(r, c.metric) for r in runs[c.a]]
    b = [value(r, c.metric) for r in runs[c.b]]
    diff = sign * (statistics.fmean(a) - statistics.fmean(b))
    pooled = math.sqrt((statistics.variance(a) + statistics.variance(b)) / 2) if min(len(a), len(b)) > 1 else None
    by_seed = {r["config"]["seed"]: value(r, c.metric) for r in runs[c.b]}
    paired = [sign * (value(r, c.metric) - by_seed[r["config"]["seed"]]) for r in runs[c.a]
              if r["config"]["seed"] in by_seed]
    noise = "no noise estimate" if pooled is None else ("beyond noise" if abs(diff) > pooled else "within noise")
    verdict = ("a better" if diff > 0 else "b better" if diff < 0 else "equal") + f", {noise}"
    return {"experiment": c.experiment, "pair": f"{c.a} vs {c.b}", "metric": c.metric,
            "a_mean": statistics.fmean(a), "b_mean": statistics.fmean(b), "better_by": diff, "pooled_std": pooled,
            "seeds_a_better": f"{sum(d > 0 for d in paired)}/{len(paired)}", "verdict": verdict}


def verdicts(results: dict[str, dict[str, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    out = []
    for question, comparisons in QUESTIONS.items():
        done = [x for x in (compare(c, results) for c in comparisons) if x is not None]
        wins = sum(x["better_by"] > 0 for x in done)
        beyond = sum(x["better_by"] > 0 and x["verdict"].endswith("beyond noise") for x in done)
        losses = sum(x["better_by"] < 0 and x["verdict"].endswith("beyond noise") for x in done)
        summary = ("not run" if not done else
                   f"first arm better in {wins}/{len(done)} comparisons, {beyond} beyond noise; worse beyond noise "
                   f"in {losses}")
        out.append({"question": question, "summary": summary, "comparisons": done})
    return out


def print_tables(experiment: str, rows: list[dict[str, Any]], runs: dict[str, list[dict[str, Any]]]) -> None:
    columns = [("arm", "arm", None), ("seeds", "n", None), ("rows", "emb rows", ",d")]
    columns += [(f"{sl}_auc_cell", f"{sl} AUC", None) for sl in SLICES]
    columns += [("all_gauc_cell", "all GAUC", None), ("tail_gauc_cell", "tail GAUC", None),
                ("cold_gauc_cell", "cold GAUC", None), ("all_ne_cell", "all NE", None),
                ("examples_per_s", "ex/s", ",.0f"), ("wall_s", "wall s", ".0f")]
    counts = ", ".join(f"{sl} {rows[0][f'{sl}_count']:,}" for sl in SLICES) if rows else ""
    seeds = max((len(r) for r in runs.values()), default=0)
    print(format_table(rows, columns, title=f"{experiment}: mean ± std over {seeds} seed(s); samples {counts}; "
                                            f"tail = 1..{TAIL_K} training impressions, cold = none"))
    seen = next((r["histories"] for arm_runs in runs.values() for r in arm_runs if r.get("histories")), None)
    if seen and experiment.startswith("history"):
        steps = {r["config"]["max_steps"] for arm_runs in runs.values() for r in arm_runs}
        batch = {r["config"]["batch_size"] for arm_runs in runs.values() for r in arm_runs}
        print(f"  {seen['users']} users with {seen['user_history_min']:,}..{seen['user_history_max']:,} history "
              f"events (median {seen['user_history_median']:,.0f}); longest history before a sample "
              f"{seen['longest_sample_history']:,}, max_history {seen['max_history']:,}: "
              f"{'TRUNCATED' if seen['truncated'] else 'nothing truncated'}; mean train history "
              f"{seen['mean_train_history']:,.0f}; every block {sorted(steps)} steps of {sorted(batch)} examples")


def print_verdicts(found: list[dict[str, Any]]) -> None:
    for q in found:
        print(f"\n* {q['question']}: {q['summary']}")
        if q["comparisons"]:
            print(format_table(q["comparisons"], [
                ("experiment", "experiment", None), ("pair", "a vs b", None), ("metric", "metric", None),
                ("a_mean", "a", ".4f"), ("b_mean", "b", ".4f"), ("better_by", "a better by", "+.4f"),
                ("pooled_std", "pooled std", ".4f"), ("seeds_a_better", "seeds", None), ("verdict", "verdict", None)]))


def plot(results: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """AUC per slice and arm, error bars = std over seeds, one panel per experiment."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 1, figsize=(13, 3.6 * len(results)), squeeze=False)
    for ax, (name, rows) in zip(axes[:, 0], results.items(), strict=True):
        width = 0.8 / len(SLICES)
        for k, sl in enumerate(SLICES):
            means = [r[f"{sl}_auc"] for r in rows]
            stds = [r[f"{sl}_auc_std"] or 0.0 for r in rows]
            ax.bar([i + (k - 1.5) * width for i in range(len(rows))], means, width, yerr=stds, capsize=2,
                   label=f"{sl} AUC")
        ax.set_xticks(range(len(rows)), [f"{r['arm']}\n{r['rows']:,} rows" for r in rows], fontsize=7)
        finite = [r[f"{sl}_auc"] for r in rows for sl in SLICES if math.isfinite(r[f"{sl}_auc"])]
        ax.set_ylim(max(0.0, min(finite) - 0.02), min(1.0, max(finite) + 0.02))
        ax.set_title(f"{name}: AUC by slice (tail: 1..{TAIL_K} training impressions, cold: none), "
                     f"mean ± std over {max(r['seeds'] for r in rows)} seed(s)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def select_device(device: str) -> None:
    """``cpu``: hides every GPU from this process (before anything initialises CUDA), so the train job runs on the
    CPU; ``cuda``: checks that one is there (the job then uses it)."""
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        return
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here (CUDA_VISIBLE_DEVICES="
                         f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}); use --device cpu")


def merge_previous(results: dict[str, dict[str, list[dict[str, Any]]]], path: Path) -> list[str]:
    """Adds to ``results`` the runs of ``path`` (an earlier payload) of every experiment / arm not run this time,
    so a partial run keeps the others, in the experiments' arm order; returns the ``experiment/arm`` names kept."""
    kept = []
    previous = json.loads(path.read_text()).get("runs", {}) if path.is_file() else {}
    for name, arms in previous.items():
        if name not in EXPERIMENTS:
            continue
        for arm, runs in arms.items():
            if arm in EXPERIMENTS[name].arms and arm not in results.setdefault(name, {}):
                results[name][arm] = runs
                kept.append(f"{name}/{arm}")
    for name, runs in results.items():
        order = list(EXPERIMENTS[name].arms)
        results[name] = dict(sorted(runs.items(), key=lambda item: order.index(item[0])))
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--experiments", nargs="+", choices=list(EXPERIMENTS), default=list(EXPERIMENTS))
    parser.add_argument("--arms", nargs="+", default=None, help="only these arms (default: all)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 3; --quick: 1)")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="steps per run (default: the experiment's: the epochs, or the history budgets)")
    parser.add_argument("--quick", action="store_true", help="1 seed, 30 steps: a smoke run")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu hides every GPU from the runs; cuda trains on one")
    args = parser.parse_args()
    select_device(args.device)
    seeds = args.seeds or (1 if args.quick else 3)
    max_steps = args.max_steps if args.max_steps is not None else (30 if args.quick else None)
    work = args.work or REPO / "outputs" / ("bench_evidence_quick" if args.quick else "bench_evidence")
    suffix = "_quick" if args.quick else ""
    set_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    started, load = time.perf_counter(), os.getloadavg()
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for name in args.experiments:
        experiment = EXPERIMENTS[name]
        arms = [a for a in experiment.arms if args.arms is None or a in args.arms]
        results[name] = {arm: [] for arm in arms}
        for seed in range(seeds):
            for arm in arms:
                sids = fit_sids(experiment.dataset, seed, work, experiment.arms[arm].get(SIDS, "rq_kmeans"))
                run = train(train_config(experiment, arm, seed, sids, work, max_steps), experiment.dataset)
                results[name][arm].append(run)
                print(f"[{name}] {arm} seed {seed}: all AUC {value(run, 'all_auc'):.4f}  tail "
                      f"{value(run, 'tail_auc'):.4f}  cold {value(run, 'cold_auc'):.4f}  "
                      f"{run.get('wall_s', 0):.0f} s{' (cached)' if run.get('cached') else ''}", flush=True)
    kept = merge_previous(results, RESULTS_DIR / f"ranking_evidence{suffix}.json")
    summaries = {name: summarise(runs) for name, runs in results.items()}
    for name, rows in summaries.items():
        print()
        print_tables(name, rows, results[name])
    found = verdicts(results)
    print_verdicts(found)
    wall = time.perf_counter() - started
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    png = RESULTS_DIR / f"ranking_evidence{suffix}.png"
    plot(summaries, png)
    payload = {"settings": {"experiments": args.experiments, "seeds": list(range(seeds)), "max_steps": max_steps,
                            "threads": args.threads, "device": args.device, "tail_impressions": TAIL_K,
                            "work": str(work), "kept_from_previous_file": kept},
               "load_average_at_start": load, "load_average_at_end": os.getloadavg(), "wall_s": wall,
               "summaries": summaries, "verdicts": found,
               "runs": {name: {arm: [{k: r[k] for k in ("name", "config", "metrics", "parameters",
                                                        "train_examples_per_second")}
                                     | {"wall_s": r.get("wall_s"), "histories": r.get("histories")}
                                     for r in runs] for arm, runs in arms.items()}
                        for name, arms in results.items()}}
    path = write_json(f"ranking_evidence{suffix}", payload)
    print(f"\n{wall:.0f} s in all; wrote {path} and {png}")


if __name__ == "__main__":
    main()
