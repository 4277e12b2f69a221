"""The example configs (YAML files), installed as ``torchrec_sid.examples`` (see pyproject.toml)."""
