"""HistoryArch's ``pad_history``: a batch padded to its longest history gives the outputs (and gradients) of the
fixed ``max_history`` padding for every history block, and traces / exports still pad to ``max_history``."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn
from torch.export import Dim
from torchrec.fx import symbolic_trace

from torchrec_sid.models.dlrm import (
    FeatureSchema,
    HistoryArch,
    ItemVectors,
    ModelConfig,
    SidDLRM,
    build_history_block,
)
from torchrec_sid.modules import TemperatureSchedule

D, ITEMS, MAX_HISTORY = 8, 12, 16
BLOCKS = {
    "pooling": {},
    "pma": {"num_outputs": 2, "num_heads": 2},
    "din": {"attention_hidden_dims": (8,)},
    "sim": {"top_k": 4, "attention_hidden_dims": (8,)},
    # no Gumbel noise: training is then deterministic, so the two paddings can be compared in train mode too
    "dmqn": {"num_codebooks": 2, "codebook_size": 4, "latent_dim": 4, "num_layers": 1, "attention_dim": 4,
             "num_time_buckets": 4, "attention_hidden_dims": (8,),
             "temperature": TemperatureSchedule(noise_initial=0.0, noise_final=0.0)},
}


def items(lengths: list[int], seed: int = 0) -> ItemVectors:
    """A batch of ``len(lengths)`` candidates with jagged histories of these lengths (ages, ids in [0, ITEMS))."""
    g = torch.Generator().manual_seed(seed)
    total, batch = sum(lengths), len(lengths)
    return ItemVectors(
        candidate=torch.randn(batch, D, generator=g), history=torch.randn(total, D, generator=g),
        candidate_ids=torch.randint(0, ITEMS, (batch,), generator=g),
        history_ids=torch.randint(0, ITEMS, (total,), generator=g),
        history_lengths=torch.tensor(lengths), history_ages=-torch.rand(total, generator=g) * 1e5)


def arch(block: str, pad_history: str) -> HistoryArch:
    torch.manual_seed(0)
    module = build_history_block(block, D, copy.deepcopy(BLOCKS[block]))
    assert module is not None
    keys = torch.arange(ITEMS) % 3 if block == "sim" else None  # SIM's search key: 3 categories
    return HistoryArch(module, D, MAX_HISTORY, keys, pad_history=pad_history)


def padded_lengths(model: HistoryArch) -> list[int]:
    """Records the L of every history the block receives."""
    seen: list[int] = []
    model.block.register_forward_pre_hook(lambda _, args: seen.append(args[0].size(1)))
    return seen


def outputs_and_grads(model: HistoryArch, x: ItemVectors) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    history = x.history.clone().requires_grad_()
    out = model(x._replace(history=history))
    out.square().sum().backward()
    assert history.grad is not None
    return out, history.grad, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("block", list(BLOCKS))
@pytest.mark.parametrize("training", [True, False])
def test_batch_padding_gives_the_fixed_padding_outputs_and_grads(block: str, training: bool) -> None:
    x = items([0, 3, 7, 1, 5])
    fixed, batch = arch(block, "max").train(training), arch(block, "batch").train(training)
    seen_fixed, seen_batch = padded_lengths(fixed), padded_lengths(batch)
    out_fixed, grad_fixed, params_fixed = outputs_and_grads(fixed, x)
    out_batch, grad_batch, params_batch = outputs_and_grads(batch, x)
    assert (seen_fixed, seen_batch) == ([MAX_HISTORY], [7])
    torch.testing.assert_close(out_batch, out_fixed, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_batch, grad_fixed, rtol=1e-5, atol=1e-6)
    assert params_batch.keys() == params_fixed.keys() and (params_fixed or not list(fixed.parameters()))
    for name, grad in params_fixed.items():
        torch.testing.assert_close(params_batch[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(("lengths", "expected"), [([2, 40, 5], MAX_HISTORY), ([0, 0], 1), ([16, 3], 16)])
def test_padded_length_is_the_longest_history_capped_and_at_least_one(lengths: list[int], expected: int) -> None:
    fixed, batch = arch("din", "max").eval(), arch("din", "batch").eval()
    seen = padded_lengths(batch)
    x = items(lengths)
    torch.testing.assert_close(batch(x), fixed(x), rtol=1e-5, atol=1e-6)
    assert seen == [expected]


class _Wrapped(nn.Module):
    """HistoryArch over plain tensors, for torch.export."""

    def __init__(self, model: HistoryArch) -> None:
        super().__init__()
        self.model = model

    def forward(self, candidate: Tensor, history: Tensor, lengths: Tensor, ages: Tensor) -> Tensor:
        ids = torch.zeros_like(lengths)
        return self.model(ItemVectors(candidate, history, ids, ids[:0].new_zeros(history.size(0)), lengths, ages))


def test_fx_trace_pads_to_max_history_and_matches_eager() -> None:
    model = arch("din", "batch").eval()
    traced = symbolic_trace(model)
    seen = padded_lengths(model)
    for lengths in ([2, 5, 1], [16, 0, 9, 3]):  # the graph holds no batch's length
        x = items(lengths)
        torch.testing.assert_close(traced(x), model(x), rtol=1e-5, atol=1e-6)
    assert seen == [5, 16]
    assert not [n for n in traced.graph.nodes if n.target in ("max", "item")]  # no length read from the data


def test_export_with_dynamic_batch_pads_to_max_history() -> None:
    model = arch("pooling", "batch").eval()
    x = items([2, 5, 1])
    args = (x.candidate, x.history, x.history_lengths, x.history_ages)
    shapes = {"candidate": {0: Dim("batch")}, "history": {0: Dim.AUTO}, "lengths": {0: Dim("batch")},
              "ages": {0: Dim.AUTO}}
    exported = torch.export.export(_Wrapped(model), args, dynamic_shapes=shapes, strict=False)
    other = items([4, 0, 11, 3, 1], seed=1)
    torch.testing.assert_close(
        exported.module()(other.candidate, other.history, other.history_lengths, other.history_ages),
        model(other), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pad_history", ["batch", "max"])
def test_model_config_sets_the_padding(pad_history: str) -> None:
    schema = FeatureSchema(pooled_features={"user_id": 4}, dense_in_features=2, num_items=ITEMS, item_feature="item",
                           history_feature="history")
    config = ModelConfig(embedding_dim=D, history_block="din", pad_history=pad_history, dense_layers=(D,),
                         over_layers=(D,))
    history_arch = SidDLRM.from_config(config, schema).history_arch
    assert history_arch is not None and history_arch.pad_history == pad_history


def test_pad_history_setting_is_checked() -> None:
    assert ModelConfig().pad_history == "batch"
    with pytest.raises(ValueError, match="model.pad_history must be one of .*got 'longest'"):
        ModelConfig(pad_history="longest")
    with pytest.raises(ValueError, match="HistoryArch: pad_history must be one of .*got 'fixed'"):
        arch("din", "fixed")
