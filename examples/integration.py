"""Semantic IDs in your own TorchRec model: the README's "Use it in your own TorchRec model", as a script.

Your catalogue has arbitrary int64 item ids and your own feature names; nothing here uses the library's MovieLens
schema. The steps (each a function below):

1. **Fit SIDs** on the items' content embeddings ``[N, D]`` (FSQ: ordinal digits, so SIDE can read them), with a
   collision suffix (``sids.suffix_level``) that makes every SID unique.
2. **Look up** catalogue ids: :class:`~torchrec_sid.modules.item_lookup.ItemSidLookup` maps your item features'
   int64 ids to artifact rows (a clear error names an unknown id) and adds each item's packed SID for SIDE.
3. **Transform**: :class:`~torchrec_sid.modules.SidFeatureTransform` appends per-level and prefix SID tokens for
   the candidate and every history event.
4. **EBC configs**: your own tables plus ``transform.embedding_bag_configs(dim)``, one ``EmbeddingBagCollection``.
5. **SIDE**: :class:`~torchrec_sid.modules.SIDEmbedding` pools the history's packed SIDs into ``[B, dim]`` with no
   table.
6. **TorchRec's DLRM** (``torchrec.models.dlrm.DLRM``) takes only an EBC and a dense tensor, so SIDE's ``[B, dim]``
   joins the dense input: ``dlrm(torch.cat([dense, side_vector], 1), features)`` with
   ``dense_in_features = num_dense + dim``.
7. **DMP over 2 processes**: plan and shard with ``DistributedModelParallel`` (the SID tables shard like any other;
   the lookup's and transform's buffers are replicated), one training step (:func:`sharded_step`).
8. **Export with a dynamic batch**: ``torch.export.export(..., strict=False)`` with ``dynamic_shapes`` built by a
   ``ShapesCollection`` over the dense input's dim 0 and the KJT's ``values()`` and ``lengths()`` dim 0
   (:func:`export_dynamic`); the exported program then runs any batch size.

Run: ``python -m torchrec_sid.examples.integration`` (one process: fits the SIDs, saves them to
``outputs/integration_sids.safetensors``, trains, exports), then
``torchrun --standalone --nproc_per_node 2 -m torchrec_sid.examples.integration`` (the 2-process DMP step, which
loads those SIDs: quantizers fit on one process). ``tests/test_integration_example.py`` runs
every step with feature names the library has never seen.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.export import Dim, ShapesCollection
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_sid.modules import SIDEmbedding, SidFeatureTransform
from torchrec_sid.modules.item_lookup import ItemSidLookup
from torchrec_sid.quantizers import FSQ
from torchrec_sid.sid import SemanticIds

SIDS_PATH = "outputs/integration_sids.safetensors"  # where the one-process run saves the SIDs for the torchrun run


@dataclass(frozen=True)
class Features:
    """Your feature names: the candidate item, the history of items, and one categorical feature of your own."""

    item: str = "product_id"
    history: str = "recent_products"
    segment: str = "shopper_segment"
    num_segments: int = 5
    num_dense: int = 4


@dataclass
class Catalogue:
    """``item_ids: [N]`` arbitrary distinct int64 ids and ``content: [N, D]`` embeddings, row i = item i."""

    item_ids: Tensor
    content: Tensor


def make_catalogue(num_items: int = 240, dim: int = 16, seed: int = 0) -> Catalogue:
    """A seeded catalogue of clustered content with sparse 63-bit item ids (stands in for yours)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(8, dim, generator=g)
    content = centres[torch.randint(8, (num_items,), generator=g)] + 0.3 * torch.randn(num_items, dim, generator=g)
    ids = torch.randint(-(2**62), 2**62, (num_items,), generator=g)
    return Catalogue(ids.unique()[torch.randperm(len(ids.unique()), generator=g)], content[: len(ids.unique())])


def fit_semantic_ids(catalogue: Catalogue, seed: int = 0) -> SemanticIds:
    """Step 1: FSQ SIDs (3 ordinal digits of 4 values) with a collision suffix level."""
    fsq = FSQ(levels=[4, 4, 4], hidden_dim=32, max_epochs=15, lr=1e-2, seed=seed).fit(catalogue.content)
    return fsq.semantic_ids(catalogue.content).with_collision_suffix()


class Ranker(nn.Module):
    """Steps 2-6: lookup -> transform -> EBC + SIDE -> TorchRec's DLRM. ``forward(dense [B, num_dense], features)
    -> logits [B]``."""

    def __init__(self, sids: SemanticIds, catalogue: Catalogue, names: Features, dim: int = 8,
                 device: torch.device | None = None) -> None:
        super().__init__()
        items = [names.item, names.history]
        self.names = names
        self.lookup = ItemSidLookup(sids, items, item_ids=catalogue.item_ids, packed_sids=True)
        self.transform = SidFeatureTransform(sids, items, ngram_orders=[1], prefix_lengths=[2],
                                             num_levels=sids.code_levels)
        tables = [EmbeddingBagConfig(num_embeddings=names.num_segments, embedding_dim=dim, name="segments",
                                     feature_names=[names.segment]),
                  EmbeddingBagConfig(num_embeddings=sids.num_items, embedding_dim=dim, name="item_rows",
                                     feature_names=items),
                  *self.transform.embedding_bag_configs(dim)]
        self.side = SIDEmbedding.from_semantic_ids(sids, dim)  # refuses the suffix level; reads the code levels
        self.dlrm = DLRM(embedding_bag_collection=EmbeddingBagCollection(tables, device=device),
                         dense_in_features=names.num_dense + dim, dense_arch_layer_sizes=[16, dim],
                         over_arch_layer_sizes=[16, 1], dense_device=device)

    def forward(self, dense: Tensor, features: KeyedJaggedTensor) -> Tensor:
        features = self.transform(self.lookup(features))
        history = self.side.pooled(features, self.names.history + "__sid_packed", mean=True)  # [B, dim]
        return self.dlrm(torch.cat([dense, history], dim=1), features).squeeze(-1)


