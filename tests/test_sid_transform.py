from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.export import Dim, ShapesCollection
from torchrec.fx import symbolic_trace
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_sid.modules import SidFeatureTransform, hash_packed_ids
from torchrec_sid.modules.sid_transform import (
    _check_offsets_fit,
    _item_ids,
    append_sid_tokens,
    gather_token_rows,
    sid_tokens,
    token_plan,
)
from torchrec_sid.sid import SemanticIds

# 5 items, 3 levels with cardinalities [4, 4, 8]; items 0 and 4 share the prefix (0, 1)
CODES = torch.tensor([[0, 1, 5], [2, 0, 7], [3, 3, 0], [1, 2, 3], [0, 1, 6]])
SIDS = SemanticIds(CODES, [4, 4, 8], "test", {})
ITEM_FEATURES = ["item_id", "history_item_ids"]


def batch(weights: Tensor | None = None, dtype: torch.dtype = torch.long) -> KeyedJaggedTensor:
    """3 examples.

    user_id           [10]    [11]   [12]
    item_id           [3]     [0]    [4]
    history_item_ids  [1, 2]  []     [0, 4, 3]
    """
    return KeyedJaggedTensor.from_lengths_sync(
        keys=["user_id", *ITEM_FEATURES],
        values=torch.tensor([10, 11, 12, 3, 0, 4, 1, 2, 0, 4, 3], dtype=dtype),
        lengths=torch.tensor([1, 1, 1, 1, 1, 1, 2, 0, 3]),
        weights=weights,
    )


def transform(**settings) -> SidFeatureTransform:
    return SidFeatureTransform(SIDS, ITEM_FEATURES, **({"ngram_orders": [1], "prefix_lengths": [2]} | settings))


def reference_hash(x: int, num_buckets: int) -> int:
    """The documented hash, in Python integers."""
    p = 2**31 - 1
    return ((0x5BD1E995 * (x % 2**31)) % p + (0x27D4EB2F * ((x >> 31) % p)) % p + 0x165667B1) % p % num_buckets


def test_per_level_and_prefix_tokens_on_a_hand_computed_batch() -> None:
    out = transform()(batch())
    assert out.keys() == ["user_id", "item_id", "history_item_ids",
                          "item_id__sid_l0", "item_id__sid_l1", "item_id__sid_l2", "item_id__sid_prefix2",
                          "history_item_ids__sid_l0", "history_item_ids__sid_l1", "history_item_ids__sid_l2",
                          "history_item_ids__sid_prefix2"]
    expected = {
        "user_id": [[10], [11], [12]],
        "item_id": [[3], [0], [4]],
        "history_item_ids": [[1, 2], [], [0, 4, 3]],
        "item_id__sid_l0": [[1], [0], [0]],
        "item_id__sid_l1": [[2], [1], [1]],
        "item_id__sid_l2": [[3], [5], [6]],
        "item_id__sid_prefix2": [[1 + 4 * 2], [0 + 4 * 1], [0 + 4 * 1]],
        "history_item_ids__sid_l0": [[2, 3], [], [0, 0, 1]],
        "history_item_ids__sid_l1": [[0, 3], [], [1, 1, 2]],
        "history_item_ids__sid_l2": [[7, 0], [], [5, 6, 3]],
        "history_item_ids__sid_prefix2": [[2, 3 + 4 * 3], [], [4, 4, 1 + 4 * 2]],
    }
    assert {key: [row.tolist() for row in jt.to_dense()] for key, jt in out.to_dict().items()} == expected
    assert out.stride() == 3 and out.values().dtype == torch.long


def test_ngrams_are_exact_mixed_radix_ids_and_large_tokens_use_the_documented_hash() -> None:
    t = transform(ngram_orders=[2], prefix_lengths=[3], max_table_size=64)
    assert [(tok.suffix, tok.num_values, tok.num_buckets, tok.hashed) for tok in t.tokens] == [
        ("ngram2_l0", 16, 16, False), ("ngram2_l1", 32, 32, False), ("prefix3", 128, 64, True)]
    out = t(batch()).to_dict()
    items = [1, 2, 0, 4, 3]
    c = CODES[items]
    assert out["history_item_ids__sid_ngram2_l0"].values().tolist() == (c[:, 0] + 4 * c[:, 1]).tolist()
    assert out["history_item_ids__sid_ngram2_l1"].values().tolist() == (c[:, 1] + 4 * c[:, 2]).tolist()
    packed = (c[:, 0] + 4 * c[:, 1] + 16 * c[:, 2]).tolist()
    assert out["history_item_ids__sid_prefix3"].values().tolist() == [reference_hash(x, 64) for x in packed]


