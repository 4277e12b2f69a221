"""Quantizers: item content embeddings ``[N, D]`` -> semantic IDs ``[N, levels]``, and the SemanticIds artifact."""

from torchrec_sid.quantizers.base import (
    FORMAT_VERSION,
    QUANTIZERS,
    Quantizer,
    ResidualQuantizer,
    SemanticIds,
    build_quantizer,
    register,
)
from torchrec_sid.quantizers.rq_gmm import RQGMM
from torchrec_sid.quantizers.rq_kmeans import RQKMeans

__all__ = [
    "FORMAT_VERSION",
    "QUANTIZERS",
    "RQGMM",
    "Quantizer",
    "RQKMeans",
    "ResidualQuantizer",
    "SemanticIds",
    "build_quantizer",
    "register",
]
