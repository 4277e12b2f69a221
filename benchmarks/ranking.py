"""Issue 7's evidence table: AUC / NE of the MovieLens-100k DLRM example configs on the temporal test split and on
cold-start items, mean and std over seeds, the issue's claims checked against that noise, and training throughput
on 1 vs 2 processes.

Rows (``ROWS``: one example config each):
    id               examples/movielens_id.yaml: item-id table, mean-pooled history (the baseline)
    sid_rq_kmeans    + SID token and prefix n-gram tables over RQ-KMeans SIDs   (movielens_sid_rq_kmeans.yaml)
    sid_rq_gmm       + the same over RQ-GMM SIDs                                 (movielens_sid_rq_gmm.yaml)
    side_dpca        + SIDE over DPCA digits: a projection, no token tables       (movielens_side.yaml)
    sid_mmq          + SID n-grams over MMQ stage-1 SIDs                         (movielens_sid_mmq.yaml)
    sid_mmq_ft       + SID n-grams over stage-2 fine-tuned MMQ SIDs              (movielens_sid_mmq_ft.yaml)
    hist_pooling     sid_rq_gmm's model (mean pooling of the last 50 events): the reference of the blocks below
    hist_pma, hist_din, hist_sim, hist_dmqn    the same model with that history block (movielens_hist_*.yaml)
A row whose config, or the config of a step it needs, does not exist is skipped with a printed note.

Each (row, seed) is ``python -m torchrec_sid train --config <yaml> --seed <s> --semantic-ids <file> --out <dir>``
in a fresh process (its own process group), one process of ``--threads`` OpenMP threads, OMP_WAIT_POLICY=PASSIVE
(see ``common.OMP_WAIT_NOTE``). The SIDs are refitted for every seed with that seed (``ARTIFACTS``; quantizer seed
= the ranking run's seed), so the std over seeds includes the SIDs' own variance; fitting 1,682 items takes
seconds (MMQ stage 1: about 20 s). Fine-tuned MMQ SIDs come from the stage-2 train run
(``examples/movielens_finetune_mmq.yaml``, its ``tokenizer`` set to the same seed's stage-1 quantizer). hist_pooling
and sid_rq_gmm are the same model: equal numbers there show the runs are deterministic. Everything goes under
``--work`` (``outputs/bench_ranking``): ``seed<s>/sids/``, ``seed<s>/<row>/`` (results.json, train.log),
``throughput/``.

Cache: a run (or SID fit) is skipped when its folder holds its results and a ``bench_key.json`` equal to its key:
the resolved config, the SHA-256 of its SIDs file and of the ``torchrec_sid`` sources. An interrupted benchmark
continues where it stopped; a changed config, SID file or library source reruns what it touches; ``--force``
reruns everything.

Table: per row, mean ± sample std over the seeds of test AUC / NE and cold-start AUC / NE; embedding-table
parameters; ``+params``, the parameters beyond the id-only model (the feature cost: SID tables, SIDE's projection,
a history block's weights); table lookups per item (id row + SID token rows; SIDE reads none); the median of the
runs' training examples/s (forward, backward and optimizer steps; batch building excluded) and wall time.

Claims (``CLAIMS``), each a set of comparisons of row means: "holds" when the difference has the claimed sign,
"beyond noise" when |difference| exceeds the pooled std ``sqrt((s_a^2 + s_b^2) / 2)`` (else "within noise"), and
the seeds on which the claimed order holds (the rows share seeds and SIDs, so they are paired).

Throughput: movielens_id and movielens_sid_rq_gmm (seed-0 SIDs) for ``--throughput-batches`` batches of 512 in all
(1 process: that many steps; 2 processes: half as many steps each, the same examples), on 1 process with
``--threads`` threads, 1 process with 1 thread, and 2 processes (``torchrun --standalone``) of ``cpus // 2``
threads each; ``--throughput-repeats`` runs each, median examples/s and the ratio 2 processes / 1 process. The
machine has ``os.cpu_count()`` cores (2 here), shared with other work: 2 processes share the same 2 cores, so the
ratio measures the cost of splitting one job over processes, not a second machine's worth of cores.

Device: ``--device cuda`` lets the training processes see the GPU, so the training loop runs them on it with nccl
(``torchrec_sid.train.loop.init_distributed``); ``--device cpu`` (the default) hides any GPU from them
(``CUDA_VISIBLE_DEVICES=``), so they use the CPU and gloo. The SID fits (RQ-KMeans, RQ-GMM, DPCA, MMQ stage 1) run
in this process on the CPU either way: the quantizers have no GPU path. The 2-process throughput setup needs one GPU
per process under nccl: with fewer than 2 GPUs it is skipped (and said so). The device is part of every run's cache
key; cuda results go to ``ranking_cuda[_quick].json`` / ``.png``.

Run: ``.venv/bin/python benchmarks/ranking.py`` (3 seeds; about 30 minutes on 2 cores), smoke run with
``--quick`` (1 seed, a few rows, 20 steps; ``ranking_quick.json``). Prints the tables and writes
``benchmarks/results/ranking.json`` (every run's metrics, config, seed, command; machine facts) and ``ranking.png``.
"""

