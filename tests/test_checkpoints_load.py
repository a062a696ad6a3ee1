"""Loading compact checkpoints fast: the stepwise bitmask decoder and decoding straight into a model.

The decoder is held against a slow per-element oracle; ``load_sparse`` against
``load_state_dict`` of the saved state, for models whose tensors take every
path (written in place, or through ``load_state_dict`` because of a hook, a
computed state_dict entry, a non-contiguous parameter), with tied weights.
"""
from __future__ import annotations

import gc
import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fxprune
from fxprune.checkpoints import codec
from fxprune.checkpoints.mapped_file import read_safetensors
from fxprune.checkpoints.in_place import writable_in_place
from fxprune.errors import PruningError
from test_checkpoints import DTYPES, bits, canonical, sparse_tensors

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def oracle_decode(compressed: torch.Tensor, bitmask: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """Element by element: the j-th set bit of the row-major mask (row padding skipped) takes value j."""
    rows = shape[0] if len(shape) >= 2 else 1
    numel = 1
    for s in shape:
        numel *= s
    cols = numel // rows if rows else 0
    width = (cols + 7) // 8
    flat = bitmask.reshape(-1).tolist()
    out = torch.zeros(numel, dtype=compressed.dtype).view(codec._INT_OF_SIZE[compressed.element_size()])
    values = compressed.reshape(-1).view(out.dtype).tolist()
    k = 0
    for r in range(rows):
        for c in range(cols):
            if flat[r * width + c // 8] >> (c % 8) & 1:
                out[r * cols + c] = values[k]
                k += 1
    assert k == len(values)
    return out.view(compressed.dtype).reshape(shape)


@st.composite
def wide_tensors(draw) -> torch.Tensor:
    """2-D tensors with rows longer and shorter than the decode step, with and without row padding."""
    rows, cols = draw(st.integers(1, 12)), draw(st.integers(1, 70))
    dtype = draw(st.sampled_from(DTYPES))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    t = torch.randn(rows, cols, generator=g, dtype=torch.float64).to(dtype)
    sparsity = draw(st.sampled_from([0.0, 0.5, 0.9, 1.0]) | st.floats(0, 1))
    t[torch.rand(t.shape, generator=g) < sparsity] = 0
    if draw(st.booleans()):
        t[draw(st.integers(0, rows - 1))] = 0  # an all-zero row
    if draw(st.booleans()):
        t.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from([float("nan"), float("-inf"), -0.0]))
    return t


def raw_bits(t: torch.Tensor) -> torch.Tensor:
    """:func:`bits`, for 1-byte dtypes too."""
    return t.contiguous().view(torch.uint8) if t.element_size() == 1 else bits(t)


@st.composite
def byte_tensors(draw) -> torch.Tensor:
    """1-byte elements (int8, uint8, bool): rows long enough for the kernel's 64-element chunks."""
    rows, cols = draw(st.integers(1, 5)), draw(st.integers(1, 200))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    dtype = draw(st.sampled_from([torch.int8, torch.uint8, torch.bool]))
    t = torch.randint(-128 if dtype is torch.int8 else 0, 128 if dtype is torch.int8 else 2, (rows, cols),
                      generator=g).to(dtype)
    t[torch.rand(t.shape, generator=g) < draw(st.floats(0, 1))] = 0
    return t


@SETTINGS
@given(st.one_of(wide_tensors(), sparse_tensors(), byte_tensors()), st.sampled_from([8, 16, 24, 64, codec.DECODE_STEP]),
       st.sampled_from([False, True]), st.sampled_from([0, 0, 1, 3]))
def test_decoders_match_the_element_by_element_oracle(t, step, native, offset):
    # native: the C kernel (AVX-512 expand-loads in chunks of 8-64 elements, streaming stores where the output is
    # 64-byte aligned, a scalar tail); else torch ops. offset > 0: the output starts off alignment (a view).
    parts = codec.encode_bitmask(t)
    shape = list(t.shape)
    expected = oracle_decode(parts["compressed"], parts["bitmask"], shape)
    assert torch.equal(raw_bits(expected), raw_bits(canonical(t)))
    out = torch.full([t.numel() + offset], 7, dtype=t.dtype)[offset:].view(shape)  # every element must be written
    codec.decode_bitmask_into(out, parts["compressed"], parts["bitmask"], step=step, native=native)
    assert torch.equal(raw_bits(out), raw_bits(expected))
    codec.check_parts("bitmask", parts, shape, t.dtype)  # the values match the bitmask's count


@SETTINGS
@given(st.one_of(wide_tensors(), sparse_tensors(), byte_tensors()), st.sampled_from([0, 1, 3]))
def test_every_instruction_set_of_the_c_kernel_matches_the_oracle(t, offset):
    # The kernel picks the best this CPU has (codec never chooses); each one it has must give the same bits:
    # AVX-512 expand, AVX2 table shuffles (2- and 4-byte elements), the scalar loop.
    from fxprune.checkpoints import _expand

    parts = codec.encode_bitmask(t)
    expected = raw_bits(oracle_decode(parts["compressed"], parts["bitmask"], list(t.shape)))
    rows, cols = codec._rows_cols(t.shape)
    ints = codec._INT_OF_SIZE[t.element_size()]
    src = parts["compressed"].view(ints).numpy()
    for isa in _expand.isas():
        out = torch.full([t.numel() + offset], 7, dtype=t.dtype)[offset:].view(t.shape)
        assert _expand.expand(out.view(-1).view(ints).numpy(), src, parts["bitmask"].numpy().reshape(-1), rows, cols,
                              isa) == src.size
        assert torch.equal(raw_bits(out), expected), isa
    with pytest.raises(ValueError, match="instruction set 'sse9'"):
        _expand.expand(out.view(-1).view(ints).numpy(), src, parts["bitmask"].numpy().reshape(-1), rows, cols, "sse9")


@SETTINGS
@given(st.integers(0, 9), st.integers(0, 200), st.integers(0, 2**31), st.sampled_from([False, True]))
def test_bit_counts_skip_row_padding(rows, cols, seed, native):
    g = torch.Generator().manual_seed(seed)
    packed = torch.randint(0, 256, (rows, (cols + 7) // 8), generator=g, dtype=torch.uint8)  # padding bits set too
    expected = sum(int(packed[r, c // 8]) >> (c % 8) & 1 for r in range(rows) for c in range(cols))
    assert codec.count_kept_bits(packed, cols, native=native) == expected


def test_the_c_kernel_is_built():
    # scripts/setup.sh installs with a C compiler; the kernel is optional only where there is none.
    assert codec.native_expand() is not None, (
        "fxprune.checkpoints._expand was not built: reinstall (pip install -e .) where a C compiler and the Python "
        "headers are present")


def test_decode_ignores_padding_bits_and_refuses_short_values():
    t = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0]])
    parts = codec.encode_bitmask(t)
    padded = parts["bitmask"].clone()
    padded[:, 0] |= 0b1111_1000  # set bits past the 3 columns of each row
    assert codec.count_kept_bits(padded, 3) == 3
    assert torch.equal(codec.decode_bitmask(parts["compressed"], padded, [2, 3]), t)
    with pytest.raises(ValueError, match="2 values of torch.float32; the bitmask parts need 3"):
        codec.check_parts("bitmask", {"compressed": parts["compressed"][:2], "bitmask": padded}, [2, 3], torch.float32)
    for native in (False, True):
        assert torch.equal(codec.decode_bitmask_into(torch.empty(2, 3), parts["compressed"], padded, native=native), t)
        with pytest.raises(ValueError, match="more elements than the 2 values"):
            codec.decode_bitmask_into(torch.empty(2, 3), parts["compressed"][:2], padded, native=native)
    with pytest.raises(ValueError, match="contiguous CPU tensor"):
        codec.decode_bitmask_into(torch.empty(3, 2).t(), parts["compressed"], padded)


# ---------------------------------------------------------------- decoding straight into a model


class Holder(nn.Module):
    """Tensors as parameters and buffers, some below a module with a load hook, some non-contiguous, some tied."""

    def __init__(self, tensors: list[torch.Tensor], hooked: list[bool], buffers: list[bool], tie: int | None):
        super().__init__()
        self.plain = nn.Module()
        self.hooked = nn.Module()
        self.hook_calls = 0

        def hook(*args, **kwargs):
            self.hook_calls += 1

        self.hooked._register_load_state_dict_pre_hook(hook)
        for i, (t, h, b) in enumerate(zip(tensors, hooked, buffers)):
            owner = self.hooked if h else self.plain
            if b or not t.is_floating_point():
                owner.register_buffer(f"t{i}", t.clone())
            else:
                owner.register_parameter(f"t{i}", nn.Parameter(t.clone(), requires_grad=False))
        if tie is not None and isinstance(getattr(self.plain, f"t{tie}", None), nn.Parameter):
            self.tied = nn.Module()
            self.tied.weight = getattr(self.plain, f"t{tie}")


def scrambled(model: nn.Module) -> nn.Module:
    """The same model with every floating-point value replaced (the load must overwrite all of it)."""
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.fill_(123.0)
    return model


@SETTINGS
@given(
    st.lists(sparse_tensors(max_dims=3), min_size=1, max_size=5),
    st.data(),
)
def test_load_sparse_equals_load_state_dict_on_every_path(tmp_path_factory, tensors, data):
    n = len(tensors)
    hooked = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    buffers = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    transpose = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    tensors = [t.t() if flip and t.dim() == 2 else t for t, flip in zip(tensors, transpose)]
    tie = data.draw(st.none() | st.integers(0, n - 1))
    model = Holder(tensors, hooked, buffers, tie)
    assert all(getattr(model.hooked if h else model.plain, f"t{i}").stride() == t.stride()
               for i, (t, h) in enumerate(zip(tensors, hooked)))  # transposed sources stay non-contiguous
    path = tmp_path_factory.mktemp("ld") / "m.safetensors"
    fxprune.save_sparse(model, path)
    expected = Holder(tensors, hooked, buffers, tie)
    expected.load_state_dict(fxprune.load_sparse_state_dict(path))
    target = scrambled(Holder(tensors, hooked, buffers, tie))
    direct = writable_in_place(target)
    assert not any(k.startswith("hooked.") for k in direct)
    assert all(k in direct for k, v in target.state_dict().items() if k.startswith("plain.") and v.is_contiguous())
    target.hook_calls = 0
    assert fxprune.load_sparse(path, target) is target
    for (k, got), want in zip(target.state_dict().items(), expected.state_dict().values()):
        assert got.dtype == want.dtype and torch.equal(bits(got) if got.is_floating_point() else got,
                                                       bits(want) if want.is_floating_point() else want), k
    assert target.hook_calls <= 1 and (target.hook_calls == 1 or not any(hooked))
    if hasattr(target, "tied"):
        assert target.tied.weight is getattr(target.plain, f"t{tie}")


def test_tied_in_the_file_separate_in_the_model(tmp_path):
    class Tied(nn.Module):
        def __init__(self, tie: bool):
            super().__init__()
            self.emb = nn.Embedding(40, 16)
            self.head = nn.Linear(16, 40, bias=False)
            if tie:
                self.head.weight = self.emb.weight

    source = Tied(tie=True)
    with torch.no_grad():
        source.emb.weight[torch.rand(40, 16) < 0.7] = 0
    assert fxprune.save_sparse(source, tmp_path / "t.safetensors")["head.weight"] == "tied"
    separate = fxprune.load_sparse(tmp_path / "t.safetensors", scrambled(Tied(tie=False)))
    assert separate.head.weight is not separate.emb.weight
    assert torch.equal(separate.head.weight, source.emb.weight) and torch.equal(separate.emb.weight, source.emb.weight)


def test_separate_in_the_file_tied_in_the_model_keeps_load_state_dicts_last_copy(tmp_path):
    class Pair(nn.Module):
        def __init__(self, tie: bool):
            super().__init__()
            self.a = nn.Linear(64, 64, bias=False)
            self.b = nn.Linear(64, 64, bias=False)
            if tie:
                self.b.weight = self.a.weight

    source = Pair(tie=False)
    with torch.no_grad():
        source.a.weight.mul_(torch.rand(64, 64) > 0.5)
        source.b.weight.mul_(torch.rand(64, 64) > 0.5)
    path = tmp_path / "p.safetensors"
    assert fxprune.save_sparse(source, path) == {"a.weight": "bitmask", "b.weight": "bitmask"}
    expected = Pair(tie=True)
    expected.load_state_dict(source.state_dict())
    loaded = fxprune.load_sparse(path, scrambled(Pair(tie=True)))
    assert loaded.a.weight is loaded.b.weight
    assert torch.equal(loaded.a.weight, expected.a.weight) and torch.equal(loaded.a.weight, source.b.weight)


def test_computed_state_dict_entries_go_through_load_state_dict(tmp_path):
    """A SparseLinear's state_dict 'weight' is computed from its CSR parts: it must be loaded, not written into."""
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    with torch.no_grad():
        for m in dense:
            if isinstance(m, nn.Linear):
                m.weight.mul_(torch.rand_like(m.weight) > 0.9)
    fxprune.save_sparse(dense, tmp_path / "d.safetensors")
    sparse = fxprune.sparsify_kernels(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)).eval(),
                                      torch.randn(4, 32), force=True)
    assert isinstance(sparse[0], fxprune.SparseLinear)
    assert "0.weight" not in writable_in_place(sparse)
    fxprune.load_sparse(tmp_path / "d.safetensors", sparse)
    x = torch.randn(5, 32)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), dense(x))
    assert all(torch.equal(v, dense.state_dict()[k]) for k, v in sparse.state_dict().items())