def test_hash_is_pinned_and_spreads_ids() -> None:
    ids = torch.tensor([0, 1, 57, 2**40 + 5, 2**62 + 12345])
    assert hash_packed_ids(ids, 1000).tolist() == [393, 870, 55, 973, 389]  # stable across versions
    assert hash_packed_ids(ids, 1000).tolist() == [reference_hash(x, 1000) for x in ids.tolist()]
    counts = torch.bincount(hash_packed_ids(torch.arange(64**3), 4096), minlength=4096)
    assert counts.min() >= 32 and counts.max() <= 96  # 64 ids per bucket on average


def test_zero_length_batch_gives_empty_token_features() -> None:
    empty = KeyedJaggedTensor.from_lengths_sync(keys=ITEM_FEATURES, values=torch.zeros(0, dtype=torch.long),
                                                lengths=torch.zeros(0, dtype=torch.int32))
    out = transform()(empty)  # (torchrec 1.8's own KJT.to_dict, hence an unsharded EBC, fails on stride 0)
    assert out.stride() == 0 and len(out.keys()) == 2 + 2 * 4
    assert out.values().numel() == 0 and out.lengths().numel() == 0 and out.length_per_key() == [0] * 10


def test_weights_are_carried_to_derived_tokens() -> None:
    weights = torch.arange(11, dtype=torch.float) / 10
    out = transform()(batch(weights)).to_dict()
    for derived in transform().derived_feature_names("history_item_ids"):
        torch.testing.assert_close(out[derived].weights(), weights[6:])
    torch.testing.assert_close(out["item_id__sid_l2"].weights(), weights[3:6])
    torch.testing.assert_close(out["user_id"].weights(), weights[:3])
    assert transform()(batch()).weights_or_none() is None


INT32_CASES = {"per_level_prefix": {}, "groups": {"ngram_groups": [2]}, "oov": {"unknown_ids": "oov"},
               "hashed_ngrams": {"ngram_orders": [2], "prefix_lengths": [3], "max_table_size": 64},
               "distinct": {"distinct_features": ["history_item_ids"]}}


@pytest.mark.parametrize("case", [*INT32_CASES, "spm"])
def test_int32_ids_and_lengths_give_int32_tokens_equal_to_the_int64_ones(case: str) -> None:
    if case == "spm":
        sids, pieces = spm_sids()
        t = SidFeatureTransform(sids, ITEM_FEATURES, ngram_orders=[1], spm=pieces)
    else:
        t = transform(**INT32_CASES[case])
    items = [3, 9, 1, -1, 0, 4, 3] if case == "oov" else [3, 0, 1, 2, 0, 4, 3]  # 9, -1: unknown

    def features(dtype: torch.dtype) -> KeyedJaggedTensor:
        return KeyedJaggedTensor.from_lengths_sync(keys=ITEM_FEATURES, values=torch.tensor(items, dtype=dtype),
                                                   lengths=torch.tensor([1, 1, 2, 3], dtype=dtype))

    wide, narrow = t(features(torch.int64)), t(features(torch.int32))
    assert narrow.values().dtype == narrow.lengths().dtype == narrow.offsets().dtype == torch.int32
    assert narrow.keys() == wide.keys() and len(wide.keys()) > len(ITEM_FEATURES)
    assert torch.equal(narrow.values().long(), wide.values()) and torch.equal(narrow.lengths().long(), wide.lengths())
    torch.manual_seed(0)
    ebc = EmbeddingBagCollection(tables=t.embedding_bag_configs(4))
    torch.testing.assert_close(ebc(narrow).values(), ebc(wide).values())


