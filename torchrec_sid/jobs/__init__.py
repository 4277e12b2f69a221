"""Runnable jobs (the top layer): ``quantize`` (item content -> SemanticIds), ``demo`` (the README's main job).
The training job is :func:`torchrec_sid.train.loop.run`."""
