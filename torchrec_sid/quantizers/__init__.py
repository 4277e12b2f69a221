"""Quantizers: item content embeddings ``[N, D]`` -> semantic IDs ``[N, levels]`` (a training-side layer).

``build_quantizer(name, **settings)`` makes any registered quantizer; ``quantizer.semantic_ids(x)`` gives the
:class:`~torchrec_sid.sid.SemanticIds` table that models read. Every quantizer follows one contract
(:mod:`torchrec_sid.quantizers.base`): settings as dataclass fields (``get_params`` / ``set_params`` / ``clone``,
checked by ``fit``), ``fit(x) -> self``, ``encode(x) -> codes``, ``decode(codes) -> Tensor``, ``save`` / ``load``.
"""

from torchrec_sid.quantizers.autoencoder import NeuralQuantizer
from torchrec_sid.quantizers.base import (
    QUANTIZERS,
    NotFittedError,
    Quantizer,
    QuantizerInput,
    ResidualQuantizer,
    as_signals,
    build_quantizer,
    register,
)
from torchrec_sid.quantizers.dpca import DPCA
from torchrec_sid.quantizers.fsq import FSQ
from torchrec_sid.quantizers.mmq import MMQ
from torchrec_sid.quantizers.rq_gmm import RQGMM
from torchrec_sid.quantizers.rq_kmeans import RQKMeans
from torchrec_sid.quantizers.rq_vae import RQVAE

__all__ = ["DPCA", "FSQ", "MMQ", "QUANTIZERS", "RQGMM", "RQVAE", "NeuralQuantizer", "NotFittedError", "Quantizer",
           "QuantizerInput", "RQKMeans", "ResidualQuantizer", "as_signals", "build_quantizer", "register"]
