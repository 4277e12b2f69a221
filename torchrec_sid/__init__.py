"""torchrec-sid: semantic IDs for TorchRec models.

The user-facing types are importable from here; each is loaded on first use, so ``import torchrec_sid.modules``
(serving) never pulls in the quantizers or the training loop:

* :class:`~torchrec_sid.sid.SemanticIds` (``torchrec_sid.sid``): the SID table of a catalogue.
* :class:`~torchrec_sid.modules.SidFeatureTransform`, :class:`~torchrec_sid.modules.SIDEmbedding`
  (``torchrec_sid.modules``): the drop-in TorchRec modules.
* :class:`~torchrec_sid.models.dlrm.SidDLRM` (``torchrec_sid.models``): the DLRM-style model.
* :func:`~torchrec_sid.quantizers.build_quantizer` (``torchrec_sid.quantizers``): item content -> SIDs.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "SemanticIds": "torchrec_sid.sid",
    "SidFeatureTransform": "torchrec_sid.modules",
    "SIDEmbedding": "torchrec_sid.modules",
    "SidDLRM": "torchrec_sid.models.dlrm",
    "build_quantizer": "torchrec_sid.quantizers",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'torchrec_sid' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)

__version__: str = import_module("importlib.metadata").version("torchrec-sid")  # stated once, in pyproject.toml
