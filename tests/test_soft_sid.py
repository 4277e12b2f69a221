from __future__ import annotations

import copy

import pytest
import torch
from torchrec.fx import symbolic_trace

from torchrec_sid.modules import SoftSidEmbedding, add_auxiliary_loss
from torchrec_sid.modules.soft_sid import PAPER_STAGE2_WEIGHTS
from torchrec_sid.quantizers.mmq import MMQ, MMQTokenizer

SIGNALS = {"text": "mse", "meta": "mse"}


@pytest.fixture(scope="module")
def fitted() -> tuple[MMQ, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = {"text": torch.randn(120, 12, generator=g), "meta": torch.rand(120, 5, generator=g)}
    q = MMQ(SIGNALS, num_shared=1, num_specific=1, codebook_size=8, latent_dim=6, hidden_dim=16, max_epochs=3,
            init_rows=64, seed=0).fit(x)
    return q, x


def _copy(q: MMQ) -> MMQTokenizer:
    return copy.deepcopy(q.model_)


def _soft(fitted, **kwargs) -> SoftSidEmbedding:
    q, x = fitted
    torch.manual_seed(0)
    return SoftSidEmbedding(_copy(q), x, 4, **kwargs)


def test_forward_is_the_hard_token_rows_and_codes_match_stage_one(fitted) -> None:
    q, x = fitted
    soft = _soft(fitted)
    ids = torch.tensor([5, 0, 5, 119])
    codes = q.encode(x)  # [120, 3]
    assert torch.equal(soft.codes(), codes)
    expected = sum(soft.tables[e, codes[ids, e]] for e in range(codes.shape[1]))
    torch.testing.assert_close(soft(ids), expected)
    soft.eval()
    torch.testing.assert_close(soft(ids), expected)


def test_ranking_gradient_reaches_the_tokenizer_and_the_regulariser_rides_on_the_output(fitted) -> None:
    soft = _soft(fitted)
    ids = torch.arange(40)
    (soft(ids) * torch.randn(40, 4)).sum().backward()
    experts = [p for n, p in soft.tokenizer.named_parameters() if n.startswith(("shared", "specific"))]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in experts)
    assert soft.tables.grad is not None and soft.last_regulariser is not None
    decoder_grad = soft.tokenizer.decoder[0].weight.grad  # the decoders see only the regulariser
    assert decoder_grad is not None and decoder_grad.abs().sum() > 0


def test_regulariser_weights_enter_the_loss(fitted) -> None:
    grads = []
    for weight in (0.0, 1.0):
        soft = _soft(fitted, recon_weight=weight, aux_weight=weight)
        (soft(torch.arange(30)) * 0.0).sum().backward()  # the ranking gradient is zero: only the regulariser acts
        grads.append(soft.tokenizer.decoder[0].weight.grad)
    assert grads[0] is None or grads[0].abs().sum() == 0
    assert grads[1].abs().sum() > 0


def test_paper_stage2_weights_are_half_recon_half_aux_and_no_vq_term(fitted) -> None:
    """The paper's L_down + 0.5 L_recon + 0.5 L_aux: the regulariser is exactly that, with no codebook term."""
    q, x = fitted
    paper = _soft(fitted, **PAPER_STAGE2_WEIGHTS)
    paper(torch.arange(30))
    losses, _ = _copy(q).loss_terms({m: v[:30] for m, v in x.items()})
    torch.testing.assert_close(paper.last_regulariser, 0.5 * losses["recon"] + 0.5 * losses["aux"])
    library = _soft(fitted, recon_weight=12.0, aux_weight=10.0)
    library(torch.arange(30))
    torch.testing.assert_close(library.last_regulariser, 12 * losses["recon"] + 10 * losses["aux"] + losses["vq"])
    with pytest.raises(ValueError, match="vq_weight must be >= 0, got -1"):
        _soft(fitted, vq_weight=-1.0)


def test_add_auxiliary_loss_adds_the_loss_gradient() -> None:
    w = torch.tensor(2.0, requires_grad=True)
    x = torch.ones(3, requires_grad=True)
    y = add_auxiliary_loss(x, w**2)
    assert torch.equal(y, x)
    (y * 3).sum().backward()
    assert torch.equal(x.grad, torch.full((3,), 3.0)) and w.grad.item() == pytest.approx(4.0)


def test_bad_signals_name_the_signal(fitted) -> None:
    q, x = fitted
    with pytest.raises(ValueError, match="'meta' must be"):
        SoftSidEmbedding(_copy(q), {"text": x["text"], "meta": x["meta"][:, :3]}, 4)
    with pytest.raises(ValueError, match="do not match the tokenizer's modalities"):
        SoftSidEmbedding(_copy(q), {"text": x["text"]}, 4)
    with pytest.raises(ValueError, match="tau"):
        SoftSidEmbedding(_copy(q), x, 4, tau=0.0)


def test_traces_with_torchrec_fx(fitted) -> None:
    soft = _soft(fitted).eval()
    traced = symbolic_trace(soft)
    ids = torch.tensor([3, 1, 3])
    torch.testing.assert_close(traced(ids), soft(ids))
