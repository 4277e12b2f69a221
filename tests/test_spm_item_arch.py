"""SentencePiece SID pieces in the model (``model.sid_tokens.spm_vocab_size``): ItemArch sums an item's piece rows
into its one vector (candidate, per-event and distinct-item history), the pieces table counts in ``row_budget``, the
model trains and traces."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchrec.fx import symbolic_trace
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_sid.models.configs import FeatureSchema, ModelConfig, SidTokenConfig
from torchrec_sid.models.dlrm import ItemArch, SidDLRM, count_parameters
from torchrec_sid.modules import SidFeatureTransform
from torchrec_sid.sid import SemanticIds
from torchrec_sid.sid.pieces import SidPieces, fit_sid_sentencepiece

pytest.importorskip("sentencepiece")

NUM_ITEMS, D = 40, 4
ITEMS = ["ad", "seen_ads"]
SCHEMA = FeatureSchema({"user_id": 5}, 2, NUM_ITEMS, "ad", "seen_ads")


def _sids() -> SemanticIds:
    """40 items, 3 levels of 4 codes: items 0-11 share the SID (1, 2, 3) and items 12-19 the prefix (0, 1), so BPE
    with 16 pieces cuts SIDs into 1 (items 0-11), 2 and 3 pieces."""
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 4, (NUM_ITEMS, 3), generator=g)
    codes[:12] = torch.tensor([1, 2, 3])
    codes[12:20, :2] = torch.tensor([0, 1])
    return SemanticIds(codes, [4, 4, 4], "rq_kmeans", {})


def _pieces() -> SidPieces:
    return fit_sid_sentencepiece(_sids(), 16, model_type="bpe", seed=0)


def _arch(distinct: bool, unknown_ids: str = "raise") -> ItemArch:
    torch.manual_seed(0)
    transform = SidFeatureTransform(_sids(), ITEMS, ngram_orders=[1], spm=_pieces(), unknown_ids=unknown_ids,  # type: ignore[arg-type]
                                    distinct_features=["seen_ads"] if distinct else ())
    return ItemArch("ad", "seen_ads", D, transform=transform,
                    embedding_collection=EmbeddingCollection(tables=transform.embedding_configs(D)))


def _features(candidates: list[int], history: list[int], lengths: list[int]) -> KeyedJaggedTensor:
    return KeyedJaggedTensor.from_lengths_sync(
        keys=ITEMS, values=torch.tensor(candidates + history),
        lengths=torch.tensor([1] * len(candidates) + lengths))


def _expected(arch: ItemArch, ids: list[int]) -> torch.Tensor:
    """``[n, d]``: each item's per-level rows plus the rows of its pieces, summed by hand."""
    assert arch.embedding_collection is not None
    weights = {name: module.weight for name, module in arch.embedding_collection.embeddings.items()}
    codes, pieces = _sids().codes, _pieces()
    rows = []
    for item in ids:
        vector = sum(weights[f"sid_l{level}"][codes[item, level]] for level in range(3))
        rows.append(vector + weights["sid_spm"][pieces.item_pieces(item)].sum(0))
    return torch.stack(rows)


def test_an_items_pieces_sum_to_its_one_vector() -> None:
    pieces = _pieces()
    counts = (pieces.offsets[1:] - pieces.offsets[:-1]).tolist()
    assert set(counts) == {1, 2, 3}  # items in one piece and in several: the case to sum
    arch = _arch(distinct=False).eval()
    history, lengths = [3, 0, 7, 3, 12, 39], [4, 0, 2]
    with torch.no_grad():
        out = arch(_features([1, 5, 38], history, lengths))
        expected = _expected(arch, [1, 5, 38] + history)
    assert out.candidate.shape == (3, D) and out.history.shape == (len(history), D)
    torch.testing.assert_close(out.candidate, expected[:3])
    torch.testing.assert_close(out.history, expected[3:])


def test_distinct_history_sums_the_pieces_of_each_distinct_item() -> None:
    features = _features([1, 5, 38], [3, 0, 7, 3, 12, 39, 0], [4, 0, 3])
    with torch.no_grad():
        per_event, distinct = _arch(distinct=False).eval()(features), _arch(distinct=True).eval()(features)
    assert torch.equal(per_event.candidate, distinct.candidate)
    torch.testing.assert_close(distinct.history, per_event.history, rtol=0, atol=1e-6)