def test_int32_overflow_raises_naming_the_feature_and_the_limit() -> None:
    ids = torch.tensor([1], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"feature 'history_item_ids' has int32 item ids, but its largest row, "
                                         r"2147483648 \(2147483648 items \+ the OOV row\), exceeds the int32 limit "
                                         r"2147483647; pass int64 ids"):
        _item_ids(ids, "history_item_ids", 2**31, oov=True)
    assert _item_ids(ids, "history_item_ids", 2**31, oov=False).tolist() == [1]  # largest row 2^31 - 1 fits
    with pytest.raises(ValueError, match=r"tokens of feature 'history_item_ids' the output holds 2147483648 values, "
                                         r"past the int32 offsets limit 2147483647"):
        _check_offsets_fit(torch.int32, 2**31, "history_item_ids", "tokens")
    _check_offsets_fit(torch.int64, 2**31, "history_item_ids", "tokens")  # int64 offsets hold it


def test_gather_token_rows_fills_each_row_for_int64_and_int32_ids() -> None:
    item_tokens = torch.tensor([[5, 6, 7], [0, 1, 2]], dtype=torch.int32)
    for dtype in (torch.int64, torch.int32):  # int64: through the int32 scratch; int32: straight into the output
        out = torch.full((2, 4), -1, dtype=dtype)
        gather_token_rows(out, item_tokens, torch.tensor([2, 0, 0, 1], dtype=dtype))
        assert out.tolist() == [[7, 5, 5, 6], [2, 0, 0, 1]]


def test_token_plan_computes_contained_exact_tokens_from_one_gathered_row() -> None:
    sixty_four = [64, 64, 64]
    assert token_plan(sid_tokens(sixty_four, [], [1, 2, 3], 2**20), sixty_four, oov=False) == [
        [2, 2, 0, 64], [2, 2, 0, 4096], [-1, 0, 0, 0]]  # prefix1 = prefix3 & 63, prefix2 = prefix3 & 4095
    assert token_plan(sid_tokens(sixty_four, [1], [3], 2**20), sixty_four, oov=False)[1] == [3, 3, 6, 64]
    assert token_plan(sid_tokens([3, 5, 7], [1], [3], 2**20), [3, 5, 7], oov=False) == [
        [3, 4, 0, 3], [-1, 0, 0, 0], [-1, 0, 0, 0], [-1, 0, 0, 0]]  # l1, l2 would need a division: gathered
    assert all(step[0] == -1 for step in token_plan(sid_tokens(sixty_four, [1], [3], 2**20), sixty_four, oov=True))


@pytest.mark.parametrize(("cardinalities", "max_table_size"), [([64, 64, 64], 2**20), ([3, 5, 7], 2**20),
                                                               ([4, 4, 8], 64)])
def test_planned_tokens_equal_gathered_ones(cardinalities: list[int], max_table_size: int) -> None:
    """Masks, shifts and remainders of a gathered token give every other token's ids, hashed tokens included."""
    g = torch.Generator().manual_seed(0)
    codes = torch.stack([torch.randint(0, k, (40,), generator=g) for k in cardinalities], dim=1)
    t = SidFeatureTransform(SemanticIds(codes, cardinalities, "test", {}), ITEM_FEATURES, ngram_orders=[1, 2],
                            prefix_lengths=[2, 3], ngram_groups=[2], max_table_size=max_table_size)
    assert any(step[0] >= 0 for step in t.token_plan)
    for dtype in (torch.long, torch.int32):
        features = KeyedJaggedTensor.from_lengths_sync(
            keys=ITEM_FEATURES, values=torch.randint(0, 40, (30,), generator=g, dtype=dtype),
            lengths=torch.tensor([1, 1, 1, 12, 0, 15]))
        gathered = append_sid_tokens(features, t.item_tokens, t.feature_names, t.token_features, t.oov, distinct=[])
        assert torch.equal(t(features).values(), gathered.values()) and t(features).values().dtype == dtype


