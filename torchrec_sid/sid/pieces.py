"""SentencePiece SIDs (Singh et al.'s SPM-SID, ``papers/sid_ngrams.md``): each item's SID as a few learned pieces.

Every (level, code) pair is one symbol (level-tagged: level l's code c is symbol ``sum_{j<l} K_j + c``, written as
one Unicode character), an item's SID is a "sentence" of ``levels`` symbols, and a SentencePiece model trained on
the items' sentences (weighted by ``item_weights``, e.g. impressions, by repeating lines) cuts each SID into
variable-length runs of consecutive codes: frequent runs become one piece, rare ones fall back to shorter pieces
down to single codes. :class:`SidPieces` holds every item's pieces as a CSR table (``offsets: [N + 1]``,
``pieces: [P]``) and the vocabulary size, so :class:`~torchrec_sid.modules.SidFeatureTransform` serves them with
a fixed vocabulary and no SentencePiece at run time.

Needs the optional ``sentencepiece`` package (``pip install 'torchrec-sid[spm]'``) to fit, not to serve.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from torchrec_sid.sid.semantic_ids import SemanticIds

SYMBOL_BASE = 0x4E00  # CJK Unified Ideographs: 20,992 printable characters, one per (level, code) symbol
MAX_SYMBOLS = 0x9FFF - SYMBOL_BASE + 1


@dataclass(frozen=True, eq=False)
class SidPieces:
    """Every item's SentencePiece pieces: item i's piece ids are ``pieces[offsets[i]:offsets[i + 1]]``.

    Args:
        offsets: ``LongTensor[N + 1]``, non-decreasing, ``offsets[0] = 0``, ``offsets[N] = P``.
        pieces: ``LongTensor[P]`` in ``[0, vocab_size)``.
        vocab_size: rows of the piece table.
        model_proto: the serialized SentencePiece model (to tokenize new SIDs the same way).
    """

    offsets: Tensor
    pieces: Tensor
    vocab_size: int
    model_proto: bytes = b""

    @property
    def num_items(self) -> int:
        return len(self.offsets) - 1

    def item_pieces(self, item: int) -> list[int]:
        """Piece ids of item ``item``."""
        return self.pieces[int(self.offsets[item]):int(self.offsets[item + 1])].tolist()


def sid_sentences(codes: Tensor, cardinalities: list[int]) -> list[str]:
    """One string per item: its level-tagged symbols, ``codes: [N, levels]``."""
    if sum(cardinalities) > MAX_SYMBOLS:
        raise ValueError(f"SPM SIDs: {sum(cardinalities)} (level, code) symbols exceed the {MAX_SYMBOLS} available; "
                         f"use fewer levels (num_levels) or smaller codebooks")
    shift = torch.tensor([sum(cardinalities[:level]) for level in range(len(cardinalities))])
    symbols = (codes + shift + SYMBOL_BASE).tolist()
    return ["".join(map(chr, row)) for row in symbols]


def fit_sid_sentencepiece(semantic_ids: SemanticIds, vocab_size: int, *, num_levels: int | None = None,
                          model_type: Literal["unigram", "bpe"] = "unigram", item_weights: Tensor | None = None,
                          seed: int = 0) -> SidPieces:
    """Trains SentencePiece on the items' SIDs and tokenizes every item (module docstring).

    Args:
        semantic_ids: the artifact; its first ``num_levels`` levels (None: the levels before the collision suffix).
        vocab_size: pieces, at least the number of distinct (level, code) symbols plus one (SentencePiece's
            unknown piece, which no item uses).
        model_type: SentencePiece's ``unigram`` (default) or ``bpe``.
        item_weights: ``[N]`` non-negative integers, how often each item's SID enters the corpus (None: once).
        seed: seeds the order of the corpus lines; training runs on one thread without sampling, so one seed
            gives the same pieces every run.

    Example::

        pieces = fit_sid_sentencepiece(sids, vocab_size=256)
        pieces.item_pieces(0)  # e.g. [17, 3]: item 0's SID in two pieces
    """
    try:
        import sentencepiece as spm
    except ImportError as e:  # the optional extra
        raise ImportError("SPM SIDs need the sentencepiece package: pip install 'torchrec-sid[spm]'") from e
    num_levels = semantic_ids.code_levels if num_levels is None else num_levels
    if not 1 <= num_levels <= semantic_ids.num_levels:
        raise ValueError(f"SPM SIDs: num_levels={num_levels} requested, the artifact has {semantic_ids.num_levels}")
    cardinalities = semantic_ids.cardinalities[:num_levels]
    sentences = sid_sentences(semantic_ids.codes[:, :num_levels], cardinalities)
    alphabet = len(set("".join(sentences)))
    if vocab_size < alphabet + 1:
        raise ValueError(f"SPM SIDs: vocab_size={vocab_size} is below the {alphabet} symbols the SIDs use plus the "
                         f"unknown piece ({alphabet + 1})")
    counts = [1] * len(sentences) if item_weights is None else [int(w) for w in item_weights.tolist()]
    if len(counts) != len(sentences) or min(counts) < 0:
        raise ValueError(f"SPM SIDs: item_weights must be [N] = [{len(sentences)}] non-negative integers")
    corpus = [s for s, count in zip(sentences, counts, strict=True) for _ in range(count)]
    order = torch.randperm(len(corpus), generator=torch.Generator().manual_seed(seed)).tolist()
    corpus = [corpus[i] for i in order]
    model = _train(spm, corpus, vocab_size, model_type)
    processor = spm.SentencePieceProcessor(model_proto=model)
    encoded = processor.encode(sentences)
    lengths = torch.tensor([len(p) for p in encoded])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    pieces = torch.tensor([p for item in encoded for p in item], dtype=torch.long)
    return SidPieces(offsets, pieces, processor.get_piece_size(), model)


def _train(spm: object, corpus: list[str], vocab_size: int, model_type: str) -> bytes:
    """SentencePiece's trainer on ``corpus`` (one SID per line) -> the serialized model."""
    import io

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(  # type: ignore[attr-defined]
        sentence_iterator=iter(corpus), model_writer=model, vocab_size=vocab_size, model_type=model_type,
        character_coverage=1.0, normalization_rule_name="identity", add_dummy_prefix=False,
        split_by_whitespace=False, remove_extra_whitespaces=False, bos_id=-1, eos_id=-1, pad_id=-1, unk_id=0,
        hard_vocab_limit=False, num_threads=1, max_sentencepiece_length=16,
        minloglevel=2, input_sentence_size=0, shuffle_input_sentence=False)
    return model.getvalue()
