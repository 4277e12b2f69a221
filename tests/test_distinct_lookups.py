"""Issue 15's speed-ups keep the outputs: distinct-item history lookups (SidFeatureTransform / SidCodeTransform
``distinct_features``, ItemArch's own DistinctFeatures for the id tables, SIDE on the distinct items) and DMQN's eval
pooling by ``index_add`` instead of a one-hot matmul."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_sid.models.dlrm import DistinctFeatures, ItemArch, hashed_id_transform
from torchrec_sid.modules import DMQN, SIDEmbedding, SidFeatureTransform
from torchrec_sid.modules.dmqn import MultiClusterQuantizer
from torchrec_sid.modules.sid_codes import SidCodeTransform, distinct_events
from torchrec_sid.modules.sid_transform import distinct_values
from torchrec_sid.sid import SemanticIds
from torchrec_sid.sid.features import code_feature_names
from torchrec_sid.sid.packing import pack_codes

ITEMS = ["ad", "seen_ads"]
CODES = (code_feature_names("ad", 3), code_feature_names("seen_ads", 3))


def _sids(num_items: int = 40) -> SemanticIds:
    g = torch.Generator().manual_seed(0)
    return SemanticIds(torch.randint(0, 8, (num_items, 3), generator=g), cardinalities=[8, 8, 8],
                       quantizer="rq_kmeans", config={})


def _arch(distinct: bool, id_dropout: float = 0.0, trained: bool = False) -> ItemArch:
    torch.manual_seed(0)
    transform = SidFeatureTransform(_sids(), ["ad", "seen_ads"], ngram_orders=[1], prefix_lengths=[2],
                                    distinct_features=["seen_ads"] if distinct else ())
    tables = transform.embedding_configs(4)
    tables.append(EmbeddingConfig(name="ad_id", embedding_dim=4, num_embeddings=40, feature_names=["ad", "seen_ads"]))
    return ItemArch("ad", "seen_ads", 4, embedding_collection=EmbeddingCollection(tables=tables),
                    transform=transform, id_dropout=id_dropout,
                    trained_items=torch.arange(40) % 3 > 0 if trained else None)


def _features(codes: bool = False) -> KeyedJaggedTensor:
    """4 examples: ``ad`` [B], ``seen_ads`` 18 events over <= 12 distinct items; with ``codes``, each item's SID
    codes per level (the SIDs-as-features batch)."""
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([6, 0, 9, 3])
    candidate = torch.randint(0, 40, (4,), generator=g)
    history = torch.randint(0, 12, (int(lengths.sum()),), generator=g)
    ones = torch.ones(4, dtype=torch.long)
    keys, values, all_lengths = list(ITEMS), [candidate, history], [ones, lengths]
    if codes:
        sids = _sids().codes
        for ids, names, n in ((candidate, CODES[0], ones), (history, CODES[1], lengths)):
            keys += names
            values += [sids[ids, level] for level in range(3)]
            all_lengths += [n] * 3
    return KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.cat(values), lengths=torch.cat(all_lengths))


def _side(**settings: object) -> SIDEmbedding:
    return SIDEmbedding([8, 8, 8], 4, **settings)  # type: ignore[arg-type]


def _arch_of(kind: str, distinct: bool) -> ItemArch:
    """A small ItemArch of each history path, its history looked up per distinct item (``distinct``) or per event."""
    torch.manual_seed(0)
    id_table = EmbeddingConfig(name="ad_id", embedding_dim=4, num_embeddings=40, feature_names=list(ITEMS))
    reduced = ["seen_ads"] if distinct else []
    packed = pack_codes(_sids().codes, [8, 8, 8])
    if kind in ("id", "id dropout"):
        return ItemArch("ad", "seen_ads", 4, embedding_collection=EmbeddingCollection(tables=[id_table]),
                        distinct_history=distinct, trained_items=torch.arange(40) % 3 > 0,
                        id_dropout=0.5 if kind == "id dropout" else 0.0)
    if kind == "hashed":
        transform = hashed_id_transform(40, 7, ITEMS, distinct_features=reduced)
        return ItemArch("ad", "seen_ads", 4, transform=transform,
                        embedding_collection=EmbeddingCollection(tables=transform.embedding_configs(4)))
    if kind == "codes+side":  # SIDs as features: tokens and SIDE from the batch's codes
        codes = SidCodeTransform([8, 8, 8], ITEMS, prefix_lengths=[2], distinct_features=reduced)
        return ItemArch("ad", "seen_ads", 4, transform=codes, code_features=CODES, side=_side(bias=True),
                        embedding_collection=EmbeddingCollection(tables=[id_table, *codes.embedding_configs(4)]))
    if kind == "id+side":
        return ItemArch("ad", "seen_ads", 4, embedding_collection=EmbeddingCollection(tables=[id_table]),
                        side=_side(), side_packed_ids=packed, distinct_history=distinct)
    assert kind == "side"
    return ItemArch("ad", "seen_ads", 4, side=_side(bias=True), side_packed_ids=packed, distinct_history=distinct)


def _outputs_and_grads(arch: ItemArch, features: KeyedJaggedTensor) -> tuple[object, dict[str, torch.Tensor]]:
    torch.manual_seed(2)  # the same id-dropout draws
    vectors = arch(features)
    (vectors.history.square().sum() + vectors.candidate.sum()).backward()
    return vectors, {n: p.grad.clone() for n, p in arch.named_parameters() if p.grad is not None}


def _assert_same(per_event: ItemArch, distinct: ItemArch, features: KeyedJaggedTensor) -> None:
    """Forward equal bit for bit (the same sums in the same order); gradients equal up to the order in which the
    duplicates' gradients add."""
    (a, grads_a), (b, grads_b) = _outputs_and_grads(per_event, features), _outputs_and_grads(distinct, features)
    assert torch.equal(a.history, b.history) and torch.equal(a.candidate, b.candidate)  # type: ignore[attr-defined]
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad)