def test_configs_build_tables_for_the_derived_features() -> None:
    t = transform(prefix_lengths=[2, 3], max_table_size=100, unknown_ids="oov")
    configs = t.embedding_bag_configs(embedding_dim=8)
    assert [(c.name, c.num_embeddings, c.feature_names) for c in configs] == [
        ("sid_l0", 5, ["item_id__sid_l0", "history_item_ids__sid_l0"]),
        ("sid_l1", 5, ["item_id__sid_l1", "history_item_ids__sid_l1"]),
        ("sid_l2", 9, ["item_id__sid_l2", "history_item_ids__sid_l2"]),
        ("sid_prefix2", 17, ["item_id__sid_prefix2", "history_item_ids__sid_prefix2"]),
        ("sid_prefix3", 101, ["item_id__sid_prefix3", "history_item_ids__sid_prefix3"]),  # 128 hashed to 100
    ]
    pooled = EmbeddingBagCollection(tables=configs)(t(batch()))
    assert pooled.values().shape == (3, 10 * 8)
    sequence_configs = t.embedding_configs(embedding_dim=8, feature_names=["history_item_ids"])
    assert sequence_configs[0].feature_names == ["history_item_ids__sid_l0"]
    sequences = EmbeddingCollection(tables=sequence_configs)(t(batch()))
    assert sequences["history_item_ids__sid_prefix3"].lengths().tolist() == [2, 0, 3]
    assert sequences["history_item_ids__sid_prefix3"].values().shape == (5, 8)


def test_unknown_ids_map_to_the_oov_row_under_the_oov_policy() -> None:
    t = transform(unknown_ids="oov")
    features = KeyedJaggedTensor.from_lengths_sync(keys=["item_id", "history_item_ids"],
                                                   values=torch.tensor([5, 2, -1, 4]), lengths=torch.tensor([1, 3]))
    out = t(features).to_dict()
    assert out["item_id__sid_l2"].values().tolist() == [8]  # the OOV row is the last: index = 8 exact rows
    assert out["history_item_ids__sid_prefix2"].values().tolist() == [3 + 4 * 3, 16, 4]
    assert t.num_embeddings() == [5, 5, 9, 17]


@pytest.mark.parametrize(("bad_id", "where"), [(5, "item_id"), (-3, "history_item_ids"), (10**12, "item_id")])
def test_unknown_id_raises_with_feature_id_and_limit(bad_id: int, where: str) -> None:
    values = {"item_id": [1], "history_item_ids": [0, 2]}
    values[where][0] = bad_id
    features = KeyedJaggedTensor.from_lengths_sync(
        keys=ITEM_FEATURES, values=torch.tensor(values["item_id"] + values["history_item_ids"]),
        lengths=torch.tensor([1, 2]),
    )
    message = rf"feature '{where}' has item id {bad_id} outside \[0, 5\).*unknown_ids='oov'"
    with pytest.raises(ValueError, match=message):
        transform()(features)


def test_missing_item_feature_raises() -> None:
    features = KeyedJaggedTensor.from_lengths_sync(keys=["item_id"], values=torch.tensor([1]),
                                                   lengths=torch.tensor([1]))
    with pytest.raises(ValueError, match=r"item feature 'history_item_ids' is missing from the input; its keys are "
                                         r"\['item_id'\]"):
        transform()(features)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"num_levels": 4}, "num_levels=4 requested, the SID table has 3 levels"),
        ({"num_levels": 0}, "num_levels=0 requested, the SID table has 3 levels"),
        ({"ngram_orders": [4]}, r"ngram_orders must be distinct and in \[1, num_levels=3\], got \[4\]"),
        ({"num_levels": 2, "prefix_lengths": [3]}, r"prefix_lengths must be distinct and in \[1, num_levels=2\], "
                                                   r"got \[3\]"),
        ({"ngram_orders": [1, 1]}, r"ngram_orders must be distinct"),
        ({"ngram_orders": [], "prefix_lengths": []}, "no tokens requested"),
        ({"max_table_size": 0}, r"max_table_size must be in \[1, 2147483646\], got 0"),
        ({"unknown_ids": "ignore"}, "unknown_ids must be 'raise' or 'oov', got 'ignore'"),
    ],
)
def test_mismatched_artifact_and_config_raise_at_construction(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=f"SidFeatureTransform: {message}"):
        transform(**settings)


def test_bad_feature_lists_raise() -> None:
    with pytest.raises(ValueError, match=r"feature_names must be non-empty and distinct, got \['a', 'a'\]"):
        SidFeatureTransform(SIDS, ["a", "a"])
    with pytest.raises(ValueError, match=r"\['user_id'\] are not item features of this transform"):
        transform().embedding_bag_configs(8, feature_names=["user_id"])


