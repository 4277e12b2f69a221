from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.export import Dim, ShapesCollection
from torchrec.fx import symbolic_trace
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_sid.modules import SIDEmbedding
from torchrec_sid.quantizers import QUANTIZERS, build_quantizer
from torchrec_sid.sid import SemanticIds
from torchrec_sid.sid.packing import pack_codes, unpack_codes

RADICES = [3, 3, 4, 2, 5]  # mixed: ternary, FSQ-like levels, a binary digit


def sids_batch() -> KeyedJaggedTensor:
    """3 examples of packed SIDs (ids in [0, 360)).

    candidate_sid  [7]        [359]   [0]
    history_sids   [5, 100]   []      [1, 2, 300]
    """
    return KeyedJaggedTensor.from_lengths_sync(
        keys=["candidate_sid", "history_sids"],
        values=torch.tensor([7, 359, 0, 5, 100, 1, 2, 300]),
        lengths=torch.tensor([1, 1, 1, 2, 0, 3]),
    )


def side(**settings) -> SIDEmbedding:
    torch.manual_seed(0)
    return SIDEmbedding(RADICES, **({"embedding_dim": 6} | settings))


@pytest.mark.parametrize("radices", [RADICES, [4, 2, 64, 8]])  # division; shifts and masks (powers of two)
def test_unpack_inverts_pack_for_every_id(radices: list[int]) -> None:
    module = SIDEmbedding(radices, embedding_dim=2)
    every = torch.arange(math.prod(radices))
    digits = module.unpack(every)
    assert torch.equal(digits, unpack_codes(every, radices))
    assert torch.equal(pack_codes(digits, radices), every)
    all_codes = torch.tensor(list(itertools.product(*[range(r) for r in radices])))
    assert torch.equal(module.unpack(pack_codes(all_codes, radices)), all_codes)


def test_digits_are_centred() -> None:
    ternary = SIDEmbedding([3, 3], embedding_dim=2)
    assert ternary.digits(torch.arange(9)).unique().tolist() == [-1.0, 0.0, 1.0]  # DPCA's {-1, 0, 1}
    fsq = SIDEmbedding([4], embedding_dim=2)
    assert fsq.digits(torch.arange(4)).flatten().tolist() == [-1.5, -0.5, 0.5, 1.5]  # FSQ level L=4: (L - 1) / 2
    custom = SIDEmbedding([4], embedding_dim=2, centres=[0.0])
    assert custom.digits(torch.arange(4)).flatten().tolist() == [0.0, 1.0, 2.0, 3.0]


def test_forward_projects_centred_digits() -> None:
    module = side(bias=True)
    packed = torch.tensor([[7, 359], [0, 180]])  # any shape: [2, 2] -> [2, 2, 6]
    digits = unpack_codes(packed, RADICES).float() - torch.tensor([(r - 1) / 2 for r in RADICES])
    torch.testing.assert_close(module(packed), digits @ module.projection + module.bias)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("per_level", [False, True])
def test_pooled_and_sequence_agree(bias: bool, per_level: bool) -> None:
    module, features = side(bias=bias, per_level_projections=per_level), sids_batch()
    sequence = module.sequence(features, "history_sids")
    assert sequence.lengths().tolist() == [2, 0, 3]
    torch.testing.assert_close(sequence.values(), module(torch.tensor([5, 100, 1, 2, 300])))
    per_event = sequence.values()
    expected_sum = torch.stack([per_event[:2].sum(0), torch.zeros(module.output_dim), per_event[2:].sum(0)])
    torch.testing.assert_close(module.pooled(features, "history_sids"), expected_sum)
    expected_mean = torch.stack([per_event[:2].mean(0), torch.zeros(module.output_dim), per_event[2:].mean(0)])
    torch.testing.assert_close(module.pooled(features, "history_sids", mean=True), expected_mean)
    torch.testing.assert_close(module.pooled(features, "candidate_sid"), module(torch.tensor([7, 359, 0])))


def test_per_level_projections_give_one_slice_per_level() -> None:
    module = side(per_level_projections=True, embedding_dim=4)
    assert module.output_dim == 5 * 4
    out = module(torch.tensor([0, 1]))  # differ only in level 0 (0 -> 1)
    assert not torch.equal(out[0, :4], out[1, :4]) and torch.equal(out[0, 4:], out[1, 4:])


