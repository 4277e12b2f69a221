"""Versioned SID tables: deltas keep every existing SID bit-identical and give colliding new items the next free
suffix; re-fits come with a stability report; bad input names the version, the file and the field, and writes
nothing; the CLI verbs; memory-mapped fitting and streaming encoding."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from torchrec_sid.cli import main
from torchrec_sid.io import ChecksumError
from torchrec_sid.jobs.scale import encode_streaming, fit_sampled, open_embeddings
from torchrec_sid.quantizers.base import build_quantizer
from torchrec_sid.sid import SemanticIds
from torchrec_sid.sid.versions import SidStore, SidTable, SidVersionError, compare


def _sids() -> SemanticIds:
    """8 items, 2 levels (4, 3), with collisions: items 0, 2, 5 share (1, 2); 3 and 7 share (0, 0)."""
    codes = torch.tensor([[1, 2], [3, 1], [1, 2], [0, 0], [2, 2], [1, 2], [3, 0], [0, 0]])
    return SemanticIds(codes, [4, 3], "rq_kmeans", {}).with_collision_suffix()


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != ".lock"}


def test_a_delta_keeps_old_sids_and_numbers_collisions_on(tmp_path: Path) -> None:
    store = SidStore(tmp_path / "store")
    assert store.create(_sids(), suffix_capacity=5) == 1
    v1 = store.table(1)
    assert v1.cardinalities == [4, 3, 5] and v1.codes[:, 2].tolist() == [0, 0, 1, 0, 0, 2, 0, 1]
    new_codes = torch.tensor([[1, 2], [2, 1], [0, 0], [1, 2]])
    assert store.add_items(torch.tensor([8, 9, 10, 11]), new_codes, parent=1) == 2
    v2 = SidStore(tmp_path / "store").table(2)  # a fresh reader resolves the delta on its parent
    assert torch.equal(v2.codes_of(torch.arange(8)), v1.codes)  # bit-identical
    assert v2.codes_of(torch.tensor([8, 9, 10, 11])).tolist() == [[1, 2, 3], [2, 1, 0], [0, 0, 2], [1, 2, 4]]
    assert v2.codes_of(torch.tensor([12, -1])).tolist() == [[-1, -1, -1]] * 2
    assert store.entry(2)["kind"] == "delta" and store.entry(2)["items"] == 12
    with pytest.raises(SidVersionError, match=r"new item 0 has code \[1, 2\], which 5 items already hold; the "
                                              r"collision suffix capacity is 5"):
        store.add_items(torch.tensor([12]), torch.tensor([[1, 2]]), parent=2)


def test_a_store_reader_picks_up_a_new_version(tmp_path: Path) -> None:
    writer, reader = SidStore(tmp_path), SidStore(tmp_path)
    writer.create(_sids(), suffix_capacity=4)
    assert reader.codes_of(torch.tensor([8])).tolist() == [[-1, -1, -1]]
    writer.add_items(torch.tensor([8]), torch.tensor([[2, 0]]), parent=1)
    assert reader.codes_of(torch.tensor([8])).tolist() == [[2, 0, 0]]


def test_bad_input_names_the_version_file_and_field_and_writes_nothing(tmp_path: Path) -> None:
    store = SidStore(tmp_path / "a")
    store.create(_sids(), suffix_capacity=4)
    store.add_items(torch.tensor([8]), torch.tensor([[2, 0]]), parent=1)
    before = _files(tmp_path / "a")
    with pytest.raises(SidVersionError, match=r"delta on version 1, but the latest version in .*versions.json is 2"):
        store.add_items(torch.tensor([9]), torch.tensor([[2, 0]]), parent=1)
    with pytest.raises(SidVersionError, match=r"version 7 does not exist in .*versions.json \(versions 1..2\)"):
        store.table(7)
    with pytest.raises(ValueError, match=r"version 3 of .*: field codes\[1, 1\] = 3 is outside \[0, 3\) at level 1"):
        store.add_items(torch.tensor([9, 10]), torch.tensor([[2, 0], [0, 3]]), parent=2)
    with pytest.raises(SidVersionError, match=r"field item_ids: item 3 is already in version 2"):
        store.add_items(torch.tensor([3]), torch.tensor([[2, 0]]), parent=2)
    assert _files(tmp_path / "a") == before  # nothing written, not even half
    # a delta made on another parent: copy store b's version 2 into store a
    other = SidStore(tmp_path / "b")
    other.create(SemanticIds(torch.tensor([[0, 1]] * 8), [4, 3], "rq_kmeans", {}).with_collision_suffix(),
                 suffix_capacity=9)
    other.add_items(torch.tensor([8]), torch.tensor([[2, 0]]), parent=1)
    (tmp_path / "a" / "v000002.safetensors").write_bytes((tmp_path / "b" / "v000002.safetensors").read_bytes())
    index = json.loads(store.index_path.read_text())
    index["versions"]["2"]["sha256"] = other.entry(2)["sha256"]
    store.index_path.write_text(json.dumps(index))
    with pytest.raises(SidVersionError, match=r"version 2 \(.*a/v000002.safetensors\): field parent_sha256 does "
                                              r"not match version 1"):
        SidStore(tmp_path / "a").table(2)
    index["versions"]["2"]["sha256"] = "0" * 64
    store.index_path.write_text(json.dumps(index))
    with pytest.raises(ChecksumError, match=r"version 2 \(.*v000002.safetensors\): sha256 differs"):
        SidStore(tmp_path / "a").table(2)


def test_a_refit_reports_stability_and_the_remap(tmp_path: Path) -> None:
    store = SidStore(tmp_path)
    sids = _sids()
    store.create(sids)
    relabelled = sids.codes[:, :2].clone()
    relabelled[:, 0] = (relabelled[:, 0] + 1) % 4  # the same partition, level 0 renamed
    relabelled[0, 1] = 0  # item 0 moves at level 1
    version, report = store.publish_refit(SemanticIds(relabelled, [4, 3], "rq_kmeans", {}).with_collision_suffix())
    assert version == 2 and store.entry(2)["kind"] == "refit"
    assert report.common_items == 8 and report.added_items == 0
    first, second = report.prefix
    assert first["changed_share"] == 1.0 and first["bijective"] and first["mapped_share"] == 1.0
    assert sorted(report.remaps[1].tolist()) == [[0, 1], [1, 2], [2, 3], [3, 0]]
    assert second["changed_share"] == 1.0 and not second["bijective"] and second["mapped_share"] == 7 / 8
    assert "remap" in report.table() and json.loads(json.dumps(report.to_dict()))["remaps"]["1"]
    assert compare(store.table(1), store.table(1)).prefix[1]["changed_share"] == 0.0


def test_memory_mapped_input_of_the_wrong_shape_or_dtype_is_named(tmp_path: Path) -> None:
    np.save(tmp_path / "ints.npy", np.zeros((4, 3), dtype=np.int32))
    np.save(tmp_path / "flat.npy", np.zeros(12, dtype=np.float32))
    np.save(tmp_path / "ok.npy", np.zeros((4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"ints.npy: field dtype is int32"):
        open_embeddings(tmp_path / "ints.npy")
    with pytest.raises(ValueError, match=r"flat.npy: field shape is \[12\]; expected \[N >= 1, D >= 1\]"):
        open_embeddings(tmp_path / "flat.npy")
    with pytest.raises(ValueError, match=r"ok.npy: field shape is \[4, 3\]; expected \[N, 8\]"):
        open_embeddings(tmp_path / "ok.npy", dim=8)
    data = (tmp_path / "ok.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(data[:-8])
    with pytest.raises(ValueError, match=r"cut.npy: field shape \[4, 3\] does not match the file size"):
        open_embeddings(tmp_path / "cut.npy")


def test_sampled_fit_and_streaming_encode_match_the_in_memory_encode(tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((3000, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    mapped = open_embeddings(tmp_path / "x.npy")
    q = fit_sampled(build_quantizer("rq_kmeans", levels=2, codebook_size=8, max_iter=10, seed=0), mapped,
                    sample_rows=1000)
    codes = encode_streaming(q, mapped, chunk_rows=700)
    assert torch.equal(codes, q.encode(torch.from_numpy(x)))


def test_cli_lifecycle_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rng = np.random.default_rng(0)
    np.save(tmp_path / "emb.npy", rng.standard_normal((400, 8)).astype(np.float32))
    np.save(tmp_path / "new.npy", rng.standard_normal((20, 8)).astype(np.float32))
    np.save(tmp_path / "bad.npy", rng.standard_normal((20, 5)).astype(np.float32))
    sids, store = str(tmp_path / "sids.safetensors"), str(tmp_path / "store")
    main(["quantize", "--method", "rq_kmeans", "--levels", "2", "--codebook-size", "16", "--data",
          str(tmp_path / "emb.npy"), "--out", sids])
    main(["quantize", "publish", "--sids", sids, "--store", store, "--suffix-capacity", "64"])
    main(["quantize", "encode-new-items", "--store", store, "--data", str(tmp_path / "new.npy")])
    main(["quantize", "compare-versions", "--store", store, "--old", "1", "--new", "2"])
    out = capsys.readouterr().out
    assert "version 2 published, 20 new items" in out and "400 items in both, 20 added" in out
    assert SidStore(store).table(2).codes_of(torch.arange(400, 420)).min() >= 0
    for argv, message in (
        (["encode-new-items", "--store", store, "--data", str(tmp_path / "bad.npy")],
         "bad.npy: field shape is [20, 5]; expected [N, 8]"),
        (["compare-versions", "--store", store, "--old", "1", "--new", "9"], "version 9 does not exist in"),
        (["encode-new-items", "--store", store, "--data", str(tmp_path / "new.npy"), "--parent", "1"],
         "delta on version 1, but the latest version"),
    ):
        with pytest.raises(SystemExit):
            main(["quantize", *argv])
        assert message in capsys.readouterr().err
    assert SidStore(store).versions() == [1, 2]
    assert SidTable.from_semantic_ids(SemanticIds.load(sids)).num_items == 400


def test_streamed_synthetic_content_is_the_same_in_any_chunks() -> None:
    from torchrec_sid.data.synthetic import SyntheticConfig, item_content_rows

    config = SyntheticConfig(num_items=150_000, content_dim=4, num_clusters=8)
    whole = item_content_rows(config, 0, 150_000)
    parts = np.concatenate([item_content_rows(config, 0, 70_001), item_content_rows(config, 70_001, 150_000)])
    assert whole.shape == (150_000, 4) and np.array_equal(whole, parts)
    assert np.allclose(np.linalg.norm(whole, axis=1), 1.0, atol=1e-5)
