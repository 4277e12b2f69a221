"""Export a trained :class:`~torchrec_sid.models.dlrm.SidDLRM` to a serving artifact (one ``.pt2`` file).

The artifact holds ``torch.export`` programs over plain tensors (no KJT in their signatures) and a JSON manifest:

* ``score(candidate_ids [C], <user inputs>, pooled_values [V], pooled_lengths [P*C], dense [C, F]) -> logits [C]``:
  one user, C candidates. For a history block other than DMQN the user inputs are the padded history
  ``history_ids [1, L], mask [1, L], ages [1, L]`` (the block reads the whole history per candidate);
* for DMQN, the user inputs are the cached state ``clusters [1, M, d], cluster_mask [1, M]``, and a second program
  ``encode(history_ids [1, L], mask [1, L], ages [1, L]) -> (clusters, cluster_mask)`` computes it (MCQM + ICIM),
  so a request with a cached state runs only CTAM and the arches above it.

C and L are dynamic. The manifest records the feature names, sizes, ``max_history``, the model version (SHA-256 of
its weights) and the version of the SID table the model was trained with (:func:`sid_table_version`); a store keys
cached states by both. :mod:`torchrec_sid.serving.artifact` loads the file with torch alone.

Example::

    model = from_catalog(ModelConfig(item_representation=("id", "sid"), history_block="dmqn"), catalog, sids)
    ... train ...
    export_ranker(model.eval(), "ranker.pt2", semantic_ids=sids)
    RankerArtifact.load("ranker.pt2")  # in the serving process
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.export import Dim
from torch.export.pt2_archive._package import package_pt2
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_sid.io import atomic_write_bytes
from torchrec_sid.models.dlrm import HistoryArch, ItemArch, SidDLRM
from torchrec_sid.modules import DIN, DMQN, SIM
from torchrec_sid.serving.artifact import ARTIFACT_FORMAT, MANIFEST, RankerArtifact
from torchrec_sid.sid import SemanticIds

__all__ = ["export_ranker", "model_version", "sid_table_version"]


def sid_table_version(semantic_ids: SemanticIds | None) -> str:
    """The first 16 hex digits of a SHA-256 over the SID table (codes, cardinalities, quantizer); ``"none"``
    for a model without SIDs. Two tables with the same codes have the same version."""
    if semantic_ids is None:
        return "none"
    digest = hashlib.sha256(json.dumps([semantic_ids.quantizer, semantic_ids.cardinalities]).encode())
    digest.update(semantic_ids.codes.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def model_version(model: nn.Module) -> str:
    """The first 16 hex digits of a SHA-256 over the model's state dict (names, dtypes, shapes, bytes)."""
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        if isinstance(value, Tensor):
            value = value.detach().cpu().contiguous()
            digest.update(json.dumps([name, str(value.dtype), list(value.shape)]).encode())
            digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


class _ItemVectors(nn.Module):
    """Item ids ``[N]`` -> ``[N, d]`` through the model's :class:`ItemArch` (as candidates, no history)."""

    def __init__(self, item_arch: ItemArch) -> None:
        super().__init__()
        # a shallow copy (the same tables) that reads no timestamps: the ages are the programs' own inputs, and
        # ItemArch's repeat_interleave of request times is data-dependent (torch.export cannot trace it)
        self.item_arch = copy.copy(item_arch)
        self.item_arch.timestamp_features = None
        self.keys = [item_arch.item_feature, item_arch.history_feature]

    def forward(self, ids: Tensor) -> Tensor:
        ones, zeros = torch.ones_like(ids, dtype=torch.int32), torch.zeros_like(ids, dtype=torch.int32)
        features = KeyedJaggedTensor(keys=self.keys, values=torch.cat([ids, ids[:0]]),
                                     lengths=torch.cat([ones, zeros]))
        vectors = self.item_arch(features).candidate
        torch._check(vectors.size(0) == ids.size(0))  # one vector per id (the KJT split is data-dependent)
        return vectors


class _Head(nn.Module):
    """The arches above the history block: pooled features, candidate, content, history vector -> logits."""

    def __init__(self, model: SidDLRM) -> None:
        super().__init__()
        self.sparse_arch, self.dense_arch = model.sparse_arch, model.dense_arch
        self.content_arch, self.interaction_arch, self.over_arch = (model.content_arch, model.interaction_arch,
                                                                     model.over_arch)
        self.projection = model.history_arch.projection if model.history_arch is not None else None
        self.pooled = list(model.sparse_arch.sparse_feature_names)

    def forward(self, candidate_ids: Tensor, candidates: Tensor, history: Tensor | None, pooled_values: Tensor,
                pooled_lengths: Tensor, dense: Tensor) -> Tensor:
        pooled = KeyedJaggedTensor(keys=self.pooled, values=pooled_values, lengths=pooled_lengths)
        vectors = [self.sparse_arch(pooled), candidates.unsqueeze(1)]
        if self.content_arch is not None:
            vectors.append(self.content_arch(candidate_ids).unsqueeze(1))
        if history is not None:
            vectors.append((history if self.projection is None else self.projection(history)).unsqueeze(1))
        return self.over_arch(self.interaction_arch(self.dense_arch(dense), torch.cat(vectors, dim=1))).squeeze(-1)