class TokensToEmbeddings(nn.Module):
    def __init__(self, unknown_ids: str = "raise") -> None:
        super().__init__()
        self.transform = transform(prefix_lengths=[2, 3], max_table_size=64, unknown_ids=unknown_ids)
        torch.manual_seed(0)
        self.ebc = EmbeddingBagCollection(tables=self.transform.embedding_bag_configs(4))

    def forward(self, features: KeyedJaggedTensor) -> Tensor:
        return self.ebc(self.transform(features)).values()


def test_fx_traced_matches_eager() -> None:
    """The fx trace TorchRec's train pipeline takes of a model with the transform computes what the model does."""
    model = TokensToEmbeddings()
    torch.testing.assert_close(symbolic_trace(model)(batch()), model(batch()))


def test_export_with_dynamic_kjt_shapes_saves_and_reloads(tmp_path: Path) -> None:
    """torch.export (non-strict) with the KJT's values and lengths dynamic, saved and loaded: the reloaded program
    computes the model's output on another batch (other batch size and lengths, unknown ids to the OOV rows).
    Unknown-id checks are not exported (data-dependent), so ``unknown_ids="oov"``."""
    model, example = TokensToEmbeddings(unknown_ids="oov"), batch()
    shapes = ShapesCollection()
    shapes[example.values()] = {0: Dim.AUTO}
    shapes[example.lengths()] = {0: Dim.AUTO}
    exported = torch.export.export(model, (example,), dynamic_shapes=shapes.dynamic_shapes(model, (example,)),
                                   strict=False)
    torch.export.save(exported, tmp_path / "model.pt2")
    with torch.serialization.safe_globals([KeyedJaggedTensor]):  # the example input is saved with the program
        reloaded = torch.export.load(tmp_path / "model.pt2").module()
    other = KeyedJaggedTensor.from_lengths_sync(keys=["user_id", *ITEM_FEATURES],
                                                values=torch.tensor([10, 11, 2, 9, 4, 0, 1, 3, -1, 2]),
                                                lengths=torch.tensor([1, 1, 1, 1, 2, 4]))
    torch.testing.assert_close(reloaded(other), model(other))
    torch.testing.assert_close(reloaded(batch()), model(batch()))


def test_singh_non_overlapping_ngrams_group_levels_without_overlap() -> None:
    """Singh et al.'s Bigram-SID: 8 levels give 4 tables (sliding windows give 7); 3 levels give (c_0 c_1) + (c_2)."""
    eight = SemanticIds(torch.randint(0, 4, (6, 8), generator=torch.Generator().manual_seed(0)), [4] * 8, "test", {})
    singh = SidFeatureTransform(eight, ["item_id"], ngram_orders=[], ngram_groups=[2])
    sliding = SidFeatureTransform(eight, ["item_id"], ngram_orders=[2])
    assert singh.table_names() == ["sid_group2_l0", "sid_group2_l2", "sid_group2_l4", "sid_group2_l6"]
    assert len(sliding.table_names()) == 7 and singh.num_embeddings() == [16] * 4
    groups = SidFeatureTransform(SIDS, ITEM_FEATURES, ngram_orders=[], ngram_groups=[2])
    assert groups.table_names() == ["sid_group2_l0", "sid_group2_l2"] and groups.num_embeddings() == [16, 8]
    out = groups(batch())
    # item 3 -> (1, 2, 3): group (c_0 c_1) packs to 1 + 4 * 2 = 9, group (c_2) is 3
    assert out["item_id__sid_group2_l0"].values()[0] == 9 and out["item_id__sid_group2_l2"].values()[0] == 3
    assert out["history_item_ids__sid_group2_l0"].lengths().tolist() == [2, 0, 3]


def spm_sids() -> tuple[SemanticIds, object]:
    """40 items whose first two levels repeat in 4 patterns (so SentencePiece merges them), pieces of 24."""
    from torchrec_sid.sid.pieces import fit_sid_sentencepiece

    pytest.importorskip("sentencepiece")
    g = torch.Generator().manual_seed(0)
    patterns = torch.tensor([[0, 1], [2, 3], [1, 1], [3, 0]])
    codes = torch.cat([patterns[torch.arange(40) % 4], torch.randint(0, 8, (40, 1), generator=g)], dim=1)
    sids = SemanticIds(codes, [4, 4, 8], "test", {})
    return sids, fit_sid_sentencepiece(sids, vocab_size=24, seed=0)


