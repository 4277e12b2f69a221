"""Quantizers: item content embeddings ``[N, D]`` -> semantic IDs ``[N, levels]`` (a training-side layer).

``build_quantizer(name, **settings)`` makes any registered quantizer; ``quantizer.semantic_ids(x)`` gives the
:class:`~torchrec_sid.sid.SemanticIds` table that models read.
"""

from torchrec_sid.quantizers.autoencoder import NeuralQuantizer
from torchrec_sid.quantizers.base import QUANTIZERS, Quantizer, ResidualQuantizer, build_quantizer, register
from torchrec_sid.quantizers.dpca import DPCA
from torchrec_sid.quantizers.fsq import FSQ
from torchrec_sid.quantizers.mmq import MMQ
from torchrec_sid.quantizers.rq_gmm import RQGMM
from torchrec_sid.quantizers.rq_kmeans import RQKMeans
from torchrec_sid.quantizers.rq_vae import RQVAE

__all__ = ["DPCA", "FSQ", "MMQ", "QUANTIZERS", "RQGMM", "RQVAE", "NeuralQuantizer", "Quantizer", "RQKMeans",
           "ResidualQuantizer", "build_quantizer", "register"]