class _Encode(nn.Module):
    """DMQN's MCQM + ICIM: ``history_ids, mask, ages [1, L]`` -> ``clusters [1, M, d], cluster_mask [1, M]``."""

    def __init__(self, items: _ItemVectors, history_arch: HistoryArch) -> None:
        super().__init__()
        self.items, self.block = items, history_arch.block
        assert isinstance(self.block, DMQN)

    def forward(self, history_ids: Tensor, mask: Tensor, ages: Tensor) -> tuple[Tensor, Tensor]:
        history = self.items(history_ids.flatten()).view(1, history_ids.size(1), -1)
        state = self.block.encode_user(history, mask, ages)  # type: ignore[operator]
        return state.clusters, state.mask


class _ScoreWithState(nn.Module):
    """DMQN's CTAM + head over a cached state: one user, C candidates -> logits ``[C]``."""

    def __init__(self, items: _ItemVectors, history_arch: HistoryArch, head: _Head) -> None:
        super().__init__()
        self.items, self.block, self.head = items, history_arch.block, head

    def forward(self, candidate_ids: Tensor, clusters: Tensor, cluster_mask: Tensor, pooled_values: Tensor,
                pooled_lengths: Tensor, dense: Tensor) -> Tensor:
        candidates = self.items(candidate_ids)
        history = self.block.target_attention(clusters, cluster_mask, candidates[None])[0]  # type: ignore
        return self.head(candidate_ids, candidates, history, pooled_values, pooled_lengths, dense)


class _ScoreWithHistory(nn.Module):
    """Any other history block (or none) + head: one user's padded history, C candidates -> logits ``[C]``."""

    item_keys: Tensor | None

    def __init__(self, items: _ItemVectors, history_arch: HistoryArch | None, head: _Head) -> None:
        super().__init__()
        self.items, self.head = items, head
        self.block = history_arch.block if history_arch is not None else None
        self.item_keys = history_arch.item_keys if history_arch is not None else None

    def forward(self, candidate_ids: Tensor, history_ids: Tensor, mask: Tensor, ages: Tensor, pooled_values: Tensor,
                pooled_lengths: Tensor, dense: Tensor) -> Tensor:
        candidates = self.items(candidate_ids)
        out = None
        if isinstance(self.block, DIN):  # B = 1 user, C queries: each event's key projection computed once
            history = self.items(history_ids.flatten()).view(1, history_ids.size(1), -1)
            out = self.block.attention(history, mask, candidates[None])[0]
        elif self.block is not None:
            c, length = candidate_ids.size(0), history_ids.size(1)
            history = self.items(history_ids.flatten()).view(1, length, -1).expand(c, length, -1)
            keys = candidate_key = None
            if self.item_keys is not None:
                keys, candidate_key = self.item_keys[history_ids].expand(c, length), self.item_keys[candidate_ids]
            out = self.block(history, mask.expand(c, length), candidates, history_timestamps=ages.expand(c, length),
                             history_keys=keys, candidate_key=candidate_key)
        return self.head(candidate_ids, candidates, out, pooled_values, pooled_lengths, dense)


def _pooled_sizes(model: SidDLRM) -> dict[str, int]:
    """Rows of each pooled feature's table (an id must be below it)."""
    ebc = model.sparse_arch.embedding_bag_collection
    return {name: config.num_embeddings for config in ebc.embedding_bag_configs() for name in config.feature_names}


def _dense_in_features(model: SidDLRM) -> int:
    first = next(m for m in model.dense_arch.modules() if isinstance(m, nn.Linear))
    return first.in_features


def _num_items(model: SidDLRM, semantic_ids: SemanticIds | None, num_items: int | None) -> int:
    if num_items is not None:
        return num_items
    if semantic_ids is not None:
        return semantic_ids.num_items
    arch = model.item_arch
    if arch.side_packed_ids is not None:
        return arch.side_packed_ids.size(0)
    if arch.embedding_collection is not None:
        for config in arch.embedding_collection.embedding_configs():
            if arch.item_feature in config.feature_names:
                return config.num_embeddings
    raise ValueError("export_ranker: cannot tell the number of items of this model (no semantic_ids, SIDE or item "
                     "id table); pass num_items")


def _min_history(model: SidDLRM) -> int:
    """The shortest padded history the programs take: SIM's ``top_k`` (``min(top_k, L)`` is then static), else 2
    (an exported dynamic size is never 0 or 1)."""
    block = model.history_arch.block if model.history_arch is not None else None
    return max(2, block.top_k) if isinstance(block, SIM) else 2