def test_distinct_values_keeps_each_id_once_in_the_first_example() -> None:
    features = KeyedJaggedTensor.from_lengths_sync(keys=["ad", "seen_ads"], values=torch.tensor([7, 9, 4, 2, 4, 2]),
                                                   lengths=torch.tensor([1, 1, 3, 1]))
    out = distinct_values(features, ["seen_ads"])
    assert out["seen_ads"].values().tolist() == [2, 4] and out["seen_ads"].lengths().tolist() == [2, 0]
    assert out["ad"].values().tolist() == [7, 9]
    with pytest.raises(ValueError, match="'watched'"):
        distinct_values(features, ["watched"])


@pytest.mark.parametrize(("id_dropout", "trained"), [(0.0, False), (0.0, True), (0.5, True)])
def test_distinct_history_lookups_equal_per_event_lookups(id_dropout: float, trained: bool) -> None:
    per_event, distinct = _arch(False, id_dropout, trained), _arch(True, id_dropout, trained)
    assert distinct.distinct_history and not per_event.distinct_history
    outputs, grads = [], []
    for arch in (per_event, distinct):
        torch.manual_seed(2)  # the same id-dropout draws
        vectors = arch(_features())
        (vectors.history.square().sum() + vectors.candidate.sum()).backward()
        outputs.append(vectors)
        grads.append({n: p.grad.clone() for n, p in arch.named_parameters() if p.grad is not None})
    assert torch.equal(outputs[0].history, outputs[1].history)  # bit for bit: the same sums in the same order
    assert torch.equal(outputs[0].candidate, outputs[1].candidate)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, grad in grads[0].items():  # the duplicates' gradients add in another order
        torch.testing.assert_close(grads[1][name], grad)


@pytest.mark.parametrize("kind", ["id", "id dropout", "hashed", "codes+side", "id+side", "side"])
def test_every_history_path_looks_up_distinct_items_with_the_same_outputs(kind: str) -> None:
    per_event, distinct = _arch_of(kind, False), _arch_of(kind, True)
    assert distinct.distinct_history and not per_event.distinct_history
    assert isinstance(distinct.distinct, DistinctFeatures) == (kind in ("id", "id dropout", "id+side"))
    _assert_same(per_event, distinct, _features(codes=kind == "codes+side"))


def test_code_transform_reduces_the_history_to_its_items_first_events() -> None:
    transform = SidCodeTransform([8, 8, 8], ITEMS, prefix_lengths=[2], distinct_features=["seen_ads"])
    features = _features(codes=True)
    out, per_event = transform(features), SidCodeTransform([8, 8, 8], ITEMS, prefix_lengths=[2])(features)
    history = features["seen_ads"].values()
    distinct, first = distinct_events(history)
    assert torch.equal(distinct, torch.unique(history))
    assert first.tolist() == [int((history == item).nonzero()[0]) for item in distinct]
    assert out["seen_ads"].lengths().tolist() == [distinct.numel(), 0, 0, 0]
    for name in transform.derived_feature_names("seen_ads"):
        assert torch.equal(out[name].values(), per_event[name].values()[first])
    assert torch.equal(out["ad__sid_prefix2"].values(), per_event["ad__sid_prefix2"].values())
    with pytest.raises(ValueError, match=r"distinct_features \['watched'\] must be among"):
        SidCodeTransform([8, 8, 8], ITEMS, distinct_features=["watched"])


def _one_hot_clusters(mcqm: MultiClusterQuantizer, history: torch.Tensor, mask: torch.Tensor,
                      timestamps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The previous eval pooling: a ``[B, L, M]`` one-hot of ``logits``'s argmax, matmul'd with the history."""
    history = torch.where(mask[..., None], history, 0.0)
    assignment = F.one_hot(mcqm.logits(history).argmax(dim=-1), mcqm.codebook_size).to(history.dtype)
    assignment = (assignment * mask[..., None, None]).flatten(2)
    counts = assignment.sum(dim=1)
    embeddings = (assignment.transpose(1, 2) @ history) / counts.clamp(min=1)[..., None]
    times = torch.where(mask, timestamps, 0).double()
    mean_times = (assignment.double().transpose(1, 2) @ times[..., None]).squeeze(-1) / counts.double().clamp(min=1)
    return embeddings, counts, mean_times


def test_dmqn_eval_pooling_equals_the_one_hot_reference() -> None:
    torch.manual_seed(0)
    mcqm = DMQN(8, num_codebooks=3, codebook_size=5).eval().quantizer
    history = torch.randn(3, 7, 8)
    mask = torch.arange(7) < torch.tensor([[7], [2], [0]])
    history[~mask] = float("nan")  # padding never reaches a cluster
    timestamps = torch.randint(0, 10**6, (3, 7))
    clusters = mcqm(history, mask, timestamps)
    embeddings, counts, mean_times = _one_hot_clusters(mcqm, history.nan_to_num(), mask, timestamps)
    assert torch.equal(clusters.counts, counts) and counts.sum().item() == 3 * 9
    torch.testing.assert_close(clusters.embeddings, embeddings)
    torch.testing.assert_close(clusters.timestamps, mean_times)
    assert torch.equal(mcqm.argmax_codes(history[:1]), mcqm.logits(history[:1]).argmax(-1))
