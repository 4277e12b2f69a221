"""The bottom layer: semantic-ID tables and code tensors ``codes: [N, levels]`` (row i = item i).

Nothing here imports a quantizer, a module or a training loop, so serving code loads SID tables alone.
"""

from torchrec_sid.sid.codes import add_collision_suffix, check_codes, collision_rate
from torchrec_sid.sid.packing import pack_codes, radix_weights, unpack_codes
from torchrec_sid.sid.semantic_ids import SemanticIds

__all__ = ["SemanticIds", "add_collision_suffix", "check_codes", "collision_rate", "pack_codes", "radix_weights",
           "unpack_codes"]