def make_batch(catalogue: Catalogue, names: Features, batch_size: int, seed: int) -> tuple[Tensor, KeyedJaggedTensor,
                                                                                           Tensor]:
    """``(dense [B, num_dense], features, labels [B])`` with catalogue ids (some histories empty)."""
    g = torch.Generator().manual_seed(seed)
    items = catalogue.item_ids[torch.randint(len(catalogue.item_ids), (batch_size,), generator=g)]
    history_lengths = torch.randint(0, 6, (batch_size,), generator=g)
    history = catalogue.item_ids[torch.randint(len(catalogue.item_ids), (int(history_lengths.sum()),), generator=g)]
    segments = torch.randint(names.num_segments, (batch_size,), generator=g)
    features = KeyedJaggedTensor.from_lengths_sync(
        keys=[names.segment, names.item, names.history], values=torch.cat([segments, items, history]),
        lengths=torch.cat([torch.ones(2 * batch_size, dtype=torch.long), history_lengths]))
    dense = torch.randn(batch_size, names.num_dense, generator=g)
    return dense, features, torch.randint(0, 2, (batch_size,), generator=g).float()


def train_steps(model: Ranker, catalogue: Catalogue, names: Features, steps: int = 5) -> list[float]:
    """A few Adam steps on one process; returns the losses."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for step in range(steps):
        dense, features, labels = make_batch(catalogue, names, 32, seed=step)
        loss = nn.functional.binary_cross_entropy_with_logits(model(dense, features), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def sharded_step(rank: int, world_size: int, names: Features, sids_path: str) -> dict[str, object]:
    """Step 7 on one rank of an initialised process group: load the SIDs, plan, shard with DMP, one training step.

    SIDs are fitted once, on one process, and shared as a file (``sids.save(path)``, or ``torchrec-sid quantize``);
    every rank loads the same artifact. Embedding tables train with a fused row-wise Adagrad applied in backward
    (TorchRec's usual setup), the dense parts with Adam. Returns the plan's sharding type per table and the loss.
    """
    import torch.distributed as dist
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.distributed.types import ShardingEnv
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter
    from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

    catalogue = make_catalogue()  # seeded: the same catalogue ids on every rank
    sids = SemanticIds.load(sids_path)
    torch.manual_seed(0)
    model = Ranker(sids, catalogue, names)
    apply_optimizer_in_backward(RowWiseAdagrad, model.dlrm.sparse_arch.parameters(), {"lr": 0.05})
    sharders = [EmbeddingBagCollectionSharder()]
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=world_size, compute_device="cpu"))
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(model, env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
                                   device=torch.device("cpu"), plan=plan, sharders=sharders)
    dense_optimizer = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())),
                                            lambda params: torch.optim.Adam(params, lr=1e-2))
    optimizer = CombinedOptimizer([dmp.fused_optimizer, dense_optimizer])
    dense, features, labels = make_batch(catalogue, names, 16, seed=100 + rank)
    loss = nn.functional.binary_cross_entropy_with_logits(dmp(dense, features), labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    plan_types = {table: p.sharding_type for table, p in plan.plan["dlrm.sparse_arch.embedding_bag_collection"].items()}
    return {"sharding_types": plan_types, "loss": loss.item()}


def export_dynamic(model: Ranker, dense: Tensor, features: KeyedJaggedTensor) -> torch.export.ExportedProgram:
    """Step 8: ``torch.export`` with a dynamic batch. A KJT is a pytree of tensors, so its dynamic dims are given
    per tensor: ``values()`` (total ids) and ``lengths()`` (features x batch) along dim 0, with the dense input's
    batch dim; ``ShapesCollection`` maps them onto the inputs' pytree (a dict over the KJT does not work)."""
    shapes = ShapesCollection()
    shapes[dense] = {0: Dim.AUTO}
    shapes[features.values()] = {0: Dim.AUTO}
    shapes[features.lengths()] = {0: Dim.AUTO}
    model.eval()
    return torch.export.export(model, (dense, features), dynamic_shapes=shapes.dynamic_shapes(model, (dense, features)),
                               strict=False)


def main() -> None:
    names = Features()
    catalogue = make_catalogue()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: every rank loads the one-process run's SIDs
        import torch.distributed as dist

        if not os.path.exists(SIDS_PATH):
            raise SystemExit(f"{SIDS_PATH} is missing: run `python -m torchrec_sid.examples.integration` once first "
                             f"(it fits the SIDs on one process and saves them)")
        dist.init_process_group("gloo")
        print(sharded_step(dist.get_rank(), dist.get_world_size(), names, SIDS_PATH))
        dist.destroy_process_group()
        return
    sids = fit_semantic_ids(catalogue)
    os.makedirs(os.path.dirname(SIDS_PATH), exist_ok=True)
    sids.save(SIDS_PATH)
    print(f"{sids.num_items} items -> SIDs {sids.cardinalities} (suffix level {sids.suffix_level})")
    torch.manual_seed(0)
    model = Ranker(sids, catalogue, names)
    print("losses", [round(loss, 4) for loss in train_steps(model, catalogue, names)])
    program = export_dynamic(model, *make_batch(catalogue, names, 8, seed=1)[:2])
    dense, features, _ = make_batch(catalogue, names, 13, seed=2)
    torch.testing.assert_close(program.module()(dense, features), model(dense, features))
    print("exported; a batch of 13 matches eager")


if __name__ == "__main__":
    main()
