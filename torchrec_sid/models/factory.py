"""The demo's model: :meth:`SidDLRM.from_config <torchrec_sid.models.dlrm.SidDLRM.from_config>` for the KJT that
:class:`~torchrec_sid.data.batches.CtrBatches` builds (MovieLens-100k, synthetic data).

The only module under ``torchrec_sid.models`` that reads the data layer; :mod:`torchrec_sid.models.dlrm` knows no
feature name.
"""

from __future__ import annotations

from torch import Tensor

from torchrec_sid.data.batches import (
    HISTORY_ITEM_IDS,
    HISTORY_TIMESTAMPS,
    ITEM_GENRES,
    ITEM_ID,
    TIMESTAMP,
    USER_ID,
    Catalog,
)
from torchrec_sid.models.configs import FeatureSchema, ModelConfig
from torchrec_sid.models.dlrm import SidDLRM
from torchrec_sid.modules.soft_sid import SoftIndexTokenizer
from torchrec_sid.sid import SemanticIds


def catalog_schema(catalog: Catalog) -> FeatureSchema:
    """The features of a ``CtrBatches`` batch over ``catalog``: pooled user id, user attributes and the
    candidate's genres; ``item_id`` and ``history_item_ids``, with their timestamps."""
    cards = catalog.sparse_cardinalities()
    pooled = [USER_ID, *catalog.user_features, ITEM_GENRES]
    return FeatureSchema(pooled_features={name: cards[name] for name in pooled}, dense_in_features=catalog.num_dense,
                         num_items=catalog.num_items, item_feature=ITEM_ID, history_feature=HISTORY_ITEM_IDS,
                         history_timestamp_feature=HISTORY_TIMESTAMPS, timestamp_feature=TIMESTAMP)


def from_catalog(config: ModelConfig, catalog: Catalog, semantic_ids: SemanticIds | None = None,
                 signals: dict[str, Tensor] | None = None, tokenizer: SoftIndexTokenizer | None = None,
                 trained_items: Tensor | None = None) -> SidDLRM:
    """``SidDLRM.from_config(config, catalog_schema(catalog), ...)``: the model the train job builds.

    Example::

        data = movielens.load().interactions()
        model = from_catalog(ModelConfig(item_representation=("id", "sid"), history_block="din"), data.catalog, sids)
        batch = next(iter(CtrBatches(data, "train", batch_size=8, max_history=50)))
        model(batch.dense_features, batch.sparse_features)  # [8]
    """
    return SidDLRM.from_config(config, catalog_schema(catalog), semantic_ids, signals, tokenizer, trained_items)
