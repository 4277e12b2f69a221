"""SIDs as input features: per-level SID code features of a KJT -> the token features of
:class:`~torchrec_sid.modules.SidFeatureTransform`, by arithmetic alone.

:class:`SidFeatureTransform` looks every item's tokens up in a buffer ``item_tokens: [T, N (+1)]`` (int32) that
every rank holds whole: :func:`lookup_table_bytes` ``= 4 * T * (N + 1)`` bytes per rank (10^8 items, 6 token
types: 2.4 GB; an item added after construction is unknown until the model is rebuilt). Here the batch carries each
item's codes instead, one feature per level (``<feature>__code<l>``, :func:`~torchrec_sid.sid.features.
code_feature_names`, filled by the data pipeline from a SID table or the newest version of a
:class:`~torchrec_sid.sid.versions.SidStore`), and the tokens are packed (and hashed) from them in ``forward``:
the module holds no per-item state, so model memory per rank does not grow with the catalogue, and a new item's
codes reach the model with the next batch.

Same token types, names, table layout and ids as :class:`SidFeatureTransform` (:func:`sid_tokens`,
:func:`hash_packed_ids`): for a batch whose code features are the lookup of its item ids, the output KJT is the one
:class:`SidFeatureTransform` gives for the batch without them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchrec.pt2.checks import is_pt2_compiling
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_sid.modules.sid_transform import (
    SidTableLayout,
    SidToken,
    UnknownIdPolicy,
    check_token_settings,
    checked_distinct_features,
    hash_packed_ids,
    sid_tokens,
)
from torchrec_sid.sid import SemanticIds
from torchrec_sid.sid.features import code_feature_names


def lookup_table_bytes(num_items: int, num_token_types: int, oov: bool = False) -> int:
    """Bytes per rank of :class:`SidFeatureTransform`'s replicated ``item_tokens`` buffer: ``4 * T * (N + oov)``.

    Example::

        lookup_table_bytes(10**8, 6)  # 2_400_000_000: use SidCodeTransform (codes as features) at this size
    """
    return 4 * num_token_types * (num_items + int(oov))


def _token_ids(codes: Tensor, cardinalities: list[int], token: SidToken, oov: bool, feature: str) -> Tensor:
    """Token ids ``[n]`` of ``codes: [n, levels]`` (mixed-radix packing, first level least significant; hashed when
    the token is); a row with a code outside its level's range is unknown: the OOV row, or a ValueError."""
    part = codes[:, token.first_level:token.last_level]
    radices = cardinalities[token.first_level:token.last_level]
    packed = part.new_zeros(part.shape[0])
    weight = 1
    for level, radix in enumerate(radices):
        packed = packed + part[:, level] * weight
        weight *= radix
    ids = hash_packed_ids(packed.clamp(min=0), token.num_buckets) if token.hashed else packed
    unknown = (part < 0).any(1)
    for level, radix in enumerate(radices):
        unknown = unknown | (part[:, level] >= radix)
    if oov:
        return ids.masked_fill(unknown, token.num_buckets)
    if (not torch.jit.is_scripting() and is_pt2_compiling()) or part.numel() == 0:
        return ids
    if bool(unknown.any()):
        row = int(unknown.nonzero()[0])
        raise ValueError(f"SidCodeTransform: feature '{feature}' has codes {part[row].tolist()} at levels "
                         f"[{token.first_level}, {token.last_level}), outside the cardinalities {radices} (-1: an "
                         f"item no SID table version holds; {int(unknown.sum())} such values in this batch); pass "
                         f"unknown_ids='oov' to map them to a reserved row")
    return ids


def distinct_events(ids: Tensor) -> tuple[Tensor, Tensor]:
    """``ids: [n]`` -> ``(distinct [U] sorted, first [U])``: each distinct value once (``torch.unique``) and the
    position of its first occurrence (``ids[first] == distinct``).

    Example::

        distinct_events(torch.tensor([4, 2, 4, 7]))  # (tensor([2, 4, 7]), tensor([1, 0, 3]))
    """
    distinct, inverse = torch.unique(ids, return_inverse=True)
    positions = torch.arange(ids.numel(), device=ids.device)
    first = positions.new_full((distinct.numel(),), ids.numel()).scatter_reduce_(0, inverse, positions, "amin")
    return distinct, first


