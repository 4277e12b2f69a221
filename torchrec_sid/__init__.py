"""torchrec-sid: semantic IDs for TorchRec models."""

__version__ = "0.1.0"
