"""Serving: exported rankers (:mod:`.export`, :mod:`.artifact`), user-state stores (:mod:`.store`: in-process LRU or
Redis), the :class:`~torchrec_sid.serving.scorer.Scorer` and its HTTP endpoint (:mod:`.http`).

Imports nothing at package import, so ``torchrec_sid.serving.artifact`` loads an artifact with torch alone.
"""