from __future__ import annotations

import os

# before torch starts its OpenMP runtime, and inherited by every training process: idle threads sleep instead of
# spinning (this 2-core machine is shared; see common.OMP_WAIT_NOTE)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from common import RESULTS_DIR, add_device_argument, device_facts, format_table, resolve_device, set_threads, write_json
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
METRICS = (("test", "auc"), ("test", "ne"), ("cold", "auc"), ("cold", "ne"), ("tail", "auc"))
LOWER_IS_BETTER = {"ne"}


# --------------------------------------------------------------------------------------- what the benchmark runs


@dataclass(frozen=True)
class Quantize:
    """SIDs fitted by ``torchrec-sid quantize --config <config>``, with the quantizer seed set to the run's seed."""

    config: str


@dataclass(frozen=True)
class FineTune:
    """SIDs written by a stage-2 train run (``config``, a train config) that starts from the step ``base``.

    The benchmark runs a copy of ``config`` per seed with ``seed``, ``out``, ``input_field`` (set to the base
    step's fitted quantizer file, ``<base SIDs stem>.quantizer.safetensors``, when ``input_is_quantizer``, else to
    its SIDs file) and ``artifact_field`` (the top-level key naming the fine-tuned SemanticIds file it writes).
    """

    config: str
    base: str
    input_field: str
    artifact_field: str
    input_is_quantizer: bool = True


@dataclass(frozen=True)
class Row:
    """One line of the table: a train config and the SIDs (an ``ARTIFACTS`` name, or None) it is given."""

    name: str
    config: str
    sids: str | None = None


ARTIFACTS: dict[str, Quantize | FineTune] = {
    "rq_kmeans": Quantize("examples/quantize_rq_kmeans.yaml"),
    "rq_gmm": Quantize("examples/quantize_rq_gmm.yaml"),
    "dpca": Quantize("examples/quantize_dpca.yaml"),
    "mmq": Quantize("examples/quantize_mmq.yaml"),
    "mmq_ft": FineTune("examples/movielens_finetune_mmq.yaml", base="mmq", input_field="tokenizer",
                       artifact_field="export_semantic_ids"),
}

ROWS = (
    Row("id", "examples/movielens_id.yaml"),
    Row("sid_rq_kmeans", "examples/movielens_sid_rq_kmeans.yaml", "rq_kmeans"),
    Row("sid_rq_gmm", "examples/movielens_sid_rq_gmm.yaml", "rq_gmm"),
    Row("side_dpca", "examples/movielens_side.yaml", "dpca"),
    Row("sid_mmq", "examples/movielens_sid_mmq.yaml", "mmq"),
    Row("sid_mmq_ft", "examples/movielens_sid_mmq_ft.yaml", "mmq_ft"),
    Row("hist_pooling", "examples/movielens_hist_pooling.yaml", "rq_gmm"),
    Row("hist_pma", "examples/movielens_hist_pma.yaml", "rq_gmm"),
    Row("hist_din", "examples/movielens_hist_din.yaml", "rq_gmm"),
    Row("hist_sim", "examples/movielens_hist_sim.yaml", "rq_gmm"),
    Row("hist_dmqn", "examples/movielens_hist_dmqn.yaml", "rq_gmm"),
)
QUICK_ROWS = ("id", "sid_rq_kmeans", "sid_rq_gmm", "side_dpca", "sid_mmq", "sid_mmq_ft", "hist_pooling", "hist_din")
THROUGHPUT_ROWS = ("id", "sid_rq_gmm")


@dataclass(frozen=True)
class Comparison:
    """``a`` vs ``b`` on ``metric`` (``split_auc`` / ``split_ne``); ``strict``: the claim is a > b, not a >= b."""

    a: str
    b: str
    metric: str
    strict: bool = False


@dataclass(frozen=True)
class Claim:
    """A claim of the issue as comparisons of row means; ``cost``: (row, reference row, largest ratio) of the
    parameters beyond the id-only model."""

    text: str
    comparisons: tuple[Comparison, ...]
    cost: tuple[str, str, float] | None = None