@torch.fx.wrap
def codes_to_sid_tokens(features: KeyedJaggedTensor, item_features: list[str], code_features: list[list[str]],
                        token_features: list[list[str]], tokens: list[SidToken], cardinalities: list[int],
                        oov: bool, distinct: list[str] | None = None) -> KeyedJaggedTensor:
    """``features`` without the code features of ``item_features`` (all levels, read or not), plus one feature per
    token type and item feature (the layout of
    :func:`~torchrec_sid.modules.sid_transform.append_sid_tokens`). An fx leaf (data-dependent splits).

    Each item feature of ``distinct`` is reduced to its distinct ids, sorted, all in the first example (lengths
    ``[U, 0, ..., 0]``, as :func:`~torchrec_sid.modules.sid_transform.distinct_values`), and its tokens are those of
    the first event of each item (an item's codes are the same at all its events: one lookup filled them); the
    output then carries no weights.
    """
    if features.variable_stride_per_key():
        raise ValueError("SidCodeTransform: variable-batch (VBE) KeyedJaggedTensors are not supported")
    keys = features.keys()
    for feature, names in zip(item_features, code_features):
        missing = [name for name in [feature, *names] if name not in keys]
        if missing:
            raise ValueError(f"SidCodeTransform: features {missing} are missing from the input (the data pipeline "
                             f"adds the code features of '{feature}'); its keys are {keys}")
    prefixes = [f"{feature}__code" for feature in item_features]  # every level's, read or not
    kept = [k for k, key in enumerate(keys)
            if not any(key.startswith(p) and key[len(p):].isdigit() for p in prefixes)]
    values, lengths, weights = features.values(), features.lengths(), features.weights_or_none()
    stride = features.stride()
    per_key_values = list(values.split(features.length_per_key()))
    per_key_lengths = list(lengths.view(len(keys), stride).unbind(0))
    length_per_key = list(features.length_per_key())
    first_events: dict[int, Tensor] = {}
    for feature in distinct or []:
        if feature not in item_features:
            raise ValueError(f"SidCodeTransform: distinct feature '{feature}' is not one of the item features "
                             f"{item_features}")
        k = keys.index(feature)
        per_key_values[k], first_events[k] = distinct_events(per_key_values[k])
        per_key_lengths[k] = per_key_lengths[k].new_zeros(stride)
        per_key_lengths[k][:1] = per_key_values[k].numel()
        length_per_key[k] = per_key_values[k].numel()
    out_values = [per_key_values[k] for k in kept]
    out_lengths = [per_key_lengths[k] for k in kept]
    out_length_per_key = [length_per_key[k] for k in kept]
    sources = [keys.index(feature) for feature in item_features]
    for feature, names, k in zip(item_features, code_features, sources):
        codes = torch.stack([per_key_values[keys.index(name)] for name in names], 1)  # [n, levels]
        if k in first_events:
            codes = codes.index_select(0, first_events[k])  # [U, levels]
        for token in tokens:
            out_values.append(_token_ids(codes, cardinalities, token, oov, feature).to(values.dtype))
            out_lengths.append(per_key_lengths[k])
            out_length_per_key.append(length_per_key[k])
    out_weights: Tensor | None = None
    if weights is not None and not first_events:
        per_key_weights = weights.split(length_per_key)
        out_weights = torch.cat([per_key_weights[k] for k in kept]
                                + [per_key_weights[k] for k in sources for _ in tokens])
    out_keys = [keys[k] for k in kept] + [name for names in token_features for name in names]
    return KeyedJaggedTensor(keys=out_keys, values=torch.cat(out_values), weights=out_weights,
                             lengths=torch.cat(out_lengths), stride=stride, length_per_key=out_length_per_key)


