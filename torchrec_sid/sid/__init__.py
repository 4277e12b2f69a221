"""Manipulations of semantic-ID code tensors ``codes: [N, levels]`` (row i = item i)."""

from torchrec_sid.sid.codes import add_collision_suffix, collision_rate
from torchrec_sid.sid.packing import pack_codes, radix_weights, unpack_codes

__all__ = ["add_collision_suffix", "collision_rate", "pack_codes", "radix_weights", "unpack_codes"]
