"""Shared pieces of the history blocks: jagged → padded histories, padding masks, the common block interface.

A history block (DIN, SIM, mean pooling, DMQN, PMA) reads a user's history as a padded batch::

    history: [B, L, D] float     event embeddings (from an EBC/EC lookup, SID tokens, SIDE vectors, ...)
    mask:    [B, L] bool         True at real events; padded positions are never read, whatever they hold
    candidate: [B, D] float      the item being scored

and returns ``[B, output_dim]``. :func:`jagged_to_padded` builds ``history`` and ``mask`` from TorchRec's jagged
features, keeping the most recent ``max_len`` events, oldest first, padding at the end.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing
from torchrec.sparse.jagged_tensor import JaggedTensor


def is_tracing() -> bool:
    """True while fx symbolic tracing (TorchRec's tracer), ``torch.export`` or ``torch.compile`` traces the caller:
    a shape read from the data (e.g. a batch's longest history) would be baked into, or break, the trace."""
    return is_fx_symbolic_tracing() or torch.compiler.is_compiling() or torch.compiler.is_exporting()


def padding_mask(lengths: Tensor, max_len: int) -> Tensor:
    """``[B, max_len]`` bool, True at the first ``min(lengths[b], max_len)`` positions of row ``b``."""
    positions = torch.arange(max_len, device=lengths.device)
    return positions[None, :] < lengths[:, None]


def jagged_to_padded(jt: JaggedTensor, max_len: int, padding_value: float = 0.0) -> tuple[Tensor, Tensor]:
    """Pads a jagged history, keeping the most recent ``max_len`` events of each row, oldest first.

    Args:
        jt: values ``[sum L, D]`` (embeddings) or ``[sum L]`` (ids, timestamps), lengths ``[B]``, each row
            oldest first (as in ``CtrBatches``' ``history_*`` features).
        max_len: padded length Lmax (static, so the result's shape does not depend on the data; a caller may pass
            a batch's longest length instead, as :class:`~torchrec_sid.models.dlrm.HistoryArch` does in eager runs).
        padding_value: value at padded positions.

    Returns:
        ``(padded [B, Lmax, D] or [B, Lmax], mask [B, Lmax] bool)``.

    Example::

        # lengths [1, 0, 3]: row 0 = [a], row 1 = [], row 2 = [b, c, d]
        jt = JaggedTensor(values=torch.randn(4, 8), lengths=torch.tensor([1, 0, 3]))
        history, mask = jagged_to_padded(jt, max_len=2)
        # history: [3, 2, 8], rows [a, 0], [0, 0], [c, d]; mask [[T, F], [F, F], [T, T]]
    """
    if max_len <= 0:
        raise ValueError(f"max_len must be positive, got {max_len}")
    values, lengths = jt.values(), jt.lengths().long()
    kept = lengths.clamp(max=max_len)
    # dense indexing (no fbgemm jagged op, so torch.export and fx trace it): row b reads its most recent kept_b
    # events, values[start_b + j] for j < kept_b with start_b = offsets_b + lengths_b - kept_b, and a padding row
    # appended after the values everywhere else; no branch on a size, so an empty batch needs no special case
    start = torch.cumsum(lengths, dim=0) - kept  # [B]
    positions = torch.arange(max_len, device=lengths.device)
    mask = positions[None, :] < kept[:, None]  # [B, Lmax]
    index = torch.where(mask, start[:, None] + positions[None, :], values.size(0))
    rows = torch.nn.functional.pad(values.unsqueeze(-1).flatten(1), (0, 0, 0, 1), value=padding_value)  # [N+1, *]
    padded = rows[index].reshape(index.shape + values.shape[1:])  # [B, Lmax, ...]
    return padded, mask


def masked_softmax(logits: Tensor, valid: Tensor) -> Tensor:
    """Softmax of ``logits: [..., L]`` over the positions where ``valid`` (bool, broadcastable) is true; zeros at
    padding. A row with no valid position gets all-zero weights, never NaN (its logits stay finite)."""
    logits = logits.masked_fill(~(valid | ~valid.any(dim=-1, keepdim=True)), float("-inf"))
    return torch.where(valid, torch.softmax(logits, dim=-1), 0.0)


def check_history_inputs(
    block: str,
    embedding_dim: int,
    history: Tensor,
    mask: Tensor,
    candidate: Tensor | None = None,
    history_timestamps: Tensor | None = None,
    history_keys: Tensor | None = None,
    candidate_key: Tensor | None = None,
) -> None:
    """Raises ValueError, naming ``block`` and the offending shape, on inputs that break the block interface.

    Skipped under fx symbolic tracing, where shapes are symbolic; a traced module runs unchecked.
    """
    if is_fx_symbolic_tracing():
        return
    if history.dim() != 3 or history.size(-1) != embedding_dim:
        raise ValueError(f"{block}: history must be [B, L, D={embedding_dim}], got shape {tuple(history.shape)}")
    if not history.is_floating_point():
        raise ValueError(f"{block}: history must be floating point, got {history.dtype}")
    batch_len = tuple(history.shape[:2])
    if tuple(mask.shape) != batch_len or mask.dtype != torch.bool:
        raise ValueError(f"{block}: mask must be bool [B, L]={batch_len}, got {mask.dtype} {tuple(mask.shape)}")
    if candidate is not None and tuple(candidate.shape) != (batch_len[0], embedding_dim):
        raise ValueError(f"{block}: candidate must be [B, D]={(batch_len[0], embedding_dim)}, got shape "
                         f"{tuple(candidate.shape)}")
    for name, value in (("history_timestamps", history_timestamps), ("history_keys", history_keys)):
        if value is not None and tuple(value.shape) != batch_len:
            raise ValueError(f"{block}: {name} must be [B, L]={batch_len}, got shape {tuple(value.shape)}")
    if candidate_key is not None and tuple(candidate_key.shape) != batch_len[:1]:
        raise ValueError(f"{block}: candidate_key must be [B]={batch_len[:1]}, got shape "
                         f"{tuple(candidate_key.shape)}")


class HistoryBlock(nn.Module, ABC):
    """The interface every history block implements, so that a model can swap them by config.

    Attributes:
        output_dim: D_out, the width of the block's output.

    ``forward(history, mask, candidate, history_timestamps=None, history_keys=None, candidate_key=None)``:

    - ``history: [B, L, D]``, ``mask: [B, L]`` bool, ``candidate: [B, D]``;
    - ``history_timestamps: [B, L]`` event times (int seconds or float), used by time-aware blocks;
    - ``history_keys: [B, L]`` and ``candidate_key: [B]`` long category keys (genre, SID prefix), used by
      search-based blocks (SIM);
    - returns ``[B, D_out]``; a row with no events gives zeros.

    A block ignores the optional inputs it has no use for, so a model passes everything it has to any block.

    Example::

        # 2 users: history_item_ids [[3, 1, 4], [1]]; candidates item_id [5, 9]
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["history_item_ids", "item_id"], values=torch.tensor([3, 1, 4, 1, 5, 9]),
            lengths=torch.tensor([3, 1, 1, 1]),
        )
        table = EmbeddingConfig(name="item", embedding_dim=8, num_embeddings=10,
                                feature_names=["history_item_ids", "item_id"])
        embedded = EmbeddingCollection(tables=[table])(kjt)  # feature -> JaggedTensor, values [sum L, 8]
        history, mask = jagged_to_padded(embedded["history_item_ids"], max_len=4)  # [2, 4, 8], [2, 4]
        block = DIN(embedding_dim=8)  # or SIM, MeanPooling, DMQN: same call
        block(history, mask, candidate=embedded["item_id"].values())  # [2, 8]
    """

    output_dim: int

    @abstractmethod
    def forward(
        self,
        history: Tensor,
        mask: Tensor,
        candidate: Tensor,
        history_timestamps: Tensor | None = None,
        history_keys: Tensor | None = None,
        candidate_key: Tensor | None = None,
    ) -> Tensor: ...
