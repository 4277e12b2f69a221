"""Quantizers: item content embeddings ``[N, D]`` -> semantic IDs ``[N, levels]``, and the SemanticIds artifact."""

from torchrec_sid.quantizers.autoencoder import NeuralQuantizer
from torchrec_sid.quantizers.base import (
    FORMAT_VERSION,
    QUANTIZERS,
    Quantizer,
    ResidualQuantizer,
    SemanticIds,
    build_quantizer,
    register,
)
from torchrec_sid.quantizers.dpca import DPCA
from torchrec_sid.quantizers.fsq import FSQ
from torchrec_sid.quantizers.mmq import MMQ
from torchrec_sid.quantizers.rq_gmm import RQGMM
from torchrec_sid.quantizers.rq_kmeans import RQKMeans
from torchrec_sid.quantizers.rq_vae import RQVAE

__all__ = [
    "DPCA",
    "FORMAT_VERSION",
    "FSQ",
    "MMQ",
    "QUANTIZERS",
    "RQGMM",
    "RQVAE",
    "NeuralQuantizer",
    "Quantizer",
    "RQKMeans",
    "ResidualQuantizer",
    "SemanticIds",
    "build_quantizer",
    "register",
]
