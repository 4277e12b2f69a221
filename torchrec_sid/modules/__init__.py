"""Drop-in TorchRec modules: history blocks (DIN, SIM, mean pooling, DMQN, PMA), the HSTU layer, the SID feature
transform, SIDE embeddings and MMQ stage-2 soft-indexed SID embeddings."""

from torchrec_sid.modules.dmqn import (
    DMQN,
    CachedDMQN,
    Clusters,
    DMQNState,
    LRUStateCache,
    MultiClusterQuantizer,
    TemperatureSchedule,
    UserHistory,
    UserStateCache,
)
from torchrec_sid.modules.history import HistoryBlock, check_history_inputs, jagged_to_padded, padding_mask
from torchrec_sid.modules.hstu import HSTU, HSTULayer, time_buckets
from torchrec_sid.modules.item_lookup import ItemSidLookup
from torchrec_sid.modules.pma import PMA
from torchrec_sid.modules.sid_transform import SidFeatureTransform, SidToken, hash_packed_ids
from torchrec_sid.modules.side import SIDEmbedding
from torchrec_sid.modules.soft_sid import SoftSidEmbedding, add_auxiliary_loss
from torchrec_sid.modules.target_attention import DIN, SIM, MeanPooling, TargetAttention, hard_search

__all__ = [
    "CachedDMQN", "Clusters", "DIN", "DMQN", "DMQNState", "HSTU", "HSTULayer", "HistoryBlock", "ItemSidLookup",
    "LRUStateCache",
    "MeanPooling", "MultiClusterQuantizer", "SIM", "TargetAttention", "TemperatureSchedule", "UserHistory",
    "UserStateCache", "check_history_inputs", "hard_search", "jagged_to_padded", "padding_mask", "time_buckets",
    "PMA", "SIDEmbedding", "SidFeatureTransform", "SidToken", "SoftSidEmbedding", "add_auxiliary_loss",
    "hash_packed_ids",
]
