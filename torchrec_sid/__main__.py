"""``python -m torchrec_sid`` is the ``torchrec-sid`` command (what torchrun and TorchX launch)."""

from torchrec_sid.cli import main

main()
