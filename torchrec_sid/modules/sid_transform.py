"""SID feature transform: item-id features of a KeyedJaggedTensor → semantic-ID token features for EBC / EC tables.

Token types (``papers/sid_ngrams.md``), for an item whose SID is ``(c_0, ..., c_{n-1})``, ``c_l`` in ``[0, K_l)``:

================================== ========================== =========================== ==========================
output feature                     levels combined            exact vocabulary            setting (source)
================================== ========================== =========================== ==========================
``<feature>__sid_l{l}``            ``c_l``                    ``K_l``                     ``ngram_orders`` 1 (Singh)
``<feature>__sid_group{m}_l{l}``   ``c_l ... c_{l+m-1}``,     ``K_l * ... * K_{l+m-1}``   ``ngram_groups`` (Singh's
                                   ``l = 0, m, 2m, ...``                                  non-overlapping n-grams)
``<feature>__sid_ngram{m}_l{l}``   ``c_l ... c_{l+m-1}``,     ``K_l * ... * K_{l+m-1}``   ``ngram_orders`` (Zheng's
                                   every ``l``                                            sliding "all n-grams")
``<feature>__sid_prefix{p}``       ``c_0 ... c_{p-1}``        ``K_0 * ... * K_{p-1}``     ``prefix_lengths`` (Zheng)
================================== ========================== =========================== ==========================

``<feature>__sid_spm`` (``spm``: Singh et al.'s SPM-SID) holds an item's SentencePiece pieces
(:func:`~torchrec_sid.sid.pieces.fit_sid_sentencepiece`), a variable number per item: its lengths are the number of
pieces of the example's items (for a history, summed over the events), so it feeds a pooled (bag) table; its
vocabulary is the piece table's, fixed when the transform is built.

Singh et al.'s Bigram-SID is ``ngram_groups=[2]``: 8 levels give 4 tables ``(c_0 c_1), (c_2 c_3), ...``; sliding
windows (``ngram_orders=[2]``) give 7. With ``n`` not a multiple of ``m`` the last group holds the ``n mod m``
remaining levels (the notes' "c_1c_2 + c_3" for 3 levels).

(``sid`` is the transform's ``name``.) A token's exact id packs its digits in mixed radix (first level least
significant, as :func:`~torchrec_sid.sid.packing.pack_codes`). When the exact vocabulary exceeds
``max_table_size`` the exact id is hashed into ``max_table_size`` rows with :func:`hash_packed_ids`. Under the
``"oov"`` policy every table gets one more row, its last, that unknown item ids map to.

Every token of every item is computed once, at construction, into the buffer ``item_tokens: [T, N (+1)]`` (int32);
``forward`` gathers, per item feature, the rows of the tokens no other token holds (:func:`token_plan`) and computes
the others from those by a mask, a shift or a remainder (prefixes ``[1, 2, 3]``: one gather, two masks), straight
into the output values (:func:`gather_token_rows`).

Item ids may be int64 or int32 (TorchRec's EBC / EC and fbgemm's TBE take int32 indices and offsets): the output
keeps the input's values and lengths dtypes for every token type, the SPM pieces, ``distinct_features`` and the
OOV row, so int32 ids give int32 tokens (every table has at most :data:`MAX_TABLE_SIZE` rows plus the OOV row: token
ids fit int32) and an output half the bytes, which the transform writes straight from ``item_tokens``, with no
conversion (:class:`~torchrec_sid.data.batches.CtrBatches` emits int32 ids with ``index_dtype=torch.int32``). int32
ids raise a ValueError naming the feature when the catalogue's largest row (the OOV row included) exceeds int32, and
int32 lengths when the output's offsets would.

The output values are a fresh tensor every call (``[T * B * L]``: 131 MB for 4,096 histories of 1,000 events, 3 tokens,
int64). With 4 kB pages most of the transform's time there is the kernel's page faults; PyTorch's
``THP_MEM_ALLOC_ENABLE=1`` (which the ``torchrec-sid`` command sets) backs such allocations with huge pages
(``benchmarks/sid_modules.py``, L = 1,000, int64 ids: 17% of the EBC lookup it feeds with 4 kB pages, 7% with huge
pages).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig, PoolingType
from torchrec.pt2.checks import is_pt2_compiling
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_sid.sid import SemanticIds
from torchrec_sid.sid.packing import MAX_PACKED, pack_codes
from torchrec_sid.sid.pieces import SidPieces

UnknownIdPolicy = Literal["raise", "oov"]
HASH_PRIME = 2**31 - 1  # Mersenne prime; hashed ids live in [0, HASH_PRIME)
HASH_MULTIPLIERS = (0x5BD1E995, 0x27D4EB2F)  # for the low and high 31-bit limbs of the packed id
HASH_OFFSET = 0x165667B1
MAX_TABLE_SIZE = 2**31 - 2  # rows (plus the OOV row) must fit int32 and the hash range


def hash_packed_ids(packed: Tensor, num_buckets: int) -> Tensor:
    """Stable hash of exact packed token ids ``[...]`` (int64, ``>= 0``) into ``[0, num_buckets)``.

    ``h(x) = ((a_lo * (x mod 2^31) + a_hi * ((x >> 31) mod p) + c) mod p) mod num_buckets`` with ``p = 2^31 - 1``
    and the constants :data:`HASH_MULTIPLIERS`, :data:`HASH_OFFSET`: a fixed Carter-Wegman hash over the two
    31-bit limbs of ``x``, exact in int64 arithmetic (no product exceeds 2^62), the same on every machine, process
    and version (unlike Python's ``hash``).
    """
    if not 1 <= num_buckets <= HASH_PRIME:
        raise ValueError(f"num_buckets must be in [1, {HASH_PRIME}], got {num_buckets}")
    packed = packed.long()
    low, high = packed % 2**31, (packed >> 31) % HASH_PRIME
    mixed = (HASH_MULTIPLIERS[0] * low) % HASH_PRIME + (HASH_MULTIPLIERS[1] * high) % HASH_PRIME + HASH_OFFSET
    return (mixed % HASH_PRIME) % num_buckets


@dataclass(frozen=True)
class SidToken:
    """One token type: the SID levels ``[first_level, last_level)`` combined into one id.

    Args:
        suffix: name part after ``<feature>__<name>_``: ``l0``, ``ngram2_l1``, ``prefix3``.
        first_level, last_level: the levels combined (``last_level`` exclusive).
        num_values: exact vocabulary, the product of the levels' cardinalities.
        num_buckets: table rows for known items: ``num_values`` if it fits ``max_table_size``, else that size.
    """

    suffix: str
    first_level: int
    last_level: int
    num_values: int
    num_buckets: int

    @property
    def hashed(self) -> bool:
        return self.num_values > self.num_buckets


def checked_distinct_features(owner: str, distinct_features: Sequence[str], feature_names: Sequence[str]) -> list[str]:
    """``distinct_features`` as a list, or a ValueError naming ``owner`` when one is not among ``feature_names``."""
    if not set(distinct_features) <= set(feature_names):
        raise ValueError(f"{owner}: distinct_features {list(distinct_features)} must be among feature_names "
                         f"{list(feature_names)}")
    return list(distinct_features)


def check_token_settings(owner: str, cardinalities: Sequence[int], feature_names: Sequence[str], num_levels: int,
                         ngram_orders: Sequence[int], prefix_lengths: Sequence[int], max_table_size: int,
                         unknown_ids: str, ngram_groups: Sequence[int] = ()) -> None:
    """Raises ValueError, naming ``owner`` (the transform), the setting and the limit, on a token configuration a SID
    table with per-level ``cardinalities`` cannot serve."""
    if not feature_names or len(set(feature_names)) != len(feature_names):
        raise ValueError(f"{owner}: feature_names must be non-empty and distinct, got {list(feature_names)}")
    if not cardinalities or any(k < 1 for k in cardinalities):
        raise ValueError(f"{owner}: cardinalities must be >= 1, got {list(cardinalities)}")
    if not 1 <= num_levels <= len(cardinalities):
        raise ValueError(f"{owner}: num_levels={num_levels} requested, the SID table has {len(cardinalities)} levels")
    for setting, values in (("ngram_orders", ngram_orders), ("prefix_lengths", prefix_lengths),
                            ("ngram_groups", ngram_groups)):
        if len(set(values)) != len(values) or any(not 1 <= v <= num_levels for v in values):
            raise ValueError(f"{owner}: {setting} must be distinct and in [1, num_levels={num_levels}], "
                             f"got {list(values)}")
    if not ngram_orders and not prefix_lengths and not ngram_groups:
        raise ValueError(f"{owner}: no tokens requested: ngram_orders, ngram_groups and prefix_lengths are all empty")
    if not 1 <= max_table_size <= MAX_TABLE_SIZE:
        raise ValueError(f"{owner}: max_table_size must be in [1, {MAX_TABLE_SIZE}], got {max_table_size}")
    if unknown_ids not in ("raise", "oov"):
        raise ValueError(f"{owner}: unknown_ids must be 'raise' or 'oov', got {unknown_ids!r}")


def sid_tokens(cardinalities: Sequence[int], ngram_orders: Sequence[int], prefix_lengths: Sequence[int],
               max_table_size: int, ngram_groups: Sequence[int] = ()) -> list[SidToken]:
    """The token types: every window of each n-gram order (order 1: per-level tokens), then the non-overlapping
    groups of each ``ngram_groups`` order, then each prefix."""
    n = len(cardinalities)
    spans = [(f"l{first}" if order == 1 else f"ngram{order}_l{first}", first, first + order)
             for order in ngram_orders for first in range(n - order + 1)]
    spans += [(f"group{order}_l{first}", first, min(first + order, n))
              for order in ngram_groups for first in range(0, n, order)]
    spans += [(f"prefix{length}", 0, length) for length in prefix_lengths]
    tokens = []
    for suffix, first, last in spans:
        num_values = math.prod(cardinalities[first:last])
        if num_values - 1 > MAX_PACKED:
            raise ValueError(f"SidFeatureTransform: token {suffix} spans {num_values} values "
                             f"(cardinalities {list(cardinalities[first:last])}), more than int64 packs")
        tokens.append(SidToken(suffix, first, last, num_values, min(num_values, max_table_size)))
    return tokens


def item_token_table(codes: Tensor, cardinalities: Sequence[int], tokens: Sequence[SidToken], oov: bool) -> Tensor:
    """``codes: [N, levels]`` → ``[T, N (+1 OOV column)]`` int32: row t holds every item's token ``tokens[t]``."""
    rows = []
    for token in tokens:
        packed = pack_codes(codes[:, token.first_level:token.last_level],
                            cardinalities[token.first_level:token.last_level])
        ids = hash_packed_ids(packed, token.num_buckets) if token.hashed else packed
        if oov:
            ids = torch.cat([ids, torch.tensor([token.num_buckets])])
        rows.append(ids)
    return torch.stack(rows).int()


TOKEN_STEPS = ("gather", "copy", "mask", "shift_mask", "remainder")  # plan kinds 0..4 (:func:`token_plan`)


def _is_power_of_two(x: int) -> bool:
    return x & (x - 1) == 0


def _derivation(source: SidToken, token: SidToken, cardinalities: Sequence[int]) -> list[int] | None:
    """``[kind, shift, modulus]`` computing ``token`` from the exact token ``source`` whose levels hold its levels, or
    None where that costs as much as a gather (a division by a non power of two)."""
    first, last = token.first_level, token.last_level
    divisor, modulus = math.prod(cardinalities[source.first_level:first]), math.prod(cardinalities[first:last])
    if (first, last) == (source.first_level, source.last_level):
        return [1, 0, modulus]
    if divisor == 1 and _is_power_of_two(modulus):
        return [2, 0, modulus]
    if _is_power_of_two(divisor) and _is_power_of_two(modulus):
        return [3, divisor.bit_length() - 1, modulus]
    if divisor == 1:
        return [4, 0, modulus]
    return None


def token_plan(tokens: Sequence[SidToken], cardinalities: Sequence[int], oov: bool) -> list[list[int]]:
    """How ``forward`` fills each token row: ``[source, kind, shift, modulus]`` per token (kinds: :data:`TOKEN_STEPS`).

    ``source = -1``: gathered from ``item_tokens`` (kind 0). Otherwise computed from the gathered token ``source``, an
    exact token (not hashed) whose levels ``[a, b)`` hold this token's ``[f, l)``: its id ``P`` packs those levels in
    mixed radix, so this token is ``(P // prod(K[a:f])) % prod(K[f:l])``, by a copy (same levels), a mask, a shift and
    a mask (powers of two) or a remainder (``f = a``): cheaper than a random gather (prefixes ``[1, 2, 3]`` of 64-way
    levels: one gather and two masks). Under ``"oov"`` every token is gathered: the OOV column is no digit string.

    Example::

        token_plan(sid_tokens([64, 64, 64], [1], [2, 3], 2**20), [64, 64, 64], oov=False)
        # tokens l0, l1, l2, prefix2, prefix3; prefix3 is gathered, the others computed from it:
        # [[4, 2, 0, 64], [4, 3, 6, 64], [4, 3, 12, 64], [4, 2, 0, 4096], [-1, 0, 0, 0]]
        # l0 = prefix3 & 63, l1 = (prefix3 >> 6) & 63, l2 = (prefix3 >> 12) & 63, prefix2 = prefix3 & 4095
    """
    plan = [[-1, 0, 0, 0] for _ in tokens]
    if oov:
        return plan
    spans = [(token.first_level, token.last_level) for token in tokens]

    def holds(s: int, t: int) -> bool:
        return spans[s][0] <= spans[t][0] and spans[t][1] <= spans[s][1]

    exact = [t for t, token in enumerate(tokens) if not token.hashed]
    roots = [s for s in exact if not any(u != s and holds(u, s) and (spans[u] != spans[s] or u < s) for u in exact)]
    for t in exact:
        if t in roots:
            continue
        steps = [(step, s) for s in roots if holds(s, t)
                 for step in [_derivation(tokens[s], tokens[t], cardinalities)] if step is not None]
        if steps:
            step, source = min(steps)  # the cheapest kind
            plan[t] = [source, *step]
    return plan


def _item_ids(ids: Tensor, feature: str, num_items: int, oov: bool) -> Tensor:
    """``ids: [n]`` with unknown ids (negative or ``>= num_items``) mapped to the OOV column, or a ValueError."""
    if ids.dtype != torch.int64 and ids.dtype != torch.int32:
        raise ValueError(f"SidFeatureTransform: feature '{feature}' has {ids.dtype} ids; item ids must be int64 or "
                         f"int32 (KeyedJaggedTensor values)")
    if ids.dtype == torch.int32 and num_items - 1 + int(oov) > 2147483647:
        oov_row = " + the OOV row" if oov else ""
        raise ValueError(f"SidFeatureTransform: feature '{feature}' has int32 item ids, but its largest row, "
                         f"{num_items - 1 + int(oov)} ({num_items} items{oov_row}), exceeds the int32 limit "
                         "2147483647; pass int64 ids")
    if oov:
        return ids.masked_fill((ids < 0) | (ids >= num_items), num_items)
    if (not torch.jit.is_scripting() and is_pt2_compiling()) or ids.numel() == 0:  # no data-dependent checks
        return ids
    low, high = torch.aminmax(ids)
    if int(low) < 0 or int(high) >= num_items:
        unknown = ids[(ids < 0) | (ids >= num_items)]
        raise ValueError(f"SidFeatureTransform: feature '{feature}' has item id {int(unknown[0])} outside "
                         f"[0, {num_items}), the items of the SemanticIds artifact ({unknown.numel()} unknown ids "
                         f"in this batch); pass unknown_ids='oov' to map unknown ids to a reserved row")
    return ids


def gather_pieces(ids: Tensor, lengths: Tensor, piece_offsets: Tensor, piece_values: Tensor) -> tuple[Tensor, Tensor]:
    """The pieces of items ``ids: [n]`` (rows, OOV included) concatenated, and per example (``lengths: [B]`` items
    each) the number of pieces: ``(values [sum pieces], lengths [B])``, of the dtypes of ``ids`` and ``lengths``."""
    starts = piece_offsets.index_select(0, ids)
    counts = piece_offsets.index_select(0, ids + 1) - starts
    ends = counts.cumsum(0)
    owner = torch.repeat_interleave(torch.arange(ids.numel(), device=ids.device), counts)  # [sum pieces]
    within = torch.arange(owner.numel(), device=ids.device) - (ends - counts).index_select(0, owner)
    values = piece_values.index_select(0, starts.index_select(0, owner) + within).to(ids.dtype)
    item_ends = torch.cat([ends.new_zeros(1), ends])
    boundaries = lengths.cumsum(0)
    piece_lengths = item_ends.index_select(0, boundaries) - item_ends.index_select(0, boundaries - lengths)
    return values, piece_lengths.to(lengths.dtype)


def distinct_values(features: KeyedJaggedTensor, distinct: list[str] | None) -> KeyedJaggedTensor:
    """``features`` with each feature of ``distinct`` replaced by its distinct values, sorted (``torch.unique``),
    all in the first example: lengths ``[U, 0, ..., 0]``. Other features keep their values and lengths.

    A batch's histories repeat items heavily (B x L events, a few thousand distinct items): their lookups shrink
    to one per distinct item, and ``torch.unique(values, return_inverse=True)[1]`` of the original values gathers
    the rows back to the events. Weights are dropped (sequence tables ignore them).

    Example::

        # history_item_ids: [[4, 2, 4], [2]] -> [[2, 4], []]
    """
    if distinct is None or len(distinct) == 0:
        return features
    keys, stride = features.keys(), features.stride()
    unknown: list[str] = []
    for feature in distinct:  # a plain loop: TorchScript has neither sets of str nor comprehension ifs
        if feature not in keys:
            unknown.append(feature)
    if len(unknown) > 0:
        raise ValueError(f"SidFeatureTransform: distinct feature(s) {unknown} are missing from the input; its keys "
                         f"are {keys}")
    per_key_values = list(features.values().split(features.length_per_key()))
    per_key_lengths = list(features.lengths().split([stride] * len(keys)))
    for feature in distinct:
        k = keys.index(feature)
        per_key_values[k] = torch.unique(per_key_values[k])
        lengths = per_key_lengths[k].new_zeros(stride)
        lengths[:1] = per_key_values[k].numel()
        per_key_lengths[k] = lengths
    return KeyedJaggedTensor(keys=keys, values=torch.cat(per_key_values), lengths=torch.cat(per_key_lengths),
                             stride=stride, length_per_key=[v.numel() for v in per_key_values])


def derive_token(out: Tensor, source: Tensor, step: list[int]) -> None:
    """``out: [n]`` = the token of plan entry ``step`` (:func:`token_plan`) computed from its source's ids
    ``source: [n]`` (of ``out``'s dtype: no temporary tensor)."""
    kind, shift, modulus = step[1], step[2], step[3]
    if kind == 1:
        out.copy_(source)
    elif kind == 2:
        torch.bitwise_and(source, modulus - 1, out=out)
    elif kind == 3:
        torch.bitwise_right_shift(source, shift, out=out).bitwise_and_(modulus - 1)
    else:
        torch.remainder(source, modulus, out=out)


def gather_token_rows(out: Tensor, item_tokens: Tensor, ids: Tensor, plan: list[list[int]] | None = None) -> None:
    """Writes ``out[t, j] = item_tokens[t, ids[j]]`` into ``out: [T, n]`` (a block of the output values), for item
    rows ``ids: [n]``: one 1-D gather per token row (faster than one over ``[T, N]``'s columns), or, per ``plan``
    (:func:`token_plan`; None: gather every row), a mask or shift of a gathered row.

    ``ids`` are read as int32 (converted once when int64: the CPU gather is faster with int32 indices). Rows of
    ``out``'s dtype (int32 item ids) are gathered straight into it; into an int64 ``out`` a row is gathered into one
    int32 scratch ``[n]``, shared by the T rows, then converted into its row of ``out``. Derived rows are computed
    from their source's row of ``out``.

    Example::

        # item_tokens [[5, 6, 7], [0, 1, 2]], ids [2, 0] -> out [[7, 5], [2, 0]]
    """
    rows = item_tokens.unbind(0)
    if ids.dtype == torch.int64 and item_tokens.size(1) <= 2147483647:  # int32 indices reach every item
        ids = ids.int()
    direct = out.dtype == item_tokens.dtype
    scratch = item_tokens.new_empty(0 if direct else ids.numel())
    for t in range(len(rows)):
        if plan is not None and plan[t][0] >= 0:
            continue  # derived from its source below
        if direct:
            torch.index_select(rows[t], 0, ids, out=out[t])
        else:
            out[t].copy_(torch.index_select(rows[t], 0, ids, out=scratch))
        if plan is not None:
            for d in range(len(rows)):
                if plan[d][0] == t:
                    derive_token(out[d], out[t], plan[d])


def _check_offsets_fit(lengths_dtype: torch.dtype, num_values: int, feature: str, what: str) -> None:
    """Raises ValueError when an output of ``num_values`` values, after ``feature``'s ``what``, has offsets past
    int32 with int32 lengths (a KJT's offsets take its lengths' dtype). Skipped under torch.export / compile, where
    ``num_values`` is data-dependent."""
    if not torch.jit.is_scripting() and is_pt2_compiling():
        return
    if lengths_dtype == torch.int32 and num_values > 2147483647:
        raise ValueError(f"SidFeatureTransform: with the {what} of feature '{feature}' the output holds "
                         f"{num_values} values, past the int32 offsets limit 2147483647 of int32 lengths; "
                         f"pass int64 lengths or a smaller batch")


@torch.fx.wrap
def append_sid_tokens(features: KeyedJaggedTensor, item_tokens: Tensor, item_features: list[str],
                      token_features: list[list[str]], oov: bool, piece_offsets: Tensor | None = None,
                      piece_values: Tensor | None = None, distinct: list[str] | None = None,
                      plan: list[list[int]] | None = None) -> KeyedJaggedTensor:
    """``features`` plus, per item feature, one feature per token type (``item_tokens: [T, N (+1)]``; ``plan``: which
    rows to gather and which to compute from a gathered one, :func:`token_plan`; None: gather all).

    Input features keep their keys, order, values, lengths and weights (those of ``distinct`` are first reduced
    to their distinct values: :func:`distinct_values`); derived features follow, with their source's lengths
    (and weights, when ``features`` has weights). An fx leaf: its data-dependent splits and checks run, never
    get traced.
    """
    if features.variable_stride_per_key():
        raise ValueError("SidFeatureTransform: variable-batch (VBE) KeyedJaggedTensors are not supported")
    features = distinct_values(features, distinct)
    keys = features.keys()
    values, lengths, weights = features.values(), features.lengths(), features.weights_or_none()
    stride, length_per_key = features.stride(), features.length_per_key()
    for feature in item_features:
        if feature not in keys:
            raise ValueError(f"SidFeatureTransform: item feature '{feature}' is missing from the input; "
                             f"its keys are {keys}")
    sources = [keys.index(feature) for feature in item_features]
    num_tokens, num_items = item_tokens.size(0), item_tokens.size(1) - int(oov)
    num_derived = 0
    for feature, k in zip(item_features, sources):
        num_derived += num_tokens * length_per_key[k]
        _check_offsets_fit(lengths.dtype, values.numel() + num_derived, feature, "tokens")
    # each feature's tokens are gathered straight into their [T, n] block of the output: no cat
    out_values = values.new_empty(values.numel() + num_derived)
    out_values[:values.numel()].copy_(values)
    offset = values.numel()
    per_key_values = values.split(length_per_key)
    per_key_lengths = lengths.view(len(keys), stride)
    pieces: list[tuple[Tensor, Tensor]] = []
    for feature, k in zip(item_features, sources):
        ids = _item_ids(per_key_values[k], feature, num_items, oov)
        block = out_values[offset:offset + num_tokens * length_per_key[k]].view(num_tokens, length_per_key[k])
        gather_token_rows(block, item_tokens, ids, plan)
        offset += num_tokens * length_per_key[k]
        if piece_offsets is not None and piece_values is not None:
            pieces.append(gather_pieces(ids, per_key_lengths[k], piece_offsets, piece_values))
    out_lengths = [lengths] + [per_key_lengths[k].repeat(num_tokens) for k in sources]
    out_weights: Tensor | None = None
    if weights is not None:
        if pieces:
            raise ValueError("SidFeatureTransform: weighted item features cannot carry weights to SPM pieces")
        per_key_weights = weights.split(length_per_key)
        out_weights = torch.cat([weights] + [per_key_weights[k].repeat(num_tokens) for k in sources])
    out_keys, out_length_per_key = list(keys), list(length_per_key)
    for derived, k in zip(token_features, sources):
        out_keys.extend(derived[:num_tokens])
        out_length_per_key.extend([length_per_key[k]] * num_tokens)
    if pieces:
        out_values = torch.cat([out_values] + [values_ for values_, _ in pieces])
        _check_offsets_fit(lengths.dtype, out_values.numel(), ", ".join(item_features), "SPM pieces")
        out_lengths += [piece_lengths for _, piece_lengths in pieces]
        out_keys += [derived[num_tokens] for derived in token_features]
        out_length_per_key += [values_.numel() for values_, _ in pieces]
    return KeyedJaggedTensor(keys=out_keys, values=out_values, weights=out_weights, lengths=torch.cat(out_lengths),
                             stride=stride, length_per_key=out_length_per_key)


class SidTableLayout(ABC):
    """The token tables of a SID transform, for ``EmbeddingBagCollection`` / ``EmbeddingCollection`` configs: one
    table per token type, shared by the derived features of every item feature (a candidate and a history look up
    the same rows). Needs ``feature_names``, :meth:`table_names`, :meth:`num_embeddings` and
    :meth:`derived_feature_names` of the transform it is mixed into."""

    if TYPE_CHECKING:  # set by the transform; TorchScript cannot read class-level annotations here
        feature_names: list[str]

    @abstractmethod
    def table_names(self) -> list[str]:
        """One table name per token type."""

    @abstractmethod
    def num_embeddings(self) -> list[int]:
        """Rows per token table."""

    @abstractmethod
    def derived_feature_names(self, feature: str) -> list[str]:
        """Names of the features derived from item feature ``feature``, in table order."""

    def _tables(self, feature_names: Sequence[str] | None) -> list[tuple[str, int, list[str]]]:
        selected = self.feature_names if feature_names is None else list(feature_names)
        unknown = sorted(set(selected) - set(self.feature_names))
        if unknown:
            raise ValueError(f"{type(self).__name__}: {unknown} are not item features of this transform "
                             f"({self.feature_names})")
        derived = [self.derived_feature_names(f) for f in selected]
        return [(table, rows, [names[t] for names in derived])
                for t, (table, rows) in enumerate(zip(self.table_names(), self.num_embeddings(), strict=True))]

    def embedding_bag_configs(self, embedding_dim: int, feature_names: Sequence[str] | None = None,
                              pooling: PoolingType = PoolingType.SUM) -> list[EmbeddingBagConfig]:
        """Pooled tables for the derived features of ``feature_names`` (None: all item features)."""
        return [EmbeddingBagConfig(num_embeddings=rows, embedding_dim=embedding_dim, name=table,
                                   feature_names=features, pooling=pooling)
                for table, rows, features in self._tables(feature_names)]

    def embedding_configs(self, embedding_dim: int,
                          feature_names: Sequence[str] | None = None) -> list[EmbeddingConfig]:
        """Sequence tables (for an ``EmbeddingCollection``), laid out as :meth:`embedding_bag_configs`."""
        return [EmbeddingConfig(num_embeddings=rows, embedding_dim=embedding_dim, name=table, feature_names=features)
                for table, rows, features in self._tables(feature_names)]


class SidFeatureTransform(SidTableLayout, nn.Module):
    """Appends semantic-ID token features (per-level, n-gram, prefix n-gram) for item-id features of a KJT.

    Each item feature ``f`` (a candidate ``item_id``, a jagged ``history_item_ids``, ...) gets one new feature per
    token type, ``f__<name>_<suffix>``, with ``f``'s lengths: one token per item, per event of a sequence. Other
    features (and ``f`` itself) pass through untouched, weights included; a weighted item feature's weights are
    carried to its tokens. :meth:`embedding_bag_configs` / :meth:`embedding_configs` build the matching tables.

    One feature per token type, rather than the levels interleaved in one feature: each token type has its own
    vocabulary, hence its own table that the planner sizes and shards on its own, and each derived feature keeps
    its source's lengths, so a sequence's tokens stay aligned event by event with its other per-event features.

    Args:
        semantic_ids: the artifact; ``codes: [N, levels]``, row i = item i.
        feature_names: item-id features to derive tokens from; their values are item ids in ``[0, N)``, int64 or
            int32 (the output keeps the input's dtypes: module docstring).
        ngram_orders: sliding n-grams of each order over consecutive levels; order 1 gives one token per level.
        ngram_groups: non-overlapping n-grams of each order (Singh et al.'s N-gram-SID): levels
            ``[0, m), [m, 2m), ...``, the last group shorter when ``m`` does not divide the levels.
        prefix_lengths: prefix n-grams ``(c_0, ..., c_{p-1})``, one per length p.
        num_levels: use the first ``num_levels`` levels of the artifact (None: all).
        max_table_size: largest table; a token whose exact vocabulary is larger is hashed into this many rows.
        unknown_ids: ``"raise"``: a ValueError names the feature, the id and the limit; ``"oov"``: unknown ids
            (negative, or ``>= N``) get a reserved row, the last of every table.
        name: token name prefix, so two transforms (two artifacts) give distinct feature and table names.
        spm: SentencePiece pieces of every item (:func:`~torchrec_sid.sid.pieces.fit_sid_sentencepiece`), for one
            more token type, ``<feature>__<name>_spm``, after the others (its vocabulary: ``spm.vocab_size`` rows).
        distinct_features: item features (of ``feature_names``) whose output holds only their distinct ids, sorted,
            in the first example (:func:`distinct_values`), and tokens for those: a batch's histories then cost one
            lookup per distinct item; the reader gathers the rows back to its events with
            ``torch.unique(ids, return_inverse=True)[1]`` (as :class:`~torchrec_sid.models.ItemArch` does).

    Example::

        # 4 items, 3 levels: item 0 -> (0, 1, 5), 1 -> (2, 0, 7), 2 -> (3, 3, 0), 3 -> (1, 2, 3)
        sids = SemanticIds(codes, cardinalities=[4, 4, 8], quantizer="rq_kmeans", config={})
        # 2 examples; item_id: [[3], [1]]; history_item_ids: [[0, 2], []]
        features = KeyedJaggedTensor.from_lengths_sync(
            keys=["item_id", "history_item_ids"],
            values=torch.tensor([3, 1, 0, 2]),
            lengths=torch.tensor([1, 1, 2, 0]),
        )
        transform = SidFeatureTransform(sids, ["item_id", "history_item_ids"], ngram_orders=[1],
                                        prefix_lengths=[2])
        out = transform(features)
        # out.keys(): item_id, history_item_ids, item_id__sid_l0, item_id__sid_l1, item_id__sid_l2,
        #   item_id__sid_prefix2, history_item_ids__sid_l0, ..., history_item_ids__sid_prefix2
        # out["history_item_ids__sid_l0"]: [[0, 3], []]; out["item_id__sid_prefix2"]: [[1 + 4 * 2], [2 + 4 * 0]]
        ebc = EmbeddingBagCollection(tables=transform.embedding_bag_configs(embedding_dim=16))
        ebc(out)  # KeyedTensor: one [2, 16] vector per derived feature (4 tables, each shared by 2 features)
    """

    if TYPE_CHECKING:  # buffer types for mypy; TorchScript cannot read class-level annotations here
        item_tokens: Tensor
        piece_offsets: Tensor
        piece_values: Tensor

    def __init__(
        self,
        semantic_ids: SemanticIds,
        feature_names: Sequence[str],
        ngram_orders: Sequence[int] = (1,),
        prefix_lengths: Sequence[int] = (),
        num_levels: int | None = None,
        max_table_size: int = 2**20,
        unknown_ids: UnknownIdPolicy = "raise",
        name: str = "sid",
        ngram_groups: Sequence[int] = (),
        spm: SidPieces | None = None,
        distinct_features: Sequence[str] = (),
    ) -> None:
        super().__init__()
        num_levels = semantic_ids.num_levels if num_levels is None else num_levels
        check_token_settings("SidFeatureTransform", semantic_ids.cardinalities, feature_names, num_levels,
                             ngram_orders, prefix_lengths, max_table_size, unknown_ids, ngram_groups)
        cardinalities = semantic_ids.cardinalities[:num_levels]
        self.feature_names: list[str] = list(feature_names)
        self.name = name
        self.oov = unknown_ids == "oov"
        self.tokens = sid_tokens(cardinalities, ngram_orders, prefix_lengths, max_table_size, ngram_groups)
        self.spm_vocab_size = None if spm is None else spm.vocab_size
        if spm is not None:
            self._register_pieces(spm, semantic_ids.num_items)
        self.token_features: list[list[str]] = [self.derived_feature_names(f) for f in self.feature_names]
        self.distinct_features: list[str] = checked_distinct_features("SidFeatureTransform", distinct_features,
                                                                      self.feature_names)
        self.register_buffer(
            "item_tokens", item_token_table(semantic_ids.codes[:, :num_levels], cardinalities, self.tokens, self.oov)
        )
        self.token_plan: list[list[int]] = token_plan(self.tokens, cardinalities, self.oov)

    def _register_pieces(self, spm: SidPieces, num_items: int) -> None:
        """Buffers ``piece_offsets: [N + 2]`` and ``piece_values: [P + 1]``: the pieces of every item, then of the
        OOV item (one piece, row ``spm.vocab_size``, used under ``"oov"`` only)."""
        if spm.num_items != num_items:
            raise ValueError(f"SidFeatureTransform: spm has pieces for {spm.num_items} items, the SemanticIds "
                             f"artifact has {num_items}")
        if len(spm.pieces) and (int(spm.pieces.min()) < 0 or int(spm.pieces.max()) >= spm.vocab_size):
            raise ValueError(f"SidFeatureTransform: spm piece ids must be in [0, {spm.vocab_size})")
        total = int(spm.offsets[-1])
        self.register_buffer("piece_offsets", torch.cat([spm.offsets.long(), torch.tensor([total + 1])]))
        self.register_buffer("piece_values", torch.cat([spm.pieces.long(), torch.tensor([spm.vocab_size])]))

    def _suffixes(self) -> list[str]:
        return [token.suffix for token in self.tokens] + ([] if self.spm_vocab_size is None else ["spm"])

    def derived_feature_names(self, feature: str) -> list[str]:
        """Names of the features derived from item feature ``feature``, in output order."""
        return [f"{feature}__{self.name}_{suffix}" for suffix in self._suffixes()]

    def table_names(self) -> list[str]:
        """One table per token type: ``<name>_<suffix>``, e.g. ``sid_l0``, ``sid_prefix2``, ``sid_spm``."""
        return [f"{self.name}_{suffix}" for suffix in self._suffixes()]

    def num_embeddings(self) -> list[int]:
        """Rows per token table: the exact vocabulary or the hash size (the piece vocabulary for ``spm``), plus the
        OOV row under ``"oov"``."""
        spm = [] if self.spm_vocab_size is None else [self.spm_vocab_size + int(self.oov)]
        return [token.num_buckets + int(self.oov) for token in self.tokens] + spm

    def forward(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """``features`` (B examples) → the same features (``distinct_features`` reduced to their distinct ids)
        plus ``len(feature_names) * T`` token features."""
        if self.spm_vocab_size is None:
            return append_sid_tokens(features, self.item_tokens, self.feature_names, self.token_features, self.oov,
                                     distinct=self.distinct_features, plan=self.token_plan)
        return append_sid_tokens(features, self.item_tokens, self.feature_names, self.token_features, self.oov,
                                 self.piece_offsets, self.piece_values, distinct=self.distinct_features,
                                 plan=self.token_plan)
