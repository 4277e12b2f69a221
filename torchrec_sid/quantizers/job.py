"""The quantize job: item content embeddings -> fitted quantizer -> ``SemanticIds`` artifact.

Runs on one process, or on N under ``torchrun`` / TorchX (``WORLD_SIZE > 1``: gloo on CPU, each rank reads and fits
only its contiguous block of items; rank 0 gathers the codes and writes the artifacts).

Example::

    torchrec-sid quantize --method rq_gmm --levels 3 --codebook-size 256 --data movielens --out sids.safetensors
    torchrec-sid quantize --config examples/quantize_rq_gmm.yaml
"""

from __future__ import annotations

import dataclasses
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

from torchrec_sid.quantizers.base import SemanticIds, build_quantizer
from torchrec_sid.quantizers.metrics import perplexity, quality_report, utilization

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantizeConfig:
    """Everything one quantize run needs; a YAML file with these keys is a complete run.

    Args:
        method: quantizer registry name (``rq_kmeans``, ``rq_gmm``, ...).
        data: ``movielens`` (MiniLM text embeddings of the 1,682 items), ``synthetic`` (clustered content of
            ``synthetic_items`` items) or a path to a ``.npy`` file ``[N, D]`` (row i = item i).
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
    out: str = "outputs/sids.safetensors"
    quantizer: dict[str, Any] = field(default_factory=dict)
    collision_suffix: bool = True
    tensorboard: str | None = None
    metrics_sample: int = 50_000
    ml100k: str | None = None
    synthetic_items: int = 100_000
    seed: int = 0

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, **overrides: Any) -> QuantizeConfig:
        """Reads a YAML file of these fields; ``overrides`` that are not None win (``quantizer`` merges)."""
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{path}: unknown field(s) {unknown}; expected some of {sorted(known)}")
        quantizer = {**raw.get("quantizer", {}), **overrides.pop("quantizer", {})}
        return cls(**{**raw, **{k: v for k, v in overrides.items() if v is not None}, "quantizer": quantizer})

    @property
    def quantizer_path(self) -> Path:
        out = Path(self.out)
        return out.with_name(out.name.removesuffix(".safetensors") + ".quantizer.safetensors")


def embedding_source(config: QuantizeConfig, progress: bool = True) -> np.ndarray:
    """The item embeddings ``[N, D]`` of ``config.data``; a ``.npy`` file is memory-mapped, so a rank reads only the
    rows it indexes."""
    if config.data == "movielens":
        from torchrec_sid.data import movielens

        return movielens.load(config.ml100k).content(progress=progress).text.numpy()
    if config.data == "synthetic":
        from torchrec_sid.data.synthetic import SyntheticConfig, generate_items

        return generate_items(SyntheticConfig(num_items=config.synthetic_items, seed=config.seed)).content.numpy()
    if config.data.endswith(".npy"):
        if not Path(config.data).is_file():
            raise ValueError(f"data: {config.data} is not a file")
        source = np.load(config.data, mmap_mode="r")
        if source.ndim != 2:
            raise ValueError(f"data: {config.data} must hold a 2-d array [N, D], got shape {source.shape}")
        return source
    raise ValueError(f"data must be 'movielens', 'synthetic' or a .npy file, got {config.data!r}")


def _rows(source: np.ndarray, index: slice | np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(source[index], dtype=np.float32))  # a copy: memory maps are read-only


def _block(n: int, rank: int, world_size: int) -> tuple[int, int]:
    bounds = np.linspace(0, n, world_size + 1).round().astype(int)
    return int(bounds[rank]), int(bounds[rank + 1])


def _gather_codes(codes: torch.Tensor) -> torch.Tensor:
    """All ranks' codes in rank order (blocks are contiguous, so this is item order)."""
    if not (dist.is_available() and dist.is_initialized()):
        return codes
    parts: list[torch.Tensor | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, codes)
    return torch.cat(parts)


def run(config: QuantizeConfig) -> SemanticIds | None:
    """Fits, encodes and writes the artifacts; returns the ``SemanticIds`` on rank 0 (None on other ranks)."""
    quantizer = build_quantizer(config.method, **config.quantizer)  # bad settings fail before any data loads
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    source = embedding_source(config, progress=rank == 0)
    num_items = len(source)
    start, stop = _block(num_items, rank, world_size)
    x = _rows(source, slice(start, stop))
    logger.info("rank %d: fitting %s on items [%d rows of %d, dim %d]", rank, config.method, len(x), num_items,
                x.shape[1])
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
    sids = SemanticIds(codes, quantizer.cardinalities, quantizer.name, {**quantizer.config(), "data": config.data},
                       metrics, digit_centres=quantizer.digit_centres)
    if config.collision_suffix:
        sids = sids.with_collision_suffix()
    sids.save(config.out)
    quantizer.save(config.quantizer_path)
    logger.info("wrote %s and %s", config.out, config.quantizer_path)
    return sids


def _metrics_sample(n: int, size: int, seed: int) -> torch.Tensor:
    if n <= size:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size].sort().values
