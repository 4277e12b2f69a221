"""Exported rankers (torchrec_sid.serving.export / .artifact): scores equal the eager model's for every item
representation and history block, the SID table version is recorded, and a fresh process loads the artifact with
neither the training code, the quantizers, the data layer, the model classes nor TorchRec importable."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_sid.models.configs import FeatureSchema, ModelConfig
from torchrec_sid.models.dlrm import SidDLRM
from torchrec_sid.quantizers.mmq import MMQ
from torchrec_sid.serving.artifact import RankerArtifact
from torchrec_sid.serving.export import export_ranker, sid_table_version
from torchrec_sid.serving.scorer import Scorer
from torchrec_sid.sid import SemanticIds

NUM_ITEMS, D, MAX_HISTORY = 12, 8, 6
SCHEMA = FeatureSchema({"user_id": 5, "genre": 4}, 2, NUM_ITEMS, "item_id", "history_item_ids", "history_ts", "ts")
# ordinal digits, so SIDE reads them too
SIDS = SemanticIds(torch.stack([torch.arange(NUM_ITEMS) % 3, torch.arange(NUM_ITEMS) // 3 % 4,
                                torch.arange(NUM_ITEMS) % 2], 1), [3, 4, 2], "dpca", {},
                   digit_centres=[1.0, 1.5, 0.5])
OPTIONS = {"dmqn": {"num_codebooks": 2, "codebook_size": 3, "latent_dim": 4, "num_layers": 1, "attention_dim": 4,
                    "attention_hidden_dims": (8,)},
           "din": {"attention_hidden_dims": (8,)}, "sim": {"top_k": 3}, "pma": {"num_outputs": 2, "num_heads": 2},
           "pooling": {}, "none": {}}
# every history block once, every item representation alone or with the others (an export takes seconds)
CASES = [(("id", "sid", "side", "soft_sid"), "dmqn"), (("sid",), "din"), (("side",), "sim"), (("id",), "pma"),
         (("soft_sid",), "pooling"), (("sid",), "none")]
_ARTIFACTS: dict[tuple[tuple[str, ...], str], tuple[SidDLRM, RankerArtifact]] = {}


def _tokenizer() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    signals = {"text": torch.randn(NUM_ITEMS, 6, generator=g)}
    q = MMQ({"text": "mse"}, num_shared=1, num_specific=1, codebook_size=4, latent_dim=4, hidden_dim=8, max_epochs=1,
            batch_size=4, init_rows=NUM_ITEMS, valid_frac=0.25, seed=0).fit(signals)
    return q.model_, signals


def tiny_model(representation: tuple[str, ...], block: str) -> SidDLRM:
    torch.manual_seed(0)
    config = ModelConfig(embedding_dim=D, item_representation=representation, history_block=block,
                         history_options=OPTIONS[block], max_history=MAX_HISTORY, dense_layers=(8,), over_layers=(8,))
    tokenizer, signals = _tokenizer() if "soft_sid" in representation else (None, None)
    return SidDLRM.from_config(config, SCHEMA, SIDS, signals, tokenizer).eval()  # type: ignore[arg-type]


def exported(representation: tuple[str, ...], block: str, folder: Path) -> tuple[SidDLRM, RankerArtifact]:
    """The tiny model of a case and its artifact, exported once per test session."""
    key = (representation, block)
    if key not in _ARTIFACTS:
        model = tiny_model(representation, block)
        _ARTIFACTS[key] = model, export_ranker(model, folder / f"{'-'.join(representation)}-{block}.pt2", SIDS)
    return _ARTIFACTS[key]


def eager_logits(model: SidDLRM, user: int, history: list[int], candidates: list[int], now: int = 5000,
                 dense: tuple[float, float] = (0.5, -1.0)) -> torch.Tensor:
    """The training model's logits: C examples that share the user, the history and the pooled features."""
    c, n = len(candidates), len(history)
    times = [1000 + 10 * i for i in range(n)]
    values = [torch.full((c,), user), torch.full((c,), 1), torch.tensor(candidates),
              torch.tensor(history * c, dtype=torch.long), torch.tensor(times * c, dtype=torch.long),
              torch.full((c,), now)]
    lengths = [torch.ones(c), torch.ones(c), torch.ones(c), torch.full((c,), n), torch.full((c,), n), torch.ones(c)]
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=["user_id", "genre", "item_id", "history_item_ids", "history_ts",
                                                    "ts"], values=torch.cat(values), lengths=torch.cat(lengths).int())
    with torch.no_grad():
        return model(torch.tensor(dense).expand(c, 2), kjt)