def test_sentencepiece_tokens_are_each_items_pieces_with_a_fixed_vocabulary() -> None:
    """Singh et al.'s SPM-SID: each item's variable number of pieces, concatenated per example; deterministic."""
    from torchrec_sid.sid.pieces import fit_sid_sentencepiece

    sids, pieces = spm_sids()
    assert torch.equal(fit_sid_sentencepiece(sids, vocab_size=24, seed=0).pieces, pieces.pieces)
    counts = pieces.offsets[1:] - pieces.offsets[:-1]
    assert counts.min() >= 1 and counts.max() <= 3 and (counts < 3).any(), "frequent code runs become one piece"
    t = SidFeatureTransform(sids, ["item_id", "history_item_ids"], ngram_orders=[1], spm=pieces)
    assert t.table_names()[-1] == "sid_spm" and t.num_embeddings()[-1] == pieces.vocab_size
    features = KeyedJaggedTensor.from_lengths_sync(keys=["item_id", "history_item_ids"],
                                                   values=torch.tensor([3, 7, 5, 3, 9]),
                                                   lengths=torch.tensor([1, 1, 0, 3]))
    out = t(features).to_dict()
    item, history = out["item_id__sid_spm"], out["history_item_ids__sid_spm"]
    assert item.values().tolist() == pieces.item_pieces(3) + pieces.item_pieces(7)
    assert item.lengths().tolist() == [int(counts[3]), int(counts[7])]
    assert history.values().tolist() == pieces.item_pieces(5) + pieces.item_pieces(3) + pieces.item_pieces(9)
    assert history.lengths().tolist() == [0, int(counts[5] + counts[3] + counts[9])]
    ebc = EmbeddingBagCollection(tables=t.embedding_bag_configs(4))
    assert ebc(t(features)).values().shape == (2, 4 * 8)
    torch.testing.assert_close(symbolic_trace(t)(features).values(), t(features).values())


def test_sentencepiece_tokens_map_unknown_items_to_the_oov_piece() -> None:
    sids, pieces = spm_sids()
    t = SidFeatureTransform(sids, ["item_id"], ngram_orders=[1], spm=pieces, unknown_ids="oov")
    out = t(KeyedJaggedTensor.from_lengths_sync(keys=["item_id"], values=torch.tensor([99, 0]),
                                                lengths=torch.tensor([1, 1]))).to_dict()["item_id__sid_spm"]
    assert out.values().tolist() == [pieces.vocab_size, *pieces.item_pieces(0)]
    assert t.num_embeddings()[-1] == pieces.vocab_size + 1


def test_sentencepiece_tokens_export_with_a_dynamic_batch() -> None:
    """Pieces have a data-dependent count, yet the transform exports (non-strict) and runs another batch shape."""
    sids, pieces = spm_sids()

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.transform = SidFeatureTransform(sids, ITEM_FEATURES, ngram_orders=[1], spm=pieces, unknown_ids="oov")
            torch.manual_seed(0)
            self.ebc = EmbeddingBagCollection(tables=self.transform.embedding_bag_configs(4))

        def forward(self, features: KeyedJaggedTensor) -> Tensor:
            return self.ebc(self.transform(features)).values()

    model = Model()
    example = KeyedJaggedTensor.from_lengths_sync(keys=ITEM_FEATURES, values=torch.tensor([3, 7, 5, 3, 9]),
                                                  lengths=torch.tensor([1, 1, 0, 3]))
    shapes = ShapesCollection()
    shapes[example.values()] = {0: Dim.AUTO}
    shapes[example.lengths()] = {0: Dim.AUTO}
    program = torch.export.export(model, (example,), dynamic_shapes=shapes.dynamic_shapes(model, (example,)),
                                  strict=False)
    other = KeyedJaggedTensor.from_lengths_sync(keys=ITEM_FEATURES, values=torch.tensor([1, 2, 8, 5, 3, 9, 0, 99]),
                                                lengths=torch.tensor([1, 1, 1, 2, 3, 0]))
    torch.testing.assert_close(program.module()(other), model(other))