SID_ROWS = ("sid_rq_kmeans", "sid_rq_gmm", "side_dpca", "sid_mmq", "sid_mmq_ft")
CLAIMS = (
    Claim("SID features beat id-only on cold-start items",
          tuple(Comparison(row, "id", metric, strict=True) for row in SID_ROWS for metric in ("cold_auc", "cold_ne"))),
    Claim("RQ-GMM SIDs >= RQ-KMeans SIDs",
          tuple(Comparison("sid_rq_gmm", "sid_rq_kmeans", m) for m in ("test_auc", "cold_auc"))),
    Claim("SIDE >= SID n-grams at a third of the feature cost",
          tuple(Comparison("side_dpca", b, m) for b in ("sid_rq_gmm", "sid_rq_kmeans")
                for m in ("test_auc", "cold_auc")),
          cost=("side_dpca", "sid_rq_gmm", 1 / 3)),
    Claim("DMQN >= DIN >= pooling",
          tuple(Comparison(a, b, m) for a, b in (("hist_dmqn", "hist_din"), ("hist_din", "hist_pooling"))
                for m in ("test_auc", "cold_auc"))),
    Claim("MMQ fine-tuned SIDs >= stage-1 SIDs (issue 7, item 3)",
          tuple(Comparison("sid_mmq_ft", "sid_mmq", m) for m in ("test_auc", "cold_auc", "tail_auc"))),
)


# ------------------------------------------------------------------------------------------------- bookkeeping