def request(user: int, history: list[int], candidates: list[int], now: int = 5000) -> dict:
    return {"history_timestamps": [1000 + 10 * i for i in range(len(history))], "timestamp": now,
            "dense": [0.5, -1.0], "features": {"user_id": [user], "genre": [1]}}


@pytest.mark.slow
@pytest.mark.parametrize("representation, block", CASES, ids=[f"{'+'.join(r)}-{b}" for r, b in CASES])
def test_exported_scores_equal_the_eager_model(representation: tuple[str, ...], block: str,
                                               tmp_path_factory: pytest.TempPathFactory) -> None:
    model, artifact = exported(representation, block, tmp_path_factory.mktemp("artifacts"))
    scorer = Scorer(artifact)
    # longer than max_history (the most recent 6 kept), short, empty; several candidates and one
    for history, candidates in (([3, 1, 4, 1, 5, 9, 2, 6, 5], [0, 5, 11, 3]), ([7, 2], [4, 8, 8]), ([], [1, 2]),
                                ([6, 7, 8], [10])):
        expected = eager_logits(model, 2, history, candidates)
        for _ in range(2):  # DMQN: computed, then from the cache
            got = scorer.score(2, history, candidates, **request(2, history, candidates))
            torch.testing.assert_close(got, torch.sigmoid(expected), rtol=1e-5, atol=1e-6)
    assert artifact.manifest["sid_table_version"] == sid_table_version(SIDS)
    assert artifact.stateful == (block == "dmqn")


def test_sid_table_version_names_the_codes() -> None:
    other = SemanticIds(SIDS.codes.flip(0), SIDS.cardinalities, "dpca", {}, digit_centres=SIDS.digit_centres)
    assert sid_table_version(SIDS) == sid_table_version(SemanticIds(SIDS.codes.clone(), [3, 4, 2], "dpca", {}))
    assert sid_table_version(other) != sid_table_version(SIDS)
    assert sid_table_version(None) == "none"


def test_a_file_that_is_not_an_artifact_is_refused(tmp_path: Path) -> None:
    (tmp_path / "x.pt2").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable .pt2 ranker artifact"):
        RankerArtifact.load(tmp_path / "x.pt2")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        RankerArtifact.load(tmp_path / "missing.pt2")


# A fresh interpreter in which the package's upper layers and TorchRec cannot be imported at all.
_FRESH = """
import importlib.abc, json, sys
BLOCKED = ("torchrec_sid.train", "torchrec_sid.quantizers", "torchrec_sid.data", "torchrec_sid.models",
           "torchrec_sid.modules", "torchrec_sid.jobs", "torchrec")
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ImportError(f"{name} is blocked in this test")
sys.meta_path.insert(0, Block())
import torch
from torchrec_sid.serving.artifact import RankerArtifact
artifact = RankerArtifact.load(sys.argv[1])
ids = torch.tensor([[3, 1, 4, 0]]); mask = torch.tensor([[True, True, True, False]])
ages = torch.tensor([[1000.0, 1010.0, 1020.0, 0.0]])  # event times 1000, 1010, 1020; request time 0
clusters, cluster_mask = artifact.encode(ids, mask, ages)
logits = artifact.score_state(torch.tensor([0, 5, 11]), clusters, cluster_mask, torch.tensor([2, 2, 2, 1, 1, 1]),
                              torch.ones(6, dtype=torch.int32), torch.tensor([[0.5, -1.0]]).expand(3, 2))
loaded = sorted({m.split(".")[0] for m in sys.modules if not m.startswith("_")} & {"torchrec", "torchrec_sid",
                                                                                  "fbgemm_gpu", "yaml", "pandas"})
print(json.dumps({"logits": logits.tolist(), "model_version": artifact.manifest["model_version"],
                  "sid_table_version": artifact.manifest["sid_table_version"], "loaded": loaded,
                  "package": sorted(m for m in sys.modules if m.startswith("torchrec_sid"))}))
"""


@pytest.mark.slow
def test_a_fresh_process_loads_the_artifact_with_torch_alone(tmp_path_factory: pytest.TempPathFactory) -> None:
    model, artifact = exported(*CASES[0], tmp_path_factory.mktemp("artifacts"))
    run = subprocess.run([sys.executable, "-c", _FRESH, str(artifact.path)], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["package"] == ["torchrec_sid", "torchrec_sid.serving", "torchrec_sid.serving.artifact"]
    assert out["loaded"] == ["fbgemm_gpu", "torchrec_sid"]  # FBGEMM's operators; no TorchRec, YAML, pandas
    assert out["sid_table_version"] == sid_table_version(SIDS)
    torch.testing.assert_close(torch.tensor(out["logits"]), eager_logits(model, 2, [3, 1, 4], [0, 5, 11], now=0),
                               rtol=1e-5, atol=1e-6)