def _rewrite(path, mutate) -> None:
    """Rewrite a save_sparse file with ``mutate(tensors, header)`` applied (a damaged file)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
    header = json.loads(metadata["fxprune"])
    mutate(tensors, header)
    save_file(tensors, path, metadata={"fxprune": json.dumps(header)})


@pytest.mark.parametrize("damage", ["short values", "bitmask bytes", "csr column", "missing part", "bad tie"])
def test_a_damaged_file_fails_before_anything_is_written(tmp_path, damage):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64, bias=False))
    with torch.no_grad():
        model[0].weight.mul_(torch.rand(64, 64) > 0.5)
        model[1].weight.zero_()
        model[1].weight[torch.arange(64), torch.arange(64)] = 1.0
    path = tmp_path / "m.safetensors"
    assert fxprune.save_sparse(model, path) == {"0.weight": "bitmask", "0.bias": "dense", "1.weight": "csr"}

    def mutate(tensors, header):
        if damage == "short values":
            tensors["0.weight.compressed"] = tensors["0.weight.compressed"][:-1].clone()
        elif damage == "bitmask bytes":
            tensors["0.weight.bitmask"] = tensors["0.weight.bitmask"][:-1].clone()
        elif damage == "csr column":
            tensors["1.weight.col_indices"][3] = 64
        elif damage == "missing part":
            del tensors["0.weight.bitmask"]
        else:
            header["entries"].append({"name": "extra", "dtype": "float32", "shape": [1], "layout": "tied",
                                      "tied_to": "nowhere"})

    _rewrite(path, mutate)
    target = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64, bias=False))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(PruningError, match=r"m\.safetensors: (0|1)\.weight|extra is tied"):
        fxprune.load_sparse(path, target)
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())


MAPPED_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
                 torch.int8, torch.uint8, torch.bool]


@SETTINGS
@given(st.lists(st.tuples(st.sampled_from(MAPPED_DTYPES + [torch.float8_e4m3fn, torch.complex64]),
                          st.lists(st.integers(0, 5), max_size=3)), min_size=1, max_size=6), st.integers(0, 2**31))
def test_the_mapped_reader_gives_what_safetensors_gives(tmp_path_factory, specs, seed):
    # Views of one copy-on-write mapping, or safetensors' own loader for a dtype outside the table (fp8, complex).
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {f"t{i}": (torch.randn(shape, generator=g) * 50).to(dtype) for i, (dtype, shape) in enumerate(specs)}
    path = str(tmp_path_factory.mktemp("map") / "f.safetensors")
    save_file(tensors, path, metadata={"fxprune": json.dumps({"seed": seed})})
    metadata, mapped = read_safetensors(path)
    reference = load_file(path)
    assert metadata == {"fxprune": json.dumps({"seed": seed})}
    assert mapped.keys() == reference.keys()

    def raw(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1).view(torch.uint8)

    for key, t in mapped.items():
        assert t.dtype == reference[key].dtype and t.shape == reference[key].shape
        assert torch.equal(raw(t), raw(reference[key])), key
    for key, t in mapped.items():
        raw(t).fill_(7)  # a private mapping: writing a loaded tensor leaves the file as it was
        assert torch.equal(raw(load_file(path)[key]), raw(reference[key]))


def test_loading_leaves_no_reference_cycle(tmp_path):
    # A cycle would keep the file's mapping (and every part) alive until the collector runs, and charge its
    # work to whatever allocates next.
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64, bias=False))
    model[1].weight = model[0].weight
    with torch.no_grad():
        model[0].weight.mul_(torch.rand(64, 64) > 0.5)
    fxprune.save_sparse(model, tmp_path / "m.safetensors")
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        fxprune.load_sparse(tmp_path / "m.safetensors", model)
        fxprune.load_sparse_state_dict(tmp_path / "m.safetensors")
        assert gc.collect() == 0
    finally:
        if was_enabled:
            gc.enable()