class SidCodeTransform(SidTableLayout, nn.Module):
    """Turns per-level SID code features into SID token features, holding no per-item state.

    For each item feature ``f`` the input KJT carries ``f`` and its code features ``f__code0 .. f__code{n-1}``
    (same lengths, one code per item; ``-1`` for an item no SID table holds). The output drops the code features and
    appends ``f__<name>_<suffix>`` per token type, exactly as :class:`SidFeatureTransform` (same tokens, tables and
    ids). Memory: a few Python lists, whatever the catalogue size.

    Args:
        cardinalities: codes per level of the SID table (its suffix capacity included), ``[levels]``.
        feature_names, ngram_orders, prefix_lengths, num_levels, max_table_size, unknown_ids, name, ngram_groups:
            as :class:`SidFeatureTransform`; ``unknown_ids="oov"`` maps ``-1`` codes (unknown items) to the OOV
            row, ``"raise"`` raises a ValueError naming the feature.
        distinct_features: item features (of ``feature_names``) whose output holds only their distinct ids, sorted,
            in the first example, and the tokens of those (as :class:`SidFeatureTransform`'s): a batch's histories
            then cost one lookup per distinct item, gathered back to the events by the reader
            (:class:`~torchrec_sid.models.ItemArch`).

    Example::

        # item 3 -> codes (1, 2, 3); history items 0 -> (0, 1, 5), 2 -> (3, 3, 0)
        features = KeyedJaggedTensor.from_lengths_sync(
            keys=["item_id", "history_item_ids", "item_id__code0", "item_id__code1", "item_id__code2",
                  "history_item_ids__code0", "history_item_ids__code1", "history_item_ids__code2"],
            values=torch.tensor([3, 0, 2, 1, 2, 3, 0, 3, 1, 3, 5, 0]),
            lengths=torch.tensor([1, 2, 1, 1, 1, 2, 2, 2]),  # B = 1
        )
        transform = SidCodeTransform([4, 4, 8], ["item_id", "history_item_ids"], prefix_lengths=[2])
        out = transform(features)  # keys: item_id, history_item_ids, item_id__sid_l0, ..., ..._sid_prefix2
        # out["item_id__sid_prefix2"]: [[1 + 4 * 2]]; out["history_item_ids__sid_l0"]: [[0, 3]]
    """

    def __init__(
        self,
        cardinalities: Sequence[int],
        feature_names: Sequence[str],
        ngram_orders: Sequence[int] = (1,),
        prefix_lengths: Sequence[int] = (),
        num_levels: int | None = None,
        max_table_size: int = 2**20,
        unknown_ids: UnknownIdPolicy = "raise",
        name: str = "sid",
        ngram_groups: Sequence[int] = (),
        distinct_features: Sequence[str] = (),
    ) -> None:
        super().__init__()
        num_levels = len(cardinalities) if num_levels is None else num_levels
        check_token_settings("SidCodeTransform", cardinalities, feature_names, num_levels, ngram_orders,
                             prefix_lengths, max_table_size, unknown_ids, ngram_groups)
        self.cardinalities: list[int] = list(cardinalities[:num_levels])
        self.feature_names: list[str] = list(feature_names)
        self.name = name
        self.oov = unknown_ids == "oov"
        self.tokens = sid_tokens(self.cardinalities, ngram_orders, prefix_lengths, max_table_size, ngram_groups)
        self.code_features: list[list[str]] = [code_feature_names(f, num_levels) for f in self.feature_names]
        self.token_features: list[list[str]] = [self.derived_feature_names(f) for f in self.feature_names]
        self.distinct_features: list[str] = checked_distinct_features("SidCodeTransform", distinct_features,
                                                                      self.feature_names)

    @classmethod
    def from_semantic_ids(cls, semantic_ids: SemanticIds, feature_names: Sequence[str],
                          **settings: object) -> SidCodeTransform:
        """The transform for a SID table's cardinalities (its codes are not kept)."""
        return cls(semantic_ids.cardinalities, feature_names, **settings)  # type: ignore[arg-type]

    @property
    def num_levels(self) -> int:
        """Code levels read (code features per item feature)."""
        return len(self.cardinalities)

    def derived_feature_names(self, feature: str) -> list[str]:
        """Names of the features derived from item feature ``feature``, in output order."""
        return [f"{feature}__{self.name}_{token.suffix}" for token in self.tokens]

    def table_names(self) -> list[str]:
        """One table per token type: ``<name>_<suffix>``."""
        return [f"{self.name}_{token.suffix}" for token in self.tokens]

    def num_embeddings(self) -> list[int]:
        """Rows per token table: the exact vocabulary or the hash size, plus the OOV row under ``"oov"``."""
        return [token.num_buckets + int(self.oov) for token in self.tokens]

    def state_bytes(self) -> int:
        """Bytes of tensors this module holds: 0, whatever the catalogue size (see :func:`lookup_table_bytes`)."""
        return sum(t.numel() * t.element_size() for t in [*self.parameters(), *self.buffers()])

    def forward(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """``features`` (B examples, with the code features) -> without them (``distinct_features`` reduced to their
        distinct ids), plus the token features."""
        return codes_to_sid_tokens(features, self.feature_names, self.code_features, self.token_features,
                                   self.tokens, self.cardinalities, self.oov, self.distinct_features)

