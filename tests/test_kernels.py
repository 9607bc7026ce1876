"""Native CPU kernels against PyTorch references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from triforce import native
from triforce.attention import attend_torch, gather_chunks
from triforce.model import rms_norm

pytestmark = [pytest.mark.skipif(native.library() is None, reason="native kernels unavailable"), pytest.mark.core]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("heads", [(9, 3, 64), (4, 4, 32), (8, 2, 128), (12, 4, 64), (8, 1, 64)])
@pytest.mark.parametrize("T", [1, 3, 7, 13])
def test_attention_dense_and_chunked(dtype, heads, T):
    nq, nkv, hd = heads
    torch.manual_seed(T)
    cap, n = 700, 650 + T
    k = torch.randn(nkv, cap, hd, dtype=dtype)
    v = torch.randn(nkv, cap, hd, dtype=dtype)
    q = torch.randn(T, nq, hd)
    first = n - T
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: p.V uses bf16 probabilities
    dense = native.attention(q, k, v, n, first, out_dtype=torch.float32)
    assert (dense - attend_torch(q, k.float(), v.float(), n, first)).abs().max() < tol
    chunk = 8
    chunks = torch.stack([torch.randperm(70)[:20].sort().values * chunk for _ in range(nkv)]).int()
    sparse = native.attention(q, k, v, n, first, chunks, chunk, 600, out_dtype=torch.float32)
    gk, gv, gf, gn = gather_chunks(k.float(), v.float(), chunks, chunk, 600, n, first)
    assert (sparse - attend_torch(q, gk, gv, gn, gf)).abs().max() < tol


def test_attention_all_chunks_equals_dense_exactly():
    """Selecting every chunk reads the same keys in the same order: bit-identical to dense."""
    torch.manual_seed(0)
    k, v = torch.randn(3, 512, 64), torch.randn(3, 512, 64)
    q = torch.randn(4, 9, 64)
    n = 500
    chunks = (torch.arange(0, 480, 8, dtype=torch.int32)).expand(3, -1).contiguous()
    dense = native.attention(q, k, v, n, n - 4)
    sparse = native.attention(q, k, v, n, n - 4, chunks, 8, 480)
    assert torch.equal(dense, sparse)


@pytest.mark.parametrize("heads", [(9, 3, 64), (8, 2, 128), (8, 1, 64)])
def test_attention_row_alone_equals_row_in_a_verification(heads):
    """A decoding query (few rows: keys go straight from the cache to registers) gives
    bit-identical output to the same query inside a verification block (many rows: keys are
    staged in scratch), which lossless greedy verification relies on."""
    nq, nkv, hd = heads
    torch.manual_seed(1)
    k = torch.randn(nkv, 1200, hd).bfloat16()
    v = torch.randn(nkv, 1200, hd).bfloat16()
    T, first = 6, 1100
    q = torch.randn(T, nq, hd)
    chunks = torch.stack([torch.randperm(60)[:25].sort().values * 16 for _ in range(nkv)]).int()
    for sel in (None, chunks):
        extra = (sel, 16, 1000) if sel is not None else ()
        together = native.attention(q, k, v, first + T, first, *extra, out_dtype=torch.float32)
        for t in range(T):
            alone = native.attention(q[t : t + 1], k, v, first + t + 1, first + t, *extra, out_dtype=torch.float32)
            assert torch.equal(alone[0], together[t])


def _paths() -> list[bool | None]:
    """The multi-row paths to run (staged, grouped) where the CPU has both, else the one there is."""
    return [True, False] if native.packed_linear_supported() else [None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("heads", [(9, 3, 64), (8, 2, 128), (4, 4, 64)], ids=["gqa3-64", "gqa4-128", "mha-64"])
@pytest.mark.parametrize("T", [2, 3, 7, 11, 22, 64])
def test_every_row_of_a_pass_equals_that_row_alone(dtype, heads, T):
    """A verification or middle-level pass of T tokens gives every row the bits of decoding it
    alone, on every multi-row path, with the rows straddling a key-split boundary (4096 dense
    keys; 2048 keys of a retrieval selection), so greedy speculation stays exactly plain decoding."""
    nq, nkv, hd = heads
    torch.manual_seed(T)
    first = 4096 - T // 2
    k = torch.randn(nkv, first + T, hd, dtype=dtype)
    v = torch.randn(nkv, first + T, hd, dtype=dtype)
    q = torch.randn(T, nq, hd)
    chunk, dense = 8, first - 128 + T // 2  # 240 chunks + the dense tail: 2048 - T // 2 + t + 1 keys
    chunks = torch.stack([torch.randperm(dense // chunk)[:240].sort().values * chunk for _ in range(nkv)]).int()
    for extra in ((), (chunks, chunk, dense)):
        alone = [native.attention(q[t : t + 1], k, v, first + t + 1, first + t, *extra, out_dtype=torch.float32)[0]
                 for t in range(T)]
        for path in _paths():
            was = native.set_staged_attention(path) if path is not None else None
            try:
                together = native.attention(q, k, v, first + T, first, *extra, out_dtype=torch.float32)
            finally:
                if was is not None:
                    native.set_staged_attention(was)
            for t in range(T):
                assert torch.equal(alone[t], together[t]), (path, bool(extra), t)
            if not extra:  # and right, not merely consistent
                reference = attend_torch(q, k.float(), v.float(), first + T, first)
                assert (together - reference).abs().max() < (1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("heads", [(9, 3, 64), (8, 2, 128)])
def test_prefill_sized_pass_matches_torch_and_each_row_alone(heads):
    """A prefill chunk (hundreds of rows, keys past a 2048-key split, causal within the chunk)
    through the kernel: close to PyTorch's attention, and each row bit-identical to decoding it
    alone, which lets the prompt cache keep rows however the prompt was split."""
    nq, nkv, hd = heads
    torch.manual_seed(4)
    T, first = 300, 2000
    k = torch.randn(nkv, first + T, hd).bfloat16()
    v = torch.randn(nkv, first + T, hd).bfloat16()
    q = torch.randn(T, nq, hd)
    out = native.attention(q, k, v, first + T, first, out_dtype=torch.float32)
    assert (out - attend_torch(q, k.float(), v.float(), first + T, first)).abs().max() < 2e-2
    for t in (0, 47, 48, T - 1):
        alone = native.attention(q[t : t + 1], k, v, first + t + 1, first + t, out_dtype=torch.float32)
        assert torch.equal(alone[0], out[t])


@pytest.mark.parametrize("M", [1, 4, 5, 12, 13, 28, 29, 40])
def test_packed_linear(M):
    if not native.packed_linear_supported():
        pytest.skip("no AVX512-BF16")
    torch.manual_seed(M)
    w = torch.randn(200, 96, dtype=torch.bfloat16)
    b = torch.randn(200, dtype=torch.bfloat16)
    x = torch.randn(M, 96, dtype=torch.bfloat16)
    ref = F.linear(x.float(), w.float(), b.float())
    lin = native.PackedLinear(w, b)
    got32 = lin(x, torch.float32)
    assert (got32 - ref).abs().max() < 1e-3 * ref.abs().max()
    got16 = lin(x)
    assert got16.dtype == torch.bfloat16 and (got16.float() - ref).abs().max() < 1e-2 * ref.abs().max()
    # Tiles (AVX512: one or two 16-output blocks of 1-14 rows; AMX: up to 16 rows) change with
    # M; a row's sums must not, or a sequence's tokens would depend on its batch mates.
    for m in range(M):
        assert torch.equal(lin(x[m : m + 1], torch.float32)[0], got32[m])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_glue_kernels(dtype):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 64, dtype=dtype)
    w = (1 + 0.1 * torch.randn(64)).to(dtype)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert (native.rms_norm(x, w, 1e-5).float() - rms_norm(x, w, 1e-5).float()).abs().max() < tol
    gu = torch.randn(7, 2 * 48, dtype=dtype)
    gate, up = gu.chunk(2, -1)
    assert (native.silu_mul(gu).float() - (F.silu(gate) * up).float()).abs().max() < 5 * tol