def test_an_unknown_item_reads_the_oov_piece() -> None:
    arch = _arch(distinct=False, unknown_ids="oov").eval()
    with torch.no_grad():
        out = arch(_features([NUM_ITEMS + 3, 2], [-1], [1, 0]))
    assert arch.embedding_collection is not None
    weights = {name: module.weight for name, module in arch.embedding_collection.embeddings.items()}
    oov = sum(weights[name][-1] for name in ("sid_l0", "sid_l1", "sid_l2", "sid_spm"))
    torch.testing.assert_close(out.candidate[0], oov)
    torch.testing.assert_close(out.history[0], oov)


def _model(row_budget: int | None = 40) -> SidDLRM:
    torch.manual_seed(0)
    tokens = SidTokenConfig(ngram_orders=(1,), prefix_lengths=(2,), num_levels=3, row_budget=row_budget,
                            spm_vocab_size=16)
    config = ModelConfig(embedding_dim=D, item_representation=("sid",), sid_tokens=tokens, history_block="pooling",
                         max_history=4, dense_layers=(4,), over_layers=(4,))
    return SidDLRM.from_config(config, SCHEMA, _sids())


def _batch() -> tuple[torch.Tensor, KeyedJaggedTensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    features = KeyedJaggedTensor.from_lengths_sync(
        keys=["user_id", *ITEMS], values=torch.tensor([0, 4, 2, 1, 5, 38, 3, 0, 7, 3, 12, 39]),
        lengths=torch.tensor([1, 1, 1, 1, 1, 1, 4, 0, 2]))
    return torch.randn(3, 2, generator=g), features, torch.tensor([1.0, 0.0, 1.0])


def test_the_pieces_table_counts_in_the_row_budget_and_trains() -> None:
    model = _model(row_budget=40)
    assert model.item_arch.embedding_collection is not None
    sizes = {c.name: c.num_embeddings for c in model.item_arch.embedding_collection.embedding_configs()}
    # 16 pieces first; the 3 per-level tables keep their 4 rows; the 16 prefix-2 values share the 12 left
    assert sizes == {"sid_l0": 4, "sid_l1": 4, "sid_l2": 4, "sid_prefix2": 12, "sid_spm": 16}
    assert count_parameters(model)["embedding"] == (40 + 5) * D  # + the user table's 5 rows
    dense, features, labels = _batch()
    model.train()
    loss = F.binary_cross_entropy_with_logits(model(dense, features), labels)
    loss.backward()
    table = model.item_arch.embedding_collection.embeddings["sid_spm"].weight
    assert torch.isfinite(loss) and table.grad is not None
    used = sorted({p for item in [1, 5, 38, 3, 0, 7, 12, 39] for p in _pieces().item_pieces(item)})
    assert (table.grad[used].abs().sum(1) > 0).all() and int((table.grad.abs().sum(1) > 0).sum()) == len(used)


def test_traced_model_equals_eager() -> None:
    model = _model().eval()
    dense, features, _ = _batch()
    traced = symbolic_trace(model)
    with torch.no_grad():
        torch.testing.assert_close(traced(dense, features), model(dense, features))


@pytest.mark.parametrize("fields, message", [
    ({"spm_vocab_size": 1}, "spm_vocab_size must be >= 2"),
    ({"spm_vocab_size": 50, "row_budget": 50}, "spm_vocab_size 50 leaves no row of row_budget 50"),
    ({"spm_vocab_size": 16, "spm_model_type": "char"}, "spm_model_type must be 'unigram' or 'bpe'"),
])
def test_bad_spm_settings_name_the_setting(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SidTokenConfig(**fields)


def test_spm_with_sid_features_is_refused() -> None:
    config = ModelConfig(embedding_dim=D, item_representation=("sid",), sid_features=True,
                         sid_tokens=SidTokenConfig(spm_vocab_size=16), history_block="none")
    with pytest.raises(ValueError, match="spm_vocab_size .16. needs the per-item SID lookup"):
        SidDLRM.from_config(config, SCHEMA, _sids())
