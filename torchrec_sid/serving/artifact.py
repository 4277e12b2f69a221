"""Load a ranker artifact written by :func:`torchrec_sid.serving.export.export_ranker`: torch alone.

This module imports nothing of the package and no TorchRec: a serving process loads the artifact without the
training code, the quantizers, the data layer or the model classes. The programs are ``torch.export`` graphs of
aten operators plus a few of FBGEMM's (``torch.ops.fbgemm``: what TorchRec's KJTs compute offsets and splits with;
the KJTs themselves were traced away at export), so ``fbgemm_gpu`` (installed with TorchRec) is imported to
register them when the manifest lists the ``fbgemm`` namespace.

Example::

    artifact = RankerArtifact.load("ranker.pt2")
    artifact.manifest["model_version"], artifact.manifest["sid_table_version"]
    logits = artifact.score_history(candidate_ids, history_ids, mask, ages, pooled_values, pooled_lengths, dense)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

ARTIFACT_FORMAT = "torchrec-sid-ranker/1"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class RankerArtifact:
    """An exported ranker: ``score`` (and, for DMQN, ``encode``) programs and the manifest.

    ``manifest`` keys: ``format``, ``model_version``, ``sid_table_version``, ``history_block``, ``stateful`` (DMQN:
    the user state is cacheable), ``state_shape`` ``[M, d]``, ``num_items``, ``max_history``, ``min_history``,
    ``uses_time``, ``pooled_features``, ``pooled_sizes``, ``dense_in_features``, ``item_feature``,
    ``history_feature``, ``export_seconds``, ``torch``, ``extra``.
    """

    path: Path
    manifest: dict[str, Any]
    programs: dict[str, nn.Module]

    @classmethod
    def load(cls, path: str | Path) -> RankerArtifact:
        """Reads the file; raises ValueError naming the path for a file that is not a ranker artifact."""
        from torch.export.pt2_archive._package import PT2ArchiveReader, load_pt2

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ranker artifact {path} does not exist")
        try:
            with PT2ArchiveReader(str(path)) as reader:
                names = [n for n in reader.get_file_names() if n.endswith(f"extra/{MANIFEST}")]
                namespaces = json.loads(reader.read_string(names[0])).get("operator_namespaces", []) if names else []
        except Exception as e:  # noqa: BLE001  (a foreign or truncated zip fails in many ways)
            raise ValueError(f"{path} is not a readable .pt2 ranker artifact: {type(e).__name__}: {e}") from e
        if "fbgemm" in namespaces:
            try:
                import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm)
            except ImportError as e:
                raise ImportError(f"{path} uses FBGEMM operators (TorchRec's KJT ops): install fbgemm-gpu (or "
                                  f"fbgemm-gpu-cpu), which torchrec depends on") from e
        try:
            contents = load_pt2(path)
        except Exception as e:  # noqa: BLE001  (a foreign or truncated zip fails in many ways)
            raise ValueError(f"{path} is not a readable .pt2 ranker artifact: {type(e).__name__}: {e}") from e
        raw = contents.extra_files.get(MANIFEST)
        if raw is None:
            raise ValueError(f"{path} has no {MANIFEST}: not written by torchrec-sid's export_ranker")
        manifest = json.loads(raw)
        if manifest.get("format") != ARTIFACT_FORMAT:
            raise ValueError(f"{path}: artifact format {manifest.get('format')!r}, this version reads "
                             f"{ARTIFACT_FORMAT!r}")
        programs: dict[str, nn.Module] = {name: program.module()
                                          for name, program in contents.exported_programs.items()}
        expected = {"score", "encode"} if manifest["stateful"] else {"score"}
        if set(programs) != expected:
            raise ValueError(f"{path}: programs {sorted(programs)}, expected {sorted(expected)}")
        return cls(path, manifest, programs)

    @property
    def stateful(self) -> bool:
        """Whether the user state is candidate-independent and cacheable (DMQN)."""
        return bool(self.manifest["stateful"])

    @torch.no_grad()
    def encode(self, history_ids: Tensor, mask: Tensor, ages: Tensor) -> tuple[Tensor, Tensor]:
        """DMQN's state of one user: ``history_ids [1, L]`` long, ``mask [1, L]`` bool, ``ages [1, L]`` float
        seconds before the request -> ``(clusters [1, M, d], cluster_mask [1, M])``."""
        clusters, cluster_mask = self.programs["encode"](history_ids, mask, ages)
        return clusters, cluster_mask

    @torch.no_grad()
    def score_state(self, candidate_ids: Tensor, clusters: Tensor, cluster_mask: Tensor, pooled_values: Tensor,
                    pooled_lengths: Tensor, dense: Tensor) -> Tensor:
        """DMQN: logits ``[C]`` of ``candidate_ids [C]`` for the user of state ``(clusters, cluster_mask)``."""
        return self.programs["score"](candidate_ids, clusters, cluster_mask, pooled_values, pooled_lengths, dense)

    @torch.no_grad()
    def score_history(self, candidate_ids: Tensor, history_ids: Tensor, mask: Tensor, ages: Tensor,
                      pooled_values: Tensor, pooled_lengths: Tensor, dense: Tensor) -> Tensor:
        """Any other block: logits ``[C]`` of ``candidate_ids [C]`` for one user's padded history ``[1, L]``."""
        return self.programs["score"](candidate_ids, history_ids, mask, ages, pooled_values, pooled_lengths, dense)