@pytest.mark.parametrize("per_level", [False, True])
def test_projection_gradients_flow(per_level: bool) -> None:
    module = side(bias=True, per_level_projections=per_level)
    (module.pooled(sids_batch(), "history_sids").sum() + module.sequence(sids_batch(), "history_sids").values().pow(2)
     .sum()).backward()
    assert module.projection.grad is not None and (module.projection.grad != 0).all()
    assert module.bias.grad is not None and (module.bias.grad != 0).all()


@pytest.mark.parametrize(("per_level", "bias", "expected"), [(False, False, 5 * 6), (False, True, 5 * 6 + 6),
                                                               (True, False, 5 * 6), (True, True, 5 * 6 + 5 * 6)])
def test_parameter_count_is_what_it_claims(per_level: bool, bias: bool, expected: int) -> None:
    module = side(per_level_projections=per_level, bias=bias)
    assert sum(p.numel() for p in module.parameters()) == expected
    assert SIDEmbedding.num_parameters(RADICES, 6, per_level, bias) == expected
    assert list(module.state_dict()) == ["projection"] + (["bias"] if bias else [])  # no table, no buffers


def test_from_semantic_ids_reads_radices_and_centres() -> None:
    codes = torch.tensor([[0, 2, 3], [2, 1, 0]])
    ordinal = SemanticIds(codes, [3, 3, 4], "dpca", {}, digit_centres=[1.0, 1.0, 1.5])
    side_all = SIDEmbedding.from_semantic_ids(ordinal, embedding_dim=4)
    assert side_all.radices == [3, 3, 4] and side_all.centres.tolist() == [1.0, 1.0, 1.5]
    side_two = SIDEmbedding.from_semantic_ids(ordinal, embedding_dim=4, num_levels=2, bias=True)
    assert side_two.radices == [3, 3] and side_two.centres.tolist() == [1.0, 1.0] and side_two.bias is not None
    with pytest.raises(ValueError, match="SIDEmbedding: num_levels=4 requested, the SemanticIds artifact has 3"):
        SIDEmbedding.from_semantic_ids(ordinal, embedding_dim=4, num_levels=4)


@pytest.mark.parametrize(("name", "settings"), [
    ("fsq", {"levels": (4, 3, 5), "hidden_dim": 16, "max_epochs": 1, "init_rows": 64}),
    ("dpca", {"groups": 2, "depth": 2, "latent_dim": 8, "hidden_dim": 16, "max_epochs": 1, "init_rows": 64}),
])
def test_embeds_the_packed_codes_of_an_ordinal_quantizer(name: str, settings: dict) -> None:
    if name not in QUANTIZERS:
        pytest.skip(f"quantizer {name!r} is not registered")
    x = torch.nn.functional.normalize(torch.randn(64, 16, generator=torch.Generator().manual_seed(0)), dim=1)
    sids = build_quantizer(name, **settings).fit(x).semantic_ids(x)
    module = SIDEmbedding.from_semantic_ids(sids, embedding_dim=4)
    packed = pack_codes(sids.codes, sids.cardinalities)
    assert torch.equal(module.unpack(packed), sids.codes)
    torch.testing.assert_close(module.digits(packed), sids.codes - torch.tensor(sids.digit_centres))


def test_from_semantic_ids_leaves_out_the_collision_suffix_and_refuses_it_by_name(tmp_path: Path) -> None:
    """The suffix numbers items sharing a code: by default SIDE reads the levels before it, and asking for the suffix
    level raises naming it; an artifact saved before ``suffix_level`` existed reads it from its config."""
    codes = torch.tensor([[0, 2, 3], [0, 2, 3], [2, 1, 0]])
    sids = SemanticIds(codes, [3, 3, 4], "dpca", {}, digit_centres=[1.0, 1.0, 1.5]).with_collision_suffix()
    assert sids.suffix_level == 3 and sids.code_levels == 3 and sids.codes[:, 3].tolist() == [0, 1, 0]
    module = SIDEmbedding.from_semantic_ids(sids, embedding_dim=4)
    assert module.radices == [3, 3, 4]
    with pytest.raises(ValueError, match=r"num_levels=4 would read level 3, the collision suffix .*cardinality 2"):
        SIDEmbedding.from_semantic_ids(sids, embedding_dim=4, num_levels=4)
    sids.save(tmp_path / "new.safetensors")
    assert SemanticIds.load(tmp_path / "new.safetensors").suffix_level == 3
    old_style = SemanticIds(sids.codes, sids.cardinalities, "dpca", {"collision_suffix": True},
                            digit_centres=sids.digit_centres)  # what older files hold: no suffix_level field
    old_style.save(tmp_path / "old.safetensors")
    assert SemanticIds.load(tmp_path / "old.safetensors").suffix_level == 3