def export_ranker(model: SidDLRM, path: str | Path, semantic_ids: SemanticIds | None = None,
                  num_items: int | None = None, extra: dict[str, Any] | None = None) -> RankerArtifact:
    """Exports ``model`` (put in eval mode) to one ``.pt2`` file at ``path``, atomically; returns it loaded.

    Args:
        model: the trained model (unsharded; a DMP-wrapped model's ``.module`` after loading the checkpoint).
        path: the artifact file.
        semantic_ids: the SID table the model was trained with; its version is recorded (``"none"`` without).
        num_items: the item catalog size (default: the SID table's, or the SIDE / item id table's).
        extra: more JSON metadata to record (e.g. the training config's name).
    """
    model = model.eval()
    items = _ItemVectors(model.item_arch)
    head = _Head(model)
    history_arch = model.history_arch
    stateful = history_arch is not None and isinstance(history_arch.block, DMQN)
    pooled = list(model.sparse_arch.sparse_feature_names)
    f = _dense_in_features(model)
    n_items = _num_items(model, semantic_ids, num_items)
    min_history = _min_history(model)
    c, length = 3, min_history + 3
    g = torch.Generator().manual_seed(0)
    candidate_ids = torch.randint(0, n_items, (c,), generator=g)
    history_ids = torch.randint(0, n_items, (1, length), generator=g)
    mask = torch.arange(length)[None] < length - 1
    ages = -torch.arange(length, 0, -1, dtype=torch.float32)[None] * 3600
    pooled_lengths = torch.ones(len(pooled) * c, dtype=torch.int32)
    pooled_values = torch.zeros(len(pooled) * c, dtype=torch.long)
    dense = torch.randn(c, f, generator=g)
    cand, hist, values = Dim("candidates", min=1), Dim("history", min=min_history), Dim.AUTO
    common = {"pooled_values": {0: values}, "pooled_lengths": {0: Dim.AUTO}, "dense": {0: cand}}
    history_shapes = {"history_ids": {1: hist}, "mask": {1: hist}, "ages": {1: hist}}
    programs: dict[str, torch.export.ExportedProgram] = {}
    started = time.perf_counter()
    with torch.no_grad():
        if stateful:
            assert history_arch is not None
            encode = _Encode(items, history_arch)
            programs["encode"] = torch.export.export(encode, (history_ids, mask, ages), dynamic_shapes=history_shapes,
                                                     strict=False)
            clusters, cluster_mask = encode(history_ids, mask, ages)
            scorer: nn.Module = _ScoreWithState(items, history_arch, head)
            inputs: tuple[Tensor, ...] = (candidate_ids, clusters, cluster_mask, pooled_values, pooled_lengths, dense)
            shapes: dict[str, Any] = {"candidate_ids": {0: cand}, "clusters": None, "cluster_mask": None, **common}
            state_shape = list(clusters.shape[1:])
        else:
            scorer = _ScoreWithHistory(items, history_arch, head)
            inputs = (candidate_ids, history_ids, mask, ages, pooled_values, pooled_lengths, dense)
            shapes = {"candidate_ids": {0: cand}, **history_shapes, **common}
            state_shape = []
        programs["score"] = torch.export.export(scorer, inputs, dynamic_shapes=shapes, strict=False)
    export_seconds = time.perf_counter() - started
    namespaces = sorted({node.target.namespace for program in programs.values() for node in program.graph.nodes
                         if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)}
                        - {"aten"})
    manifest = {
        "format": ARTIFACT_FORMAT,
        "model_version": model_version(model),
        "sid_table_version": sid_table_version(semantic_ids),
        "history_block": type(history_arch.block).__name__ if history_arch is not None else "none",
        "stateful": stateful,
        "state_shape": state_shape,
        "num_items": n_items,
        "max_history": history_arch.max_history if history_arch is not None else 0,
        "min_history": min_history,
        "uses_time": model.item_arch.timestamp_features is not None,
        "pooled_features": pooled,
        "pooled_sizes": _pooled_sizes(model),
        "dense_in_features": f,
        "item_feature": model.item_arch.item_feature,
        "history_feature": model.item_arch.history_feature,
        "operator_namespaces": namespaces,  # besides aten: "fbgemm" (TorchRec's KJT ops) needs fbgemm_gpu loaded
        "export_seconds": round(export_seconds, 3),
        "torch": torch.__version__,
        "extra": extra or {},
    }
    buffer = io.BytesIO()
    package_pt2(buffer, exported_programs=programs, extra_files={MANIFEST: json.dumps(manifest, sort_keys=True)})
    atomic_write_bytes(path, buffer.getvalue())
    return RankerArtifact.load(path)


def example_requests(artifact: RankerArtifact, lengths: Sequence[int], num_candidates: int,
                     seed: int = 0) -> list[dict[str, Any]]:
    """Random requests for ``artifact`` (history lengths ``lengths``), for tests and benchmarks."""
    g = torch.Generator().manual_seed(seed)
    m = artifact.manifest
    out = []
    for user, length in enumerate(lengths):
        now = 10**9
        out.append({
            "user": f"user-{user}",
            "history": torch.randint(0, m["num_items"], (length,), generator=g).tolist(),
            "history_timestamps": sorted(torch.randint(now - 10**7, now, (length,), generator=g).tolist()),
            "timestamp": now,
            "candidates": torch.randint(0, m["num_items"], (num_candidates,), generator=g).tolist(),
            "dense": torch.randn(m["dense_in_features"], generator=g).tolist(),
            "features": {name: [user % 3] for name in m["pooled_features"]},
        })
    return out
