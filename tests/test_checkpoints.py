"""The sparse codec and the single-file format: bit-exact round trips, sizes, and errors."""
from __future__ import annotations

import json
import struct
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fxprune
from fxprune.checkpoints import codec
from fxprune.errors import PruningError

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
_INT_VIEW = {8: torch.int64, 4: torch.int32, 2: torch.int16}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns, so that equality below is bit equality (NaN == NaN, -0.0 != +0.0)."""
    return t.contiguous().view(_INT_VIEW[t.element_size()])


def canonical(t: torch.Tensor) -> torch.Tensor:
    """What the codec promises to give back: ``t`` with -0.0 as +0.0 (module docstring of the codec)."""
    return torch.where(t == 0, torch.zeros_like(t), t)


@st.composite
def sparse_tensors(draw, max_dims: int = 4, allow_special: bool = True) -> torch.Tensor:
    dims = draw(st.integers(0, max_dims))
    shape = [draw(st.integers(0 if d else 1, 9)) for d in range(dims)]
    dtype = draw(st.sampled_from(DTYPES))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    t = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    sparsity = draw(st.sampled_from([0.0, 0.3, 0.5, 0.9, 1.0]) | st.floats(0, 1))
    t[torch.rand(shape, generator=g) < sparsity] = 0
    if t.dim() >= 2 and t.shape[0] and draw(st.booleans()):
        t[draw(st.integers(0, t.shape[0] - 1))] = 0  # an all-zero row
    if allow_special and t.numel() and draw(st.booleans()):
        flat = t.view(-1)
        flat[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from([float("nan"), float("inf"), -0.0, 1e-30]))
    return t


@SETTINGS
@given(sparse_tensors())
def test_bitmask_round_trip_is_bit_exact(t):
    parts = codec.encode_bitmask(t)
    assert parts["compressed"].numel() == int((t != 0).sum())
    assert parts["bitmask"].dtype == torch.uint8
    back = codec.decode_bitmask(parts["compressed"], parts["bitmask"], parts["shape"].tolist())
    assert back.dtype == t.dtype and back.shape == t.shape
    assert torch.equal(bits(back), bits(canonical(t)))


@SETTINGS
@given(sparse_tensors())
def test_csr_round_trip_is_bit_exact(t):
    parts = codec.encode_csr(t)
    back = codec.decode_csr(parts["values"], parts["crow_indices"], parts["col_indices"], list(t.shape))
    assert torch.equal(bits(back), bits(canonical(t)))
    if t.numel():
        assert codec.csr_nbytes(t, int((t != 0).sum())) == sum(p.numel() * p.element_size() for p in parts.values())


@st.composite
def two_four_tensors(draw) -> torch.Tensor:
    rows, groups = draw(st.integers(1, 6)), draw(st.integers(1, 5))
    dtype = draw(st.sampled_from(DTYPES[:3]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    t = torch.randn(rows * groups, 4, generator=g).to(dtype)
    keep_count = torch.randint(0, 3, (rows * groups,), generator=g)  # 0, 1 or 2 non-zeros per group
    order = torch.rand(rows * groups, 4, generator=g).argsort(1)
    t[order >= keep_count[:, None]] = 0
    return t.reshape(rows, groups * 4)


@SETTINGS
@given(two_four_tensors())
def test_24_layout_keeps_two_per_group_and_round_trips(t):
    assert codec.is_24_along_rows(t)
    parts = codec.encode_bitmask_24(t)
    assert parts["compressed"].shape == (t.shape[0], t.shape[1] // 2)
    assert parts["shape"].shape == (2, 1)
    mask = codec.unpack_bits(parts["bitmask"], t.shape[1])
    assert (mask.reshape(-1, 4).sum(1) == 2).all()
    back = codec.decode_bitmask(parts["compressed"], parts["bitmask"], parts["shape"].flatten().tolist())
    assert torch.equal(bits(back), bits(canonical(t)))


def test_24_detection_is_along_the_last_dim():
    t = torch.tensor([[1.0, 2.0, 0.0, 0.0], [0.0, 3.0, 4.0, 5.0]])
    assert not codec.is_24_along_rows(t)
    assert codec.is_24_along_rows(t[:1]) and not codec.is_24_along_rows(torch.ones(2, 6))


@SETTINGS
@given(sparse_tensors(max_dims=2, allow_special=False), st.sampled_from(DTYPES[:3]))
def test_layout_is_compressed_tensors_own(t, dtype):
    """compressed-tensors' own bitmask functions read fxprune's encoding and vice versa, bit for bit."""
    ct = pytest.importorskip("compressed_tensors.compressors.sparse_compressors.sparse_bitmask")
    t = canonical(t.to(dtype).reshape(max(t.shape[0], 1) if t.dim() == 2 else 1, -1))
    if t.numel() == 0:
        return
    ours = codec.encode_bitmask(t)
    assert torch.equal(bits(ct.bitmask_decompress(ours["compressed"], ours["bitmask"], list(t.shape))), bits(t))
    values, packed, offsets = ct.bitmask_compress(t)
    assert torch.equal(packed, ours["bitmask"]) and torch.equal(offsets, ours["row_offsets"])
    assert torch.equal(bits(codec.decode_bitmask(values, packed, list(t.shape))), bits(t))


@SETTINGS
@given(two_four_tensors())
def test_24_layout_is_compressed_tensors_own(t):
    ct = pytest.importorskip("compressed_tensors.compressors.sparse_compressors.sparse_24_bitmask")
    ours = codec.encode_bitmask_24(t)
    back = ct.sparse24_bitmask_decompress(ours["compressed"], ours["bitmask"], ours["shape"].flatten().tolist())
    assert torch.equal(bits(back), bits(canonical(t)))
    compressed, packed = ct.sparse24_bitmask_compress(canonical(t))
    assert torch.equal(bits(codec.decode_bitmask(compressed, packed, list(t.shape))), bits(canonical(t)))


# ---------------------------------------------------------------- the single-file format


@st.composite
def state_dicts(draw) -> dict[str, torch.Tensor]:
    n = draw(st.integers(1, 5))
    state = {f"layer{i}.weight": draw(sparse_tensors()) for i in range(n)}
    names = list(state)
    if draw(st.booleans()):  # tied: the same tensor under a second name
        state["tied.weight"] = state[draw(st.sampled_from(names))]
    if draw(st.booleans()):  # non-contiguous: a transposed parameter
        base = draw(sparse_tensors(max_dims=2))
        if base.dim() == 2:
            state["transposed.weight"] = base.t()
    state["bn.num_batches_tracked"] = torch.tensor(draw(st.integers(0, 100)))
    return state


def _header_bytes(path) -> int:
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


@SETTINGS
@given(state_dicts())
def test_save_sparse_round_trip(tmp_path_factory, state):
    path = tmp_path_factory.mktemp("ck") / "m.safetensors"
    layouts = fxprune.save_sparse(state, path)
    back = fxprune.load_sparse_state_dict(path)
    assert list(back) == list(state)
    for name, t in state.items():
        got = back[name]
        assert got.dtype == t.dtype and got.shape == t.shape, name
        if t.is_floating_point():  # a tensor stored dense keeps even its -0.0
            layout = layouts[name]
            if layout == "tied":  # stored once, under the first name holding the same tensor
                layout = layouts[next(k for k, v in state.items() if v is t)]
            expected = t if layout == "dense" else canonical(t)
            assert torch.equal(bits(got), bits(expected)), name
        else:
            assert torch.equal(got, t), name
        if t.dim() >= 2 and t.numel() and not t.is_contiguous():
            assert got.stride() == t.stride(), name
    if "tied.weight" in state:
        assert layouts["tied.weight"] == "tied"
        source = next(k for k, v in state.items() if v is state["tied.weight"])
        assert back["tied.weight"] is back[source]


@SETTINGS
@given(
    rows=st.integers(1, 64),
    cols8=st.integers(1, 16),
    sparsity=st.floats(0, 1),
    dtype=st.sampled_from(DTYPES),
)
def test_file_size_is_values_plus_mask(tmp_path_factory, rows, cols8, sparsity, dtype):
    """Data bytes <= nnz * itemsize + numel / 8 (the layout picks CSR or dense where they are smaller)."""
    g = torch.Generator().manual_seed(rows * 131 + cols8)
    t = torch.randn(rows, cols8 * 8, generator=g).to(dtype)
    t[torch.rand(t.shape, generator=g) < sparsity] = 0
    path = tmp_path_factory.mktemp("sz") / "m.safetensors"
    fxprune.save_sparse({"w": t}, path)
    data = path.stat().st_size - _header_bytes(path)
    nnz = int((t != 0).sum())
    assert data <= min(nnz * t.element_size() + t.numel() / 8, t.numel() * t.element_size())


def test_file_size_of_a_pruned_cnn_within_3_percent(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 64, 3), nn.BatchNorm2d(64), nn.ReLU(), nn.Conv2d(64, 64, 3), nn.Flatten(), nn.LazyLinear(10))
    model(torch.randn(1, 16, 12, 12))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.mul_(torch.rand_like(m.weight) > 0.7)  # 70% unstructured, with -0.0 where negative
    path = tmp_path / "cnn.safetensors"
    layouts = fxprune.save_sparse(model, path)
    assert layouts["0.weight"] == layouts["3.weight"] == "bitmask" and layouts["1.running_mean"] == "dense"
    state = model.state_dict()
    budget = 0
    for name, t in state.items():
        if layouts[name] == "bitmask":
            budget += int((t != 0).sum()) * t.element_size() + t.numel() / 8
        else:
            budget += t.numel() * t.element_size()
    assert path.stat().st_size <= 1.03 * budget + _header_bytes(path)
    fresh = nn.Sequential(nn.Conv2d(16, 64, 3), nn.BatchNorm2d(64), nn.ReLU(), nn.Conv2d(64, 64, 3), nn.Flatten(), nn.Linear(64 * 8 * 8, 10))
    assert fxprune.load_sparse(path, fresh) is fresh
    for name, t in fresh.state_dict().items():
        assert torch.equal(t, state[name]), name


def test_very_sparse_tensor_uses_csr(tmp_path):
    w = torch.zeros(256, 256)
    w[torch.arange(256), torch.arange(256)] = 1.0
    assert fxprune.save_sparse({"w": w}, tmp_path / "d.safetensors")["w"] == "csr"
    assert torch.equal(fxprune.load_sparse_state_dict(tmp_path / "d.safetensors")["w"], w)


def test_tied_weights_of_a_model_are_stored_once_and_stay_tied(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 16)
            self.head = nn.Linear(16, 50, bias=False)
            self.head.weight = self.emb.weight

    model = Tied()
    with torch.no_grad():
        model.emb.weight[torch.rand(50, 16) < 0.6] = 0
    layouts = fxprune.save_sparse(model, tmp_path / "t.safetensors")
    assert layouts == {"emb.weight": "bitmask", "head.weight": "tied"}
    fresh = Tied()
    fxprune.load_sparse(tmp_path / "t.safetensors", fresh)
    assert fresh.head.weight is fresh.emb.weight and torch.equal(fresh.emb.weight, model.emb.weight)


def test_metadata_lists_every_name_in_order(tmp_path):
    from safetensors import safe_open

    state = {"b": torch.zeros(3, 8), "a": torch.ones(2)}
    fxprune.save_sparse(state, tmp_path / "m.safetensors")
    with safe_open(tmp_path / "m.safetensors", framework="pt") as f:
        header = json.loads(f.metadata()["fxprune"])
    assert [e["name"] for e in header["entries"]] == ["b", "a"]
    assert header["format"] == "fxprune-sparse"


# ---------------------------------------------------------------- errors


def _mlp():
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def test_load_into_mismatched_model_names_the_key_and_leaves_it_untouched(tmp_path):
    fxprune.save_sparse(_mlp(), tmp_path / "m.safetensors")
    other = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 5))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(PruningError, match=r"2\.weight: shape \(4, 16\) in the file, \(5, 16\) in the model"):
        fxprune.load_sparse(tmp_path / "m.safetensors", other)
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())
    with pytest.raises(PruningError, match=r"missing keys \['3.weight'"):
        fxprune.load_sparse(tmp_path / "m.safetensors", nn.Sequential(*_mlp(), nn.Linear(4, 4)))
    with pytest.raises(PruningError, match="dtype torch.float32 in the file, torch.float64"):
        fxprune.load_sparse(tmp_path / "m.safetensors", _mlp().double())


def test_saving_a_prepared_model_asks_for_convert(tmp_path):
    prepared = fxprune.prepare(_mlp(), {"pruning": {"magnitude": {"p": {}}, "target_sparsity": 0.5}})
    for call in (lambda: fxprune.save_sparse(prepared, tmp_path / "p.safetensors"),
                 lambda: fxprune.save_pretrained(prepared, tmp_path / "dir")):
        with pytest.raises(PruningError, match=r"call fxprune.convert\(prepared\) first"):
            call()
    assert not (tmp_path / "p.safetensors").exists() and not (tmp_path / "dir").exists()


def test_not_a_checkpoint_file(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(PruningError, match="not an fxprune sparse checkpoint"):
        fxprune.load_sparse_state_dict(tmp_path / "plain.safetensors")


def test_missing_extra_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match=r"pip install 'fxprune\[compressed\]'"):
        fxprune.save_sparse(_mlp(), tmp_path / "m.safetensors")


def test_non_transformers_save_pretrained_is_one_bitmask_file_with_row_offsets(tmp_path):
    from safetensors import safe_open

    model = _mlp()
    with torch.no_grad():
        model[0].weight[torch.rand(16, 8) < 0.8] = 0
    saved = fxprune.save_pretrained(model, tmp_path / "mlp")
    assert saved.format == "fxprune-sparse" and saved.layouts["0.weight"] == "bitmask"
    with safe_open(tmp_path / "mlp" / "model.safetensors", framework="pt") as f:
        keys = set(f.keys())
    assert {"0.weight.compressed", "0.weight.bitmask", "0.weight.row_offsets"} <= keys
    fresh = fxprune.load_pretrained(tmp_path / "mlp", _mlp())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in fresh.state_dict().items())
    with pytest.raises(PruningError, match="pass the model to fill"):
        fxprune.load_pretrained(tmp_path / "mlp")