def test_from_semantic_ids_refuses_categorical_codes() -> None:
    categorical = SemanticIds(torch.tensor([[0, 2], [2, 1]]), [3, 3], "rq_kmeans", {})
    with pytest.raises(ValueError, match="artifact of quantizer 'rq_kmeans' has categorical codes"):
        SIDEmbedding.from_semantic_ids(categorical, embedding_dim=4)


@pytest.mark.parametrize("bad", [360, -1])
def test_out_of_range_packed_ids_raise_with_feature_id_and_limit(bad: int) -> None:
    features = KeyedJaggedTensor.from_lengths_sync(keys=["history_sids"], values=torch.tensor([3, bad]),
                                                   lengths=torch.tensor([2]))
    message = rf"SIDEmbedding: feature 'history_sids' has packed SID {bad}, outside \[0, 360\) for radices \[3, 3, 4, 2"
    with pytest.raises(ValueError, match=message):
        side().sequence(features, "history_sids")
    with pytest.raises(ValueError, match=message):
        side().pooled(features, "history_sids")
    with pytest.raises(ValueError, match=rf"SIDEmbedding: input has packed SID {bad}, outside \[0, 360\)"):
        side()(torch.tensor([bad]))


def test_bad_settings_raise() -> None:
    with pytest.raises(ValueError, match="SIDEmbedding: 2 centres for 5 levels"):
        SIDEmbedding(RADICES, 4, centres=[1.0, 1.0])
    with pytest.raises(ValueError, match="SIDEmbedding: embedding_dim must be >= 1, got 0"):
        SIDEmbedding(RADICES, 0)
    with pytest.raises(ValueError, match=r"radices must be a non-empty list of integers >= 1, got \[3, 0\]"):
        SIDEmbedding([3, 0], 4)
    with pytest.raises(ValueError, match="more than int64 holds"):
        SIDEmbedding([256] * 8, 4)


class PooledAndSequence(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.side = side(bias=True)

    def forward(self, features: KeyedJaggedTensor) -> Tensor:
        events = self.side.sequence(features, "history_sids").values()
        return torch.cat([self.side.pooled(features, "candidate_sid"), self.side.pooled(features, "history_sids"),
                          events.sum(dim=0, keepdim=True)])


def test_fx_traced_matches_eager() -> None:
    model = PooledAndSequence()
    torch.testing.assert_close(symbolic_trace(model)(sids_batch()), model(sids_batch()))


def _save_and_load(exported: torch.export.ExportedProgram, path: Path) -> nn.Module:
    torch.export.save(exported, path)
    with torch.serialization.safe_globals([KeyedJaggedTensor]):  # the example input is saved with the program
        return torch.export.load(path).module()


def test_export_with_dynamic_kjt_shapes_saves_and_reloads(tmp_path: Path) -> None:
    model, example = PooledAndSequence(), sids_batch()
    shapes = ShapesCollection()
    shapes[example.values()] = {0: Dim.AUTO}
    shapes[example.lengths()] = {0: Dim.AUTO}
    exported = torch.export.export(model, (example,), dynamic_shapes=shapes.dynamic_shapes(model, (example,)),
                                   strict=False)
    reloaded = _save_and_load(exported, tmp_path / "side.pt2")
    other = KeyedJaggedTensor.from_lengths_sync(keys=["candidate_sid", "history_sids"],
                                                values=torch.tensor([3, 4, 10, 11, 12, 13, 14, 15]),
                                                lengths=torch.tensor([1, 1, 0, 6]))
    torch.testing.assert_close(reloaded(other), model(other))


@pytest.mark.parametrize("radices", [RADICES, [4, 64]], ids=["division", "shifts"])
def test_export_of_packed_lookup_saves_and_reloads(radices: list[int], tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = SIDEmbedding(radices, embedding_dim=3)
    packed = torch.tensor([7, 8, 0])
    exported = torch.export.export(module, (packed,), dynamic_shapes=({0: Dim.AUTO},), strict=False)
    reloaded = _save_and_load(exported, tmp_path / "side.pt2")
    other = torch.tensor([1, 2, 3, math.prod(radices) - 1, 0])
    torch.testing.assert_close(reloaded(other), module(other))