def source_fingerprint() -> str:
    """SHA-256 of every ``torchrec_sid`` source file (path and bytes): a cached result is only reused for the code
    that produced it."""
    digest = hashlib.sha256()
    for path in sorted((REPO / "torchrec_sid").rglob("*.py")):
        digest.update(str(path.relative_to(REPO)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def normalised(value: Any) -> Any:
    """``value`` as JSON would give it back (tuples -> lists), so that keys compare equal across runs."""
    return json.loads(json.dumps(value, default=str))


def is_cached(folder: Path, output: Path, key: dict[str, Any]) -> bool:
    marker = folder / "bench_key.json"
    return output.is_file() and marker.is_file() and json.loads(marker.read_text()) == normalised(key)


def mark_done(folder: Path, key: dict[str, Any]) -> None:
    (folder / "bench_key.json").write_text(json.dumps(normalised(key), indent=2) + "\n")


def missing_files(row: Row) -> list[str]:
    """Configs the row needs (its own and those of its SIDs' steps) that do not exist."""
    needed, name = [row.config], row.sids
    while name is not None:
        step = ARTIFACTS[name]
        needed.append(step.config)
        name = step.base if isinstance(step, FineTune) else None
    return [path for path in needed if not (REPO / path).is_file()]


def shown(path: Path | str) -> str:
    """``path`` relative to the repository root when it lies inside it (commands run from there)."""
    path = Path(path)
    return str(path.relative_to(REPO)) if path.is_absolute() and path.is_relative_to(REPO) else str(path)


def child_env(threads: int, device: str) -> dict[str, str]:
    """A training process's environment: ``threads`` OpenMP threads; on ``device`` ``cpu`` no GPU visible, so the
    training loop takes the CPU and gloo (on ``cuda`` it takes the GPU and nccl)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": os.environ["OMP_WAIT_POLICY"]}
    return env | ({"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else {})


def run_logged(command: list[str], log: Path, threads: int, device: str) -> float:
    """Runs ``command`` from the repository root on ``device``, stdout and stderr to ``log``; returns its wall
    seconds and raises RuntimeError with the log's tail when it fails."""
    start = time.perf_counter()
    with log.open("w") as f:
        code = subprocess.run(command, cwd=REPO, env=child_env(threads, device), stdout=f,
                              stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - start
    if code != 0:
        tail = log.read_text(errors="replace").replace("\r", "\n").splitlines()[-25:]
        raise RuntimeError(f"exit {code}: {' '.join(command)}\n  (log {log})\n    " + "\n    ".join(tail))
    return seconds


def train_command(config: Path, out: Path, seed: int | None, sids: Path | None, max_steps: int | None,
                  nproc: int = 1) -> list[str]:
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    "--nproc_per_node", str(nproc)]
    command = [*launcher, "-m", "torchrec_sid", "train", "--config", shown(config), "--out", shown(out)]
    if seed is not None:
        command += ["--seed", str(seed)]
    if sids is not None:
        command += ["--semantic-ids", shown(sids)]
    if max_steps is not None:
        command += ["--max-steps", str(max_steps)]
    return command


# --------------------------------------------------------------------------------------------------- the steps


class Runner:
    """Runs SID steps and training runs under ``work``, reusing what a previous invocation finished."""

    def __init__(self, work: Path, threads: int, max_steps: int | None, force: bool, device: str) -> None:
        self.work, self.threads, self.max_steps, self.force, self.device = work, threads, max_steps, force, device
        self.source = source_fingerprint()
        self.sid_steps: dict[tuple[str, int], dict[str, Any]] = {}  # (name, seed) -> what was fitted

    def sids(self, name: str, seed: int) -> Path:
        """The SIDs file ``name`` for ``seed``, fitted (or fine-tuned) unless already done with the same key."""
        step = ARTIFACTS[name]
        folder = self.work / f"seed{seed}" / "sids" / name
        path = folder / f"{name}.safetensors"
        if isinstance(step, Quantize):
            from torchrec_sid.jobs.quantize import QuantizeConfig

            config = QuantizeConfig.from_yaml(REPO / step.config, out=str(path), quantizer={"seed": seed},
                                              tensorboard=str(folder / "tensorboard"))
            key: dict[str, Any] = {"step": "quantize", "config": dataclasses.asdict(config), "source": self.source}
            run = lambda: self._quantize(config, folder / "quantize.log")
        else:
            base = self.sids(step.base, seed)
            derived = self._finetune_config(step, folder, path, base, seed)
            key = {"step": "finetune", "config": derived, "base_sha256": file_sha256(base),
                   "max_steps": self.max_steps, "source": self.source, "device": self.device}
            run = lambda: self._finetune(derived, folder, path)
        cached = not self.force and is_cached(folder, path, key)
        timing = folder / "bench_wall.json"
        if not cached:
            if folder.exists():
                shutil.rmtree(folder)
            folder.mkdir(parents=True)
            start = time.perf_counter()
            run()
            seconds = time.perf_counter() - start
            timing.write_text(json.dumps({"wall_s": seconds}) + "\n")
            mark_done(folder, key)
            tqdm.write(f"  seed {seed}: {name} SIDs ({step.config}) {seconds:.1f} s -> {shown(path)}")
        if (name, seed) not in self.sid_steps:
            record = {"name": name, "seed": seed, "config": step.config, "path": shown(path), "cached": cached,
                      "sha256": file_sha256(path), "wall_s": json.loads(timing.read_text())["wall_s"]
                      if timing.is_file() else None}
            if isinstance(step, FineTune):  # the stage-2 model's own metrics (soft SIDs in the ranking model)
                record["stage2_results"] = json.loads((folder / "train" / "results.json").read_text())
            self.sid_steps[(name, seed)] = record
        return path

    def _quantize(self, config: Any, log: Path) -> None:
        from torchrec_sid.jobs.quantize import run

        with log.open("w") as f, contextlib.redirect_stderr(f), contextlib.redirect_stdout(f):
            run(config)

    def _finetune_config(self, step: FineTune, folder: Path, artifact: Path, base: Path, seed: int) -> dict:
        raw = yaml.safe_load((REPO / step.config).read_text()) or {}
        for field in (step.input_field, step.artifact_field):
            if field not in raw:
                raise ValueError(f"{step.config} has no field {field!r} (FineTune in benchmarks/ranking.py names it)")
        if step.input_is_quantizer:
            from torchrec_sid.jobs.quantize import QuantizeConfig

            base = QuantizeConfig(out=str(base)).quantizer_path
        return {**raw, step.input_field: shown(base), step.artifact_field: shown(artifact),
                "out": shown(folder / "train"), "seed": seed}

    def _finetune(self, derived: dict, folder: Path, artifact: Path) -> None:
        config = folder / "finetune.yaml"
        config.write_text(yaml.safe_dump(derived, sort_keys=False))
        run_logged(train_command(config, folder / "train", None, None, self.max_steps), folder / "train.log",
                   self.threads, self.device)
        if not artifact.is_file():
            raise RuntimeError(f"the fine-tune run ({config}) finished without writing {artifact}")

    def train(self, row: Row, seed: int) -> dict[str, Any]:
        """Trains ``row`` with ``seed`` (or reuses a finished run); returns its record for the JSON."""
        from torchrec_sid.train.config import TrainConfig

        sids = self.sids(row.sids, seed) if row.sids else None
        out = self.work / f"seed{seed}" / row.name
        # the config the run will resolve (paths as the command passes them), the first part of its cache key
        config = TrainConfig.from_yaml(REPO / row.config, out=shown(out), seed=seed,
                                       semantic_ids=None if sids is None else shown(sids), max_steps=self.max_steps)
        key = {"step": "train", "config": config.to_dict(), "sids_sha256": None if sids is None else file_sha256(sids),
               "source": self.source, "device": self.device}
        command = train_command(REPO / row.config, out, seed, sids, self.max_steps)
        cached = not self.force and is_cached(out, out / "results.json", key)
        load = os.getloadavg()[0]
        timing = out / "bench_wall.json"
        if cached:
            wall = json.loads(timing.read_text())["wall_s"] if timing.is_file() else None
        else:
            if out.exists():
                shutil.rmtree(out)
            out.mkdir(parents=True)
            wall = run_logged(command, out / "train.log", self.threads, self.device)
            timing.write_text(json.dumps({"wall_s": wall}) + "\n")
            mark_done(out, key)
        results = json.loads((out / "results.json").read_text())
        kept = ("metrics", "parameters", "train_examples_per_second", "steps", "world_size")
        return {"row": row.name, "config": row.config, "seed": seed, "sids": None if sids is None else shown(sids),
                "out": shown(out), "cached": cached, "command": " ".join(command), "threads": self.threads,
                "wall_s": wall, "load_average_1m_at_start": None if cached else load,
                "item_lookups": item_lookups(config, sids), **{k: results.get(k) for k in kept}}


def item_lookups(config: Any, sids: Path | None) -> int:
    """Embedding-table rows read per item: the id row plus one per SID token (SIDE reads no table)."""
    model = config.model
    lookups = int("id" in model.item_representation)
    if "sid" in model.item_representation:
        levels = model.sid_tokens.num_levels
        if levels is None:
            from torchrec_sid.sid import SemanticIds

            if sids is None:
                raise ValueError(f"{config.model}: SID tokens without a SIDs file to read their levels from")
            levels = SemanticIds.load(sids).num_levels
        lookups += sum(levels - order + 1 for order in model.sid_tokens.ngram_orders)
        lookups += len(model.sid_tokens.prefix_lengths)
    return lookups


# ----------------------------------------------------------------------------------------------- summarising


def metric(run: dict[str, Any], name: str) -> float:
    split, key = name.split("_")
    return run["metrics"][split][key]


def mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def summarise(row: Row, runs: list[dict[str, Any]], id_total: int | None) -> dict[str, Any]:
    out: dict[str, Any] = {"row": row.name, "config": row.config, "sids": row.sids, "seeds": len(runs)}
    for split, key in METRICS:
        m, s = mean_std([metric(r, f"{split}_{key}") for r in runs])
        out[f"{split}_{key}"], out[f"{split}_{key}_std"] = m, s
        out[f"{split}_{key}_cell"] = f"{m:.4f}" + ("" if s is None else f" ± {s:.4f}")
    parameters = runs[0]["parameters"]
    out["embedding_parameters"], out["total_parameters"] = parameters["embedding"], parameters["total"]
    out["extra_parameters"] = None if id_total is None else parameters["total"] - id_total
    out["item_lookups"] = runs[0]["item_lookups"]
    out["examples_per_s"] = statistics.median(r["train_examples_per_second"] for r in runs)
    walls = [r["wall_s"] for r in runs if r["wall_s"] is not None]
    out["wall_s"] = statistics.median(walls) if walls else None
    return out


def compare(c: Comparison, rows: dict[str, dict[str, Any]], runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Difference of means (positive: ``a`` better), pooled std, verdict, and the seeds on which a is better."""
    out: dict[str, Any] = {"a": c.a, "b": c.b, "metric": c.metric, "relation": ">" if c.strict else ">="}
    missing = [name for name in (c.a, c.b) if name not in rows]
    if missing:
        return {**out, "verdict": f"not run ({', '.join(missing)} missing)"}
    sign = -1.0 if c.metric.split("_")[1] in LOWER_IS_BETTER else 1.0
    a, b = rows[c.a], rows[c.b]
    diff = sign * (a[c.metric] - b[c.metric])
    stds = [a[f"{c.metric}_std"], b[f"{c.metric}_std"]]
    pooled = math.sqrt((stds[0] ** 2 + stds[1] ** 2) / 2) if None not in stds else None
    holds = diff > 0 if c.strict else diff >= 0
    by_seed = {r["seed"]: metric(r, c.metric) for r in runs[c.b]}
    paired = [sign * (metric(r, c.metric) - by_seed[r["seed"]]) for r in runs[c.a] if r["seed"] in by_seed]
    wins = sum(d > 0 if c.strict else d >= 0 for d in paired)
    noise = ("no noise estimate (1 seed)" if pooled is None
             else "beyond noise" if abs(diff) > pooled else "within noise")
    return {**out, "a_mean": a[c.metric], "b_mean": b[c.metric], "better_by": diff, "pooled_std": pooled,
            "holds": holds, "noise": noise, "seeds_holding": f"{wins}/{len(paired)}",
            "verdict": ("holds" if holds else "does not hold") + f", {noise}"}


def evaluate_claims(rows: dict[str, dict[str, Any]], runs: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    out = []
    for claim in CLAIMS:
        comparisons = [compare(c, rows, runs) for c in claim.comparisons]
        done = [c for c in comparisons if "holds" in c]
        cost = None
        if claim.cost is not None:
            row, reference, limit = claim.cost
            if row in rows and reference in rows and None not in (rows[row]["extra_parameters"],
                                                                   rows[reference]["extra_parameters"]):
                ratio = rows[row]["extra_parameters"] / rows[reference]["extra_parameters"]
                cost = {"row": row, "reference": reference, "extra_parameters": rows[row]["extra_parameters"],
                        "reference_extra_parameters": rows[reference]["extra_parameters"], "ratio": ratio,
                        "limit": limit, "holds": ratio <= limit}
        checks = [c["holds"] for c in done] + ([cost["holds"]] if cost else [])
        if not done:
            verdict = "not run"
        elif all(checks):
            beyond = sum(c["noise"] == "beyond noise" for c in done)
            verdict = "holds " + (f"({beyond}/{len(done)} comparisons beyond noise)" if done[0]["pooled_std"]
                                  is not None else "(1 seed: no noise estimate)")
        elif not any(checks):
            verdict = "does not hold"
        else:
            verdict = f"mixed ({sum(checks)}/{len(checks)} checks hold)"
        if len(done) < len(comparisons):
            verdict += f"; {len(comparisons) - len(done)} comparison(s) not run"
        out.append({"claim": claim.text, "verdict": verdict, "comparisons": comparisons, "cost": cost})
    return out


def format_claims(claims: list[dict[str, Any]]) -> str:
    lines = ["Claims (better_by > 0: the first row is better; NE: lower is better; pooled std of the two rows)"]
    for claim in claims:
        lines.append(f"\n* {claim['claim']}: {claim['verdict']}")
        pairs = [{**c, "pair": f"{c['a']} {c['relation']} {c['b']}"} for c in claim["comparisons"]]
        table = [c for c in pairs if "holds" in c]
        not_run = list(dict.fromkeys(c["pair"] for c in pairs if "holds" not in c))
        if not_run:
            lines.append(f"  not run (a row missing): {'; '.join(not_run)}")
        if not table:
            continue
        lines.append(format_table(table, [
            ("pair", "comparison", None), ("metric", "metric", None), ("a_mean", "first", ".4f"),
            ("b_mean", "second", ".4f"), ("better_by", "better by", "+.4f"), ("pooled_std", "pooled std", ".4f"),
            ("seeds_holding", "seeds", None), ("verdict", "verdict", None)]))
        cost = claim["cost"]
        if cost is not None:
            lines.append(f"  feature cost: {cost['row']} adds {cost['extra_parameters']:,} parameters to the id-only "
                         f"model, {cost['reference']} {cost['reference_extra_parameters']:,}: ratio "
                         f"{cost['ratio']:.4f} ({'<=' if cost['holds'] else '>'} {cost['limit']:.4f}: "
                         f"{'holds' if cost['holds'] else 'does not hold'})")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ throughput


def throughput_setups(threads: int, cpus: int, device: str) -> tuple[list[tuple[int, int]], str | None]:
    """``(processes, threads per process)`` setups, and why the 2-process one is left out (None when it is not):
    under nccl each process needs its own GPU."""
    setups = list(dict.fromkeys([(1, threads), (1, 1), (2, max(1, cpus // 2))]))
    if device == "cuda" and (gpus := torch.cuda.device_count()) < 2:
        return [s for s in setups if s[0] == 1], f"2 processes need 2 GPUs under nccl, {gpus} visible"
    return setups, None


def throughput(runner: Runner, rows: list[Row], batches: int, repeats: int, cpus: int) -> dict[str, Any]:
    """Examples/s of ``rows`` (seed-0 SIDs) for ``batches`` batches in all, on 1 and 2 processes; the setups take
    turns within each repeat, so that a change of the machine's load falls on all of them."""
    setups, left_out = throughput_setups(runner.threads, cpus, runner.device)
    if left_out:
        print(f"throughput: the 2-process setup is skipped: {left_out}")
    runs, table = [], []
    with tqdm(total=len(rows) * len(setups) * repeats, desc="throughput", unit="run") as bar:
        for row in rows:
            sids = runner.sids(row.sids, 0) if row.sids else None
            for repeat in range(repeats):
                for nproc, threads in setups:
                    bar.set_postfix_str(f"{row.name} {nproc}p x {threads}t")
                    out = runner.work / "throughput" / f"{row.name}_{nproc}p_{threads}t_r{repeat}"
                    if out.exists():
                        shutil.rmtree(out)
                    out.mkdir(parents=True)
                    command = train_command(REPO / row.config, out, 0, sids, batches // nproc, nproc)
                    load = os.getloadavg()[0]
                    wall = run_logged(command, out / "train.log", threads, runner.device)
                    results = json.loads((out / "results.json").read_text())
                    runs.append({"row": row.name, "config": row.config, "setup": (nproc, threads), "processes": nproc,
                                 "threads_per_process": threads, "repeat": repeat, "steps": results["steps"],
                                 "examples": results["steps"] * nproc * results["config"]["batch_size"],
                                 "examples_per_s": results["train_examples_per_second"], "wall_s": wall,
                                 "load_average_1m_at_start": load, "command": " ".join(command)})
                    bar.update()
            base = None
            for setup in setups:
                group = [r for r in runs if r["row"] == row.name and r["setup"] == setup]
                rates = [r["examples_per_s"] for r in group]
                median = statistics.median(rates)
                base = base or median  # the first setup: 1 process of --threads threads
                table.append({"row": row.name, "processes": setup[0], "threads": setup[1], "examples_per_s": median,
                              "min": min(rates), "max": max(rates), "vs_first": median / base,
                              "wall_s": statistics.median(r["wall_s"] for r in group)})
    return {"batches": batches, "repeats": repeats, "setups": setups, "left_out": left_out, "runs": runs,
            "table": table}


# ---------------------------------------------------------------------------------------------------- output


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Test and cold-start AUC per row, error bars = std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["row"] for r in rows]
    fig, ax = plt.subplots(figsize=(1.1 * len(names) + 2.5, 4.2))
    width = 0.38
    lows, highs = [], []
    for offset, split in ((-width / 2, "test"), (width / 2, "cold")):
        means = [r[f"{split}_auc"] for r in rows]
        stds = [r[f"{split}_auc_std"] or 0.0 for r in rows]
        ax.bar([i + offset for i in range(len(names))], means, width, yerr=stds, capsize=3, label=f"{split} AUC")
        lows += [m - s for m, s in zip(means, stds)]
        highs += [m + s for m, s in zip(means, stds)]
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylim(max(0.0, min(lows) - 0.03), min(1.0, max(highs) + 0.02))
    ax.set_ylabel("AUC")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: 1 seed, rows {', '.join(QUICK_ROWS)}, 20 steps, 1 throughput repeat")
    parser.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 per row (default 3; --quick: 1)")
    parser.add_argument("--rows", nargs="+", choices=[r.name for r in ROWS], metavar="ROW",
                        help=f"rows to run (default all): {', '.join(r.name for r in ROWS)}")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="training steps per run (default: the configs' epochs; --quick: 20)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="OpenMP threads of each single-process run (default: all cores)")
    parser.add_argument("--throughput", action=argparse.BooleanOptionalAction, default=True,
                        help="measure examples/s on 1 vs 2 processes")
    parser.add_argument("--throughput-batches", type=int, default=None,
                        help="batches per throughput run, over all processes (default 150; --quick: 20)")
    parser.add_argument("--throughput-repeats", type=int, default=None, help="default 3; --quick: 1")
    parser.add_argument("--work", type=Path, default=None,
                        help="folder of SIDs and runs (default outputs/bench_ranking, --quick: ..._quick)")
    parser.add_argument("--force", action="store_true", help="rerun even what a previous invocation finished")
    add_device_argument(parser, "the training processes run on it (cuda: nccl); the SID fits stay on the CPU (the "
                                "quantizers have no GPU path)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    quick = args.quick
    seeds = args.seeds or (1 if quick else 3)
    max_steps = args.max_steps if args.max_steps is not None else (20 if quick else None)
    names = args.rows or (QUICK_ROWS if quick else [r.name for r in ROWS])
    batches = args.throughput_batches or (20 if quick else 150)
    repeats = args.throughput_repeats or (1 if quick else 3)
    work = args.work or REPO / "outputs" / ("bench_ranking_quick" if quick else "bench_ranking")
    suffix = ("_cuda" if device.type == "cuda" else "") + ("_quick" if quick else "")
    cpus = os.cpu_count() or 1
    threads_set = set_threads(args.threads)  # the in-process SID fits
    started, load_start = time.perf_counter(), os.getloadavg()

    selected, skipped = [], []
    for row in (r for r in ROWS if r.name in names):
        missing = missing_files(row)
        if missing:
            skipped.append({"row": row.name, "missing": missing})
            print(f"{row.name}: skipped: {', '.join(missing)} missing")
        else:
            selected.append(row)
    print(f"{len(selected)} rows x {seeds} seed(s), {'all epochs' if max_steps is None else f'{max_steps} steps'}, "
          f"{args.threads} thread(s), {cpus} cpus, load {load_start[0]:.2f}; runs under {shown(work)}")

    runner = Runner(work, args.threads, max_steps, args.force, device.type)
    runs: dict[str, list[dict[str, Any]]] = {row.name: [] for row in selected}
    failures: list[dict[str, Any]] = []
    with tqdm(total=len(selected) * seeds, desc="ranking", unit="run") as bar:
        for seed in range(seeds):
            for row in selected:
                bar.set_postfix_str(f"{row.name} seed {seed}")
                try:
                    runs[row.name].append(runner.train(row, seed))
                except Exception as e:  # noqa: BLE001 (reported; the other rows still run)
                    failures.append({"row": row.name, "seed": seed, "error": str(e)})
                    tqdm.write(f"{row.name} seed {seed}: FAILED: {e}")
                bar.update()

    done = [row for row in selected if runs[row.name]]
    id_runs = runs.get("id") or []
    id_total = id_runs[0]["parameters"]["total"] if id_runs else None
    summary = [summarise(row, runs[row.name], id_total) for row in done]
    by_name = {s["row"]: s for s in summary}
    claims = evaluate_claims(by_name, runs)

    steps = "all epochs" if max_steps is None else f"{max_steps} steps"
    print()
    print(format_table(summary, [
        ("row", "row", None), ("seeds", "n", None), ("test_auc_cell", "test AUC", None),
        ("test_ne_cell", "test NE", None), ("cold_auc_cell", "cold AUC", None), ("cold_ne_cell", "cold NE", None),
        ("tail_auc_cell", "long-tail AUC", None), ("embedding_parameters", "emb params", ",d"),
        ("extra_parameters", "+params vs id", ",d"),
        ("item_lookups", "lookups/item", None), ("examples_per_s", "ex/s", ",.0f"), ("wall_s", "wall s", ".1f")],
        title=f"MovieLens-100k, mean ± std over {seeds} seed(s), 1 process x {args.threads} thread(s), {steps}"))
    for s in skipped:
        print(f"{s['row']}: skipped: {', '.join(s['missing'])} missing")
    for f in failures:
        print(f"{f['row']} seed {f['seed']}: failed (see its train.log)")
    print()
    print(format_claims(claims))

    result_throughput = None
    if args.throughput:
        rows = [r for r in ROWS if r.name in THROUGHPUT_ROWS and not missing_files(r)]
        try:
            result_throughput = throughput(runner, rows, batches, repeats, cpus)
        except Exception as e:  # noqa: BLE001
            failures.append({"row": "throughput", "seed": 0, "error": str(e)})
            print(f"throughput: FAILED: {e}")
        if result_throughput is not None:
            print()
            print(format_table(result_throughput["table"], [
                ("row", "row", None), ("processes", "processes", None), ("threads", "threads/process", None),
                ("examples_per_s", "median ex/s", ",.0f"), ("min", "min", ",.0f"), ("max", "max", ",.0f"),
                ("vs_first", f"vs 1 process x {args.threads}", ".2f"), ("wall_s", "wall s", ".1f")],
                title=f"Training throughput: {batches} batches of 512 in all, median of {repeats}; {cpus} cpus "
                      f"shared by all processes (load average {os.getloadavg()[0]:.2f})"))

    wall = time.perf_counter() - started
    png = RESULTS_DIR / f"ranking{suffix}.png"
    if summary:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        plot(summary, png, f"MovieLens-100k DLRM: test and cold-start AUC, mean ± std over {seeds} seed(s), {steps}")
    payload = {
        "settings": {"seeds": list(range(seeds)), "rows": names, "max_steps": max_steps, "threads": args.threads,
                     "threads_set_in_process": threads_set, "quick": quick, "work": shown(work), "force": args.force,
                     "throughput_batches": batches, "throughput_repeats": repeats,
                     "source_sha256": runner.source, **device_facts(device)},
        "load_average_at_start": load_start, "load_average_at_end": os.getloadavg(), "wall_s": wall,
        "skipped": skipped, "failures": failures, "rows": summary, "claims": claims,
        "runs": [r for row in done for r in runs[row.name]], "sid_steps": list(runner.sid_steps.values()),
        "throughput": result_throughput,
    }
    path = write_json(f"ranking{suffix}", payload)
    print(f"\n{wall:.0f} s in all; wrote {path}" + (f" and {png}" if summary else ""))
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
