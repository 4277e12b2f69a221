"""RQ-KMeans and RQ-GMM: recovery, determinism, files, bad inputs, history, metrics."""

import itertools
from pathlib import Path

import pytest
import torch

from torchrec_sid.io import ChecksumError
from torchrec_sid.quantizers import QUANTIZERS, RQGMM, NotFittedError, Quantizer, RQKMeans, build_quantizer
from torchrec_sid.quantizers.metrics import perplexity, quality_report, recall_at_k, rmse, utilization
from torchrec_sid.sid import SemanticIds

METHODS = ["rq_kmeans", "rq_gmm"]
SMALL = {"levels": 2, "codebook_size": 8, "chunk_size": 256}


def blobs(num_items: int = 800, dim: int = 16, clusters: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Well-separated Gaussian blobs with different spreads: ``(x: [N, D], planted cluster: [N])``."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, dim, generator=g) * 10
    spread = 0.5 + torch.rand(clusters, generator=g)
    label = torch.randint(clusters, (num_items,), generator=g)
    return centres[label] + torch.randn(num_items, dim, generator=g) * spread[label, None], label


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    return blobs()


@pytest.fixture(scope="module", params=METHODS)
def fitted(request, data) -> Quantizer:
    return build_quantizer(request.param, **SMALL).fit(data[0])


def same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two labelings of the same items are equal up to relabelling."""
    pairs = torch.unique(torch.stack([a, b], dim=1), dim=0)
    return len(pairs) == len(torch.unique(a)) == len(torch.unique(b))


def test_registry_holds_both_methods():
    assert {"rq_kmeans": RQKMeans, "rq_gmm": RQGMM}.items() <= QUANTIZERS.items()


def test_planted_clusters_recovered(fitted, data):
    x, label = data
    codes = fitted.encode(x)
    assert codes.shape == (len(x), 2) and codes.dtype == torch.long
    assert same_partition(codes[:, 0], label)


def test_decode_of_encode_reconstructs(fitted, data):
    x, _ = data
    codes = fitted.encode(x)
    first_level = rmse(x, fitted.decode(codes[:, :1]))
    both_levels = rmse(x, fitted.decode(codes))
    assert both_levels < first_level < 1.6  # blob spreads are in [0.5, 1.5]


@pytest.mark.parametrize("method", METHODS)
def test_fit_is_deterministic_under_seed(method, data):
    x, _ = data
    a = build_quantizer(method, **SMALL, seed=3).fit(x)
    b = build_quantizer(method, **SMALL, seed=3).fit(x)
    assert torch.equal(a.codebooks_, b.codebooks_)
    assert torch.equal(a.encode(x), b.encode(x))
    assert a.history_ == b.history_


def test_rq_gmm_at_least_as_good_as_rq_kmeans_on_separated_blobs():
    # Well-separated blobs with unequal spreads, one level of K = number of blobs: both recover the blobs and
    # RQ-GMM's MAP read-out of its EM means must reconstruct at least as well (up to float rounding). On
    # overlapping or anisotropic data RQ-GMM's hard RMSE can be worse: EM maximises likelihood, not MSE.
    x, label = blobs(num_items=1200, dim=32, clusters=12, seed=1)
    kmeans = RQKMeans(levels=1, codebook_size=12).fit(x)
    gmm = RQGMM(levels=1, codebook_size=12).fit(x)
    assert same_partition(gmm.encode(x)[:, 0], label) and same_partition(kmeans.encode(x)[:, 0], label)
    assert rmse(x, gmm.decode(gmm.encode(x))) <= rmse(x, kmeans.decode(kmeans.encode(x))) * (1 + 1e-6)


def test_quantizer_save_load_round_trip(fitted, data, tmp_path: Path):
    x, _ = data
    path = fitted.save(tmp_path / "q.safetensors")
    loaded = Quantizer.load(path)
    assert type(loaded) is type(fitted)
    assert loaded.get_params() == fitted.get_params()
    assert loaded.history_ == fitted.history_
    assert torch.equal(loaded.encode(x), fitted.encode(x))
    assert torch.equal(type(fitted).load(path).decode(fitted.encode(x)), fitted.decode(fitted.encode(x)))


def test_load_as_the_wrong_class_raises(data, tmp_path: Path):
    path = RQKMeans(**SMALL).fit(data[0]).save(tmp_path / "q.safetensors")
    with pytest.raises(ValueError, match="holds a 'rq_kmeans' quantizer, not a RQGMM"):
        RQGMM.load(path)
    with pytest.raises(ValueError, match="holds a 'quantizer' artifact, expected 'semantic_ids'"):
        SemanticIds.load(path)


def test_semantic_ids_save_load_round_trip(fitted, data, tmp_path: Path):
    x, _ = data
    sids = fitted.semantic_ids(x, quality_report(fitted, x, num_queries=50))
    loaded = SemanticIds.load(sids.save(tmp_path / "sids.safetensors"))
    assert torch.equal(loaded.codes, sids.codes)
    assert loaded.cardinalities == [8, 8]
    assert loaded.quantizer == fitted.name
    assert loaded.config == fitted.get_params()
    assert loaded.metrics == sids.metrics
    assert loaded.format_version == sids.format_version


def _saved_sids(tmp_path: Path, format_version: int = 1) -> Path:
    codes = torch.arange(40).view(20, 2) % 7
    return SemanticIds(codes, [7, 7], "rq_kmeans", {"levels": 2}, {"rmse": 0.5}, format_version).save(
        tmp_path / "sids.safetensors")


def test_tampered_tensor_bytes_refused(tmp_path: Path):
    path = _saved_sids(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x01  # inside the codes tensor, which is stored last
    path.write_bytes(bytes(raw))
    with pytest.raises(ChecksumError, match=rf"{path}.* was modified or corrupted: sha256"):
        SemanticIds.load(path)


def test_tampered_metadata_refused(tmp_path: Path):
    path = _saved_sids(tmp_path)
    path.write_bytes(path.read_bytes().replace(b'\\"rmse\\":0.5', b'\\"rmse\\":0.1'))
    with pytest.raises(ChecksumError, match="was modified or corrupted"):
        SemanticIds.load(path)


def test_truncated_file_refused(tmp_path: Path):
    path = _saved_sids(tmp_path)
    path.write_bytes(path.read_bytes()[:-16])
    with pytest.raises(ChecksumError, match=rf"{path} is truncated or corrupt"):
        SemanticIds.load(path)


def test_other_format_version_refused(tmp_path: Path):
    path = _saved_sids(tmp_path, format_version=2)
    with pytest.raises(ValueError, match="has format version 2; this library reads version 1"):
        SemanticIds.load(path)


@pytest.mark.parametrize("method", METHODS)
def test_bad_inputs_raise_clear_errors(method, data):
    x, _ = data
    q = build_quantizer(method, **SMALL)
    for bad_value in (float("nan"), float("inf")):
        bad = x.clone()
        bad[5, 3] = bad_value
        with pytest.raises(ValueError, match=r"non-finite values \(NaN or inf\) in row 5"):
            q.fit(bad)
    with pytest.raises(ValueError, match="empty"):
        q.fit(torch.empty(0, 16))
    with pytest.raises(ValueError, match="2-D"):
        q.fit(torch.zeros(16))
    with pytest.raises(ValueError, match="needs at least codebook_size=8 items to fit, got 5"):
        q.fit(x[:5])
    with pytest.raises(NotFittedError, match="not fitted"):
        q.encode(x)
    q.fit(x)
    with pytest.raises(ValueError, match="has D=7 columns, expected D=16"):
        q.encode(x[:, :7])
    with pytest.raises(ValueError, match=r"codes\[0, 1\] = 8 is outside \[0, 8\)"):
        q.decode(torch.tensor([[0, 8]]))


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="unknown quantizer 'rq_nope'"):
        build_quantizer("rq_nope")
    with pytest.raises(ValueError, match=r"unknown settings \['codebook'\] for quantizer 'rq_gmm'"):
        build_quantizer("rq_gmm", codebook=8)
    x, _ = blobs(num_items=40)
    with pytest.raises(ValueError, match="codebook_size must be an integer >= 1, got 0"):
        RQKMeans(codebook_size=0).fit(x)  # checked by fit, not the constructor
    with pytest.raises(ValueError, match=r"residual must be one of \['hard', 'posterior_mean'\], got 'soft'"):
        RQGMM(residual="soft").fit(x)
    with pytest.raises(ValueError, match=r"min_variance must be a number > 0.0, got 0.0"):
        RQGMM(min_variance=0.0).fit(x)


class ScalarLog:
    """Stands in for a TensorBoard SummaryWriter."""

    def __init__(self) -> None:
        self.scalars: list[tuple[str, float, int]] = []

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, value, step))


def test_history_and_tensorboard_record_every_iteration(data):
    x, _ = data
    log = ScalarLog()
    q = RQGMM(**SMALL, tol=0.0, max_iter=6, init_iter=2).fit(x, progress=True, writer=log)
    assert all(h["rmse"] > 0 for h in q.history_)
    assert all(h["utilization"] == 1.0 for h in q.history_ if h["stage"] in ("kmeans_init", "em"))
    for level in range(2):
        init = [h["iteration"] for h in q.history_ if h["level"] == level and h["stage"] == "kmeans_init"]
        em = [h for h in q.history_ if h["level"] == level and h["stage"] == "em"]
        assert init == [0, 1] and [h["iteration"] for h in em] == list(range(len(em))) and 2 <= len(em) <= 6
        ll = [h["log_likelihood"] for h in em]  # EM never lowers the likelihood (nothing was re-seeded here)
        assert all(b >= a - 1e-9 * abs(a) for a, b in itertools.pairwise(ll))
    last = q.history_[-1]
    assert ("rq_gmm/em/level_1/log_likelihood", last["log_likelihood"], last["iteration"]) in log.scalars
    assert {tag.split("/")[-1] for tag, _, _ in log.scalars} >= {"rmse", "utilization", "log_likelihood", "max_share"}
    assert any("/kmeans_init_progressive/dims_1/level_0/" in tag for tag, _, _ in log.scalars)  # one curve per stage


def test_responsibilities_agree_with_codes(data):
    x, _ = data
    q = RQGMM(**SMALL).fit(x)
    codes = q.encode(x)
    for level in range(2):
        probs, components = q.responsibilities(x, level, top_k=3)
        assert probs.shape == components.shape == (len(x), 3)
        assert torch.equal(components[:, 0], codes[:, level])
        assert (probs.sum(1) <= 1 + 1e-5).all() and (probs[:, :-1] >= probs[:, 1:]).all()
    with pytest.raises(ValueError, match=r"level must be in \[0, 2\), got 2"):
        q.responsibilities(x, 2)


def test_posterior_mean_residual_fits(data):
    x, label = data
    q = RQGMM(**SMALL, residual="posterior_mean").fit(x)
    assert same_partition(q.encode(x)[:, 0], label)


def test_metrics_on_known_cases():
    codes = torch.tensor([[0, 0], [1, 0], [2, 0], [3, 0]])
    assert utilization(codes, [4, 8]) == [1.0, 0.125]
    assert perplexity(codes, [4, 8]) == pytest.approx([4.0, 1.0])
    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(0))
    assert recall_at_k(x, x, ks=(20, 50)) == {"recall@20": 1.0, "recall@50": 1.0}
    assert recall_at_k(x, torch.randn(300, 8), ks=(20,), num_queries=100)["recall@20"] < 0.3
    with pytest.raises(ValueError, match=r"neighbour counts must be in \[1, N\) with N=300 items, got \[300\]"):
        recall_at_k(x, x, ks=(300,))


def test_quality_report(fitted, data):
    x, _ = data
    report = quality_report(fitted, x, num_queries=100)
    assert report["num_items"] == len(x)
    assert report["utilization"] == [1.0, 1.0]
    assert report["rmse_per_level"][-1] == pytest.approx(report["rmse"])
    assert report["rmse_per_level"][0] > report["rmse"]
    assert 0 <= report["cosine_loss"] < 0.05
    assert 0 < report["collision_rate"] <= 1
    assert {"recall@20", "recall@50", "recall@100"} <= report.keys()
