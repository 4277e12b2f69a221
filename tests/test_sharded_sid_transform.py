"""SidFeatureTransform → EmbeddingBagCollection sharded by DistributedModelParallel over 2 real gloo processes
gives the unsharded model's outputs and, after one fused SGD step, its updated embedding weights.

Gradients are compared through the weights they produce: the sharded tables live in fbgemm TBE kernels with a
fused optimizer, which apply the gradient in backward and never expose ``.grad``. TorchRec divides the gradients
its all-to-all sends back by the world size (``torchrec.distributed.comm_ops`` gradient division, on by default,
matching DDP's averaging of dense gradients), so each shard owner applies the gradient of the mean over ranks of
``loss_r``, rank r's loss on its batch. The reference takes one plain SGD step, same learning rate, on that mean.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import Tensor, nn
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ShardingEnv
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from tests.multiprocess import run_multiprocess
from torchrec_sid.modules import SidFeatureTransform
from torchrec_sid.sid import SemanticIds

pytestmark = pytest.mark.distributed

WORLD_SIZE = 2
LEARNING_RATE = 0.5
DIM = 8
NUM_ITEMS = 40
# token tables (with their OOV row): sid_l0 5, sid_l1 5, sid_l2 9, sid_prefix2 17, sid_prefix3 65 (128 hashed to 64)
# on CPU the planner offers table-wise and column-wise (not row-wise) sharding; column-wise splits DIM in two
SHARDING = {"sid_l0": "table_wise", "sid_l1": "table_wise", "sid_l2": "column_wise", "sid_prefix2": "column_wise",
            "sid_prefix3": "table_wise"}


class SidModel(nn.Module):
    """Item ids → SID tokens → one pooled embedding per token feature, concatenated: ``[B, 10 * DIM]``."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        codes = torch.stack([torch.randint(0, c, (NUM_ITEMS,), generator=g) for c in (4, 4, 8)], dim=1)
        sids = SemanticIds(codes, [4, 4, 8], "test", {})
        self.transform = SidFeatureTransform(sids, ["item_id", "history_item_ids"], ngram_orders=[1],
                                             prefix_lengths=[2, 3], max_table_size=64, unknown_ids="oov")
        torch.manual_seed(0)
        self.ebc = EmbeddingBagCollection(tables=self.transform.embedding_bag_configs(DIM))
        self.feature_order = [name for names in self.transform.token_features for name in names]

    def forward(self, features: KeyedJaggedTensor) -> Tensor:
        pooled = self.ebc(self.transform(features)).to_dict()  # the sharded EBC orders keys by sharding type
        return torch.cat([pooled[name] for name in self.feature_order], dim=1)


def rank_batch(rank: int) -> tuple[KeyedJaggedTensor, Tensor]:
    """Rank r's 3 examples (with an empty history and, on rank 1, unknown ids) and its loss weights."""
    g = torch.Generator().manual_seed(100 + rank)
    item_ids = torch.randint(0, NUM_ITEMS, (3,), generator=g)
    history_lengths = torch.tensor([4, 0, 2]) if rank == 0 else torch.tensor([1, 5, 3])
    history = torch.randint(0, NUM_ITEMS, (int(history_lengths.sum()),), generator=g)
    if rank == 1:
        item_ids[2], history[0] = NUM_ITEMS + 7, -1  # map to the OOV rows
    features = KeyedJaggedTensor.from_lengths_sync(
        keys=["user_id", "item_id", "history_item_ids"],
        values=torch.cat([torch.tensor([7, 8, 9]), item_ids, history]),
        lengths=torch.cat([torch.ones(6, dtype=torch.long), history_lengths]),
    )
    return features, torch.randn(3, 10 * DIM, generator=g)


def _copy_into_shards(dmp: nn.Module, global_state: dict[str, Tensor]) -> None:
    """Writes each table's rows of the unsharded model into this rank's shards (whatever the plan)."""
    for name, tensor in dmp.state_dict().items():
        for shard in getattr(tensor, "local_shards", list)():
            rows, cols = shard.metadata.shard_offsets
            height, width = shard.tensor.shape
            shard.tensor.copy_(global_state[name][rows:rows + height, cols:cols + width])


def _local_shards(dmp: nn.Module) -> dict[str, list[tuple[list[int], Tensor]]]:
    return {name: [(shard.metadata.shard_offsets, shard.tensor.clone()) for shard in tensor.local_shards()]
            for name, tensor in dmp.state_dict().items() if hasattr(tensor, "local_shards")}


def _worker(rank: int, world_size: int) -> dict:
    """Rank ``rank``'s sharded forward on its batch and its shards after one fused SGD step."""
    model = SidModel()
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    sharders = [EmbeddingBagCollectionSharder(
        fused_params={"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": LEARNING_RATE})]
    constraints = {table: ParameterConstraints(sharding_types=[kind], compute_kernels=["fused"],
                                               min_partition=DIM // 2)
                   for table, kind in SHARDING.items()}
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=world_size, compute_device="cpu"),
                                       constraints=constraints)
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(model, env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
                                   device=torch.device("cpu"), plan=plan, sharders=sharders)
    _copy_into_shards(dmp, global_state)
    features, loss_weights = rank_batch(rank)
    out = dmp(features)
    (out * loss_weights).sum().backward()  # the fused optimizer updates the shards here
    sharding_types = {table: p.sharding_type for table, p in plan.plan["ebc"].items()}
    return {"out": out.detach(), "shards": _local_shards(dmp), "sharding_types": sharding_types}


@pytest.fixture(scope="module")
def sharded_results() -> list[dict]:
    return run_multiprocess(_worker, world_size=WORLD_SIZE)


@pytest.fixture(scope="module")
def reference() -> dict:
    """The unsharded model on both ranks' batches: outputs, and weights after one SGD step on the mean loss."""
    model = SidModel()
    outs, loss = [], torch.zeros(())
    for rank in range(WORLD_SIZE):
        features, loss_weights = rank_batch(rank)
        outs.append(model(features))
        loss = loss + (outs[-1] * loss_weights).sum()
    (loss / WORLD_SIZE).backward()
    updated = {f"ebc.embedding_bags.{name}.weight": (bag.weight - LEARNING_RATE * bag.weight.grad).detach()
               for name, bag in model.ebc.embedding_bags.items()}
    return {"outs": [o.detach() for o in outs], "updated": updated, "initial": model.state_dict()}


def test_plan_uses_table_wise_and_column_wise_sharding(sharded_results: list[dict]) -> None:
    assert sharded_results[0]["sharding_types"] == SHARDING


def test_sharded_outputs_match_unsharded(sharded_results: list[dict], reference: dict) -> None:
    for rank in range(WORLD_SIZE):
        torch.testing.assert_close(sharded_results[rank]["out"], reference["outs"][rank])


def test_sharded_sgd_step_matches_unsharded(sharded_results: list[dict], reference: dict) -> None:
    assembled = {name: torch.full_like(weight, float("nan")) for name, weight in reference["updated"].items()}
    for result in sharded_results:
        for name, shards in result["shards"].items():
            for (row, col), tensor in shards:
                assembled[name][row:row + tensor.shape[0], col:col + tensor.shape[1]] = tensor
    for name, weight in reference["updated"].items():
        torch.testing.assert_close(assembled[name], weight, msg=lambda m, name=name: f"{name}: {m}")
        assert not torch.equal(weight, reference["initial"][name]), f"{name} was not updated"
