"""The quantize job: item content embeddings -> fitted quantizer -> ``SemanticIds`` artifact.

Runs on one process, or on N under ``torchrun`` / TorchX (``WORLD_SIZE > 1``: gloo on CPU, each rank reads and fits
only its contiguous block of items; rank 0 gathers the codes and writes the artifacts).

Example::

    torchrec-sid quantize --method rq_gmm --levels 3 --codebook-size 256 --data movielens --out sids.safetensors
    torchrec-sid quantize --config examples/quantize_rq_gmm.yaml
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch.utils.tensorboard import SummaryWriter

from torchrec_sid._dist import is_distributed
from torchrec_sid.quantizers.base import build_quantizer
from torchrec_sid.quantizers.metrics import perplexity, quality_report, utilization
from torchrec_sid.sid import SemanticIds
from torchrec_sid.sid.semantic_ids import quantizer_path
from torchrec_sid.typed_config import bounds, check_bounds, from_mapping

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantizeConfig:
    """Everything one quantize run needs; a YAML file with these keys is a complete run.

    Args:
        method: quantizer registry name (``rq_kmeans``, ``rq_gmm``, ...).
        data: ``movielens`` (the 1,682 items), ``synthetic`` (``synthetic_items`` generated items) or a path to a
            ``.npy`` file ``[N, D]`` (row i = item i).
        signals: the content signals the quantizer reads, for ``movielens`` / ``synthetic``: ``text`` (MiniLM
            embeddings / the generated content) and ``meta`` (genres and, for MovieLens, release decade). One signal
            is passed as a tensor ``[N, D]``, several as ``{name: [N, D_m]}`` (multi-signal quantizers: MMQ,
            VQ-fusion, the autoencoders' ``signals``).
        out: where the ``SemanticIds`` file goes; the fitted quantizer is written next to it
            (``<out stem>.quantizer.safetensors``).
        quantizer: settings of the quantizer (``levels``, ``codebook_size``, ``max_iter``, ``seed``, ...).
        collision_suffix: append a level that makes every item's SID unique.
        tensorboard: folder for TensorBoard scalars (None: none).
        metrics_sample: rows the quality metrics are computed on (a seeded sample when the catalogue is larger).
        ml100k: official ml-100k folder for ``data: movielens`` (None: the PyPI wheel copy).
        synthetic_items: items for ``data: synthetic``.
        seed: seed of the synthetic data and the metrics sample.
    """

    method: str = "rq_gmm"
    data: str = "movielens"
    signals: tuple[str, ...] = ("text",)
    out: str = "outputs/sids.safetensors"
    quantizer: dict[str, Any] = field(default_factory=dict)
    collision_suffix: bool = True
    tensorboard: str | None = None
    metrics_sample: int = field(default=50_000, metadata=bounds(ge=1))
    ml100k: str | None = None
    synthetic_items: int = field(default=100_000, metadata=bounds(ge=1))
    seed: int = field(default=0, metadata=bounds(ge=0))

    def __post_init__(self) -> None:
        check_bounds(self)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, **overrides: Any) -> QuantizeConfig:
        """Reads a YAML file of these fields; ``overrides`` that are not None win (``quantizer`` merges). Any unknown
        key, wrong type or out-of-range number raises :class:`~torchrec_sid.typed_config.ConfigError` naming the
        file, the field and the value."""
        with open(path) as f:
            raw = yaml.safe_load(f)
        if not isinstance(raw, dict):
            return from_mapping(cls, raw, str(path))  # raises, naming what the file holds
        quantizer = {**(raw.get("quantizer") or {}), **overrides.pop("quantizer", {})}
        merged = {**raw, **{k: v for k, v in overrides.items() if v is not None}, "quantizer": quantizer}
        return from_mapping(cls, merged, str(path))

    @property
    def quantizer_path(self) -> Path:
        return quantizer_path(self.out)


def embedding_source(config: QuantizeConfig, progress: bool = True) -> dict[str, np.ndarray]:
    """The item signals ``{name: [N, D_m]}`` of ``config.data`` (``config.signals`` of them); a ``.npy`` file is
    memory-mapped, so a rank reads only the rows it indexes."""
    if config.data.endswith(".npy"):
        if len(config.signals) != 1:
            raise ValueError(f"signals: a .npy file is one signal, got {list(config.signals)}")
        if not Path(config.data).is_file():
            raise ValueError(f"data: {config.data} is not a file")
        source = np.load(config.data, mmap_mode="r")
        if source.ndim != 2:
            raise ValueError(f"data: {config.data} must hold a 2-d array [N, D], got shape {source.shape}")
        return {config.signals[0]: source}
    if config.data == "movielens":
        from torchrec_sid.data import movielens

        available = movielens.load(config.ml100k).signals(progress=progress)
    elif config.data == "synthetic":
        from torchrec_sid.data.synthetic import SyntheticConfig, generate_items

        available = generate_items(SyntheticConfig(num_items=config.synthetic_items, seed=config.seed)).signals()
    else:
        raise ValueError(f"data must be 'movielens', 'synthetic' or a .npy file, got {config.data!r}")
    unknown = sorted(set(config.signals) - set(available))
    if unknown or not config.signals:
        raise ValueError(f"signals {list(config.signals)}: {config.data} has {sorted(available)}")
    return {name: available[name].numpy() for name in config.signals}


def _rows(source: dict[str, np.ndarray], index: slice | np.ndarray) -> torch.Tensor | dict[str, torch.Tensor]:
    """The rows ``index`` of every signal, as float32 copies (memory maps are read-only); one signal: a tensor."""
    rows = {name: torch.from_numpy(np.array(x[index], dtype=np.float32)) for name, x in source.items()}
    return next(iter(rows.values())) if len(rows) == 1 else rows


def _block(n: int, rank: int, world_size: int) -> tuple[int, int]:
    bounds = np.linspace(0, n, world_size + 1).round().astype(int)
    return int(bounds[rank]), int(bounds[rank + 1])


def _gather_codes(codes: torch.Tensor) -> torch.Tensor:
    """All ranks' codes in rank order (blocks are contiguous, so this is item order)."""
    if not is_distributed():
        return codes
    parts: list[torch.Tensor | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, codes)
    return torch.cat([p for p in parts if p is not None])


def run(config: QuantizeConfig) -> SemanticIds | None:
    """Fits, encodes and writes the artifacts; returns the ``SemanticIds`` on rank 0 (None on other ranks)."""
    _check_outputs(config)
    quantizer = build_quantizer(config.method, **config.quantizer)
    quantizer.check_params()  # bad settings fail before any data loads
    if len(config.signals) > 1 and set(config.signals) != set(quantizer.signal_names):
        reads = "one signal" if len(quantizer.signal_names) == 1 else f"the signals {quantizer.signal_names}"
        raise ValueError(f"signals {list(config.signals)}: {config.method} reads {reads}; multi-signal "
                         f"quantizers are the neural ones (rq_vae, fsq, dpca, mmq) with their own `signals` setting")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    source = embedding_source(config, progress=rank == 0)
    num_items = len(next(iter(source.values())))
    start, stop = _block(num_items, rank, world_size)
    x = _rows(source, slice(start, stop))
    logger.info("rank %d: fitting %s on items [%d rows of %d, dims %s]", rank, config.method, stop - start,
                num_items, {name: s.shape[1] for name, s in source.items()})
    writer = SummaryWriter(config.tensorboard) if config.tensorboard and rank == 0 else None
    try:
        quantizer.fit(x, progress=rank == 0, writer=writer)
    finally:
        if writer is not None:
            writer.close()
    codes = _gather_codes(quantizer.encode(x))
    if rank != 0:
        return None
    sample = _metrics_sample(num_items, config.metrics_sample, config.seed)
    sample_x = _rows(source, sample.numpy())
    metrics = quality_report(quantizer, sample_x, codes=codes[sample])
    metrics.update(num_items=num_items, metrics_rows=len(sample),
                   utilization=utilization(codes, quantizer.cardinalities),
                   perplexity=perplexity(codes, quantizer.cardinalities))
    sids = SemanticIds(codes, quantizer.cardinalities, quantizer.name,
                       {**quantizer.get_params(), "data": config.data, "signals": list(config.signals)},
                       metrics, digit_centres=quantizer.digit_centres)
    if config.collision_suffix:
        sids = sids.with_collision_suffix()
    sids.save(config.out)
    quantizer.save(config.quantizer_path)
    logger.info("wrote %s and %s", config.out, config.quantizer_path)
    return sids


def _check_outputs(config: QuantizeConfig) -> None:
    """Refuses, before any work, outputs that would overwrite the input or each other."""
    out, quantizer_file = Path(config.out).resolve(), config.quantizer_path.resolve()
    if config.data.endswith(".npy") and Path(config.data).resolve() in (out, quantizer_file):
        raise ValueError(f"out: {config.out} would overwrite the input embeddings --data {config.data}; "
                         f"choose another --out (it also writes {config.quantizer_path.name})")
    if not out.name.endswith(".safetensors"):
        raise ValueError(f"out: {config.out} must end in .safetensors (the quantizer goes beside it as "
                         f"<stem>.quantizer.safetensors)")


def _metrics_sample(n: int, size: int, seed: int) -> torch.Tensor:
    if n <= size:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size].sort().values
