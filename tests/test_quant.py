"""GGUF block formats: PyTorch decoding against gguf-py, quantizing, and the native kernel that
multiplies by the blocks directly (against PyTorch and, bit for bit, the packed-bf16 kernel)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

gguf = pytest.importorskip("gguf")

from triforce import native  # noqa: E402
from triforce.quant import FORMATS, QuantizedTensor, QuantLinear, kernel_supports, quantize  # noqa: E402

NAMES = list(FORMATS)
needs_kernel = pytest.mark.skipif(not kernel_supports("q8_0"), reason="no quantized kernel (needs AVX512-BF16 or AVX2)")

pytestmark = pytest.mark.core
# The AVX512 kernel rounds each decoded weight to bf16 (the dense bf16 kernel's bits); the AVX2
# kernel multiplies by gguf's float32 values themselves.
ROUNDS_TO_BF16 = native.kernels() == "avx512"


def assert_dense_result(lin: QuantLinear, w: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor,
                        out_dtype: torch.dtype) -> None:
    """lin(x) against the dense weights w (float32): bit for bit the packed bf16 kernel on w's bf16
    values where the kernel rounds to them, else float32 sums within rounding."""
    y = lin(x, out_dtype)
    if ROUNDS_TO_BF16:
        assert torch.equal(y, native.PackedLinear(w.bfloat16(), bias)(x, out_dtype))
        return
    exact = F.linear(x.double(), w.double(), bias.double() if bias is not None else None)
    y32 = lin(x, torch.float32)
    assert (y32.double() - exact).abs().max() <= 1e-5 * exact.abs().max() + 1e-6
    if out_dtype == torch.bfloat16:
        assert torch.equal(y, y32.bfloat16())


def random_blocks(fmt: str, N: int, K: int, seed: int = 0) -> QuantizedTensor:
    """Valid random blocks: random quant bytes, random f16 scales of either sign (some of them f16
    subnormals for the K-quants, whose scales are products of two small numbers)."""
    f = FORMATS[fmt]
    rng = np.random.default_rng(seed)
    count = N * (K // f.block_size)
    b = rng.integers(0, 256, size=(count, f.block_bytes), dtype=np.uint8)

    def scale(at: int, lo: float, hi: float) -> None:
        v = rng.uniform(lo, hi, size=count) * rng.choice([-1.0, 1.0], size=count)
        b[:, at:at + 2] = v.astype(np.float16).view(np.uint8).reshape(count, 2)

    if fmt == "q4_1":
        scale(0, 1e-3, 1e-1)
        scale(2, 1e-3, 1.0)
    elif fmt in ("q4_k", "q5_k"):
        scale(0, 1e-6, 1e-3)
        scale(2, 1e-6, 1e-3)
    elif fmt == "q6_k":
        scale(208, 1e-6, 1e-3)
    else:  # q8_0, q4_0
        scale(0, 1e-4, 1e-1)
    return QuantizedTensor(torch.from_numpy(b.reshape(N, -1)), fmt, (N, K))


def gguf_dequantize(q: QuantizedTensor) -> torch.Tensor:
    out = gguf.quants.dequantize(q.to_blocks(), gguf.GGMLQuantizationType(q.format.gguf_type))
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).reshape(q.shape)


@pytest.mark.parametrize("fmt", NAMES)
def test_dequantize_equals_gguf_exactly(fmt):
    q = random_blocks(fmt, 24, 512, seed=1)
    ours, ref = q.dequantize(), gguf_dequantize(q)
    assert ours.dtype == torch.float32 and torch.isfinite(ours).all()
    assert torch.equal(ours.view(torch.int32), ref.view(torch.int32))
    ids = torch.tensor([[3, 0], [23, 3]])
    assert torch.equal(q.rows(ids), ref[ids])
    perm = torch.randperm(24)
    assert torch.equal(q.permute_rows(perm).dequantize(), ref[perm])


def test_permute_rows_reproduces_the_loaders_unpermute():
    """loading._unpermute is a row permutation: applying it to row numbers gives the permutation
    that QuantizedTensor.permute_rows applies to the blocks."""
    from triforce.loading import _unpermute

    q = random_blocks("q4_1", 64, 64, seed=2)
    perm = torch.from_numpy(_unpermute(np.arange(64).reshape(64, 1), 4)[:, 0].copy())
    assert torch.equal(q.permute_rows(perm).dequantize(), torch.from_numpy(_unpermute(q.dequantize().numpy(), 4)))


# -- the kernel ------------------------------------------------------------------------------------
@needs_kernel
@pytest.mark.parametrize("fmt", NAMES)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernel_against_pytorch(fmt, with_bias, out_dtype):
    """Tolerance: the kernel multiplies bf16 x by each weight rounded to bf16 (relative error at
    most 2^-9 per weight) and sums in float32, so |y - F.linear(x, w)| <= 2^-9 sum_k |x_k w_nk|
    plus float32 rounding; a bf16 output adds at most 2^-9 |y|. Checked with a margin of 2."""
    N, K = 200, 512  # 13 groups of 16 rows: three quads and a partial one
    q = random_blocks(fmt, N, K, seed=3)
    w = q.dequantize()
    bias = torch.randn(N).bfloat16() if with_bias else None
    lin = QuantLinear(q, bias)
    for M in (1, 3, 7, 16, 40):
        x = torch.randn(M, K).bfloat16()
        y = lin(x, out_dtype)
        assert y.dtype == out_dtype and y.shape == (M, N)
        ref = F.linear(x.float(), w, bias.float() if bias is not None else None)
        bound = 2.0**-8 * (x.float().abs() @ w.abs().T) + 1e-6 * ref.abs().max()
        if out_dtype == torch.bfloat16:
            bound += 2.0**-8 * ref.abs()
        assert ((y.float() - ref).abs() <= bound).all(), (fmt, M)


@needs_kernel
@pytest.mark.parametrize("fmt", NAMES)
def test_kernel_equals_dense_weights(fmt):
    """AVX512: each weight decodes to RNE_bf16(gguf's float32 value) and every output sums in the
    bf16 kernel's order: the same bits as native.PackedLinear on the dequantized weights (AVX2:
    float32 sums of gguf's values, within rounding), for every path (in registers, whole quads,
    scratch; a few groups with many rows split across threads), shapes with partial quads and
    partial groups, and both output types."""
    for N, K, Ms in [(200, 512, (1, 2, 3, 4, 5, 8, 9, 14, 15, 29, 64)), (24, 256, (1, 7, 100))]:
        q = random_blocks(fmt, N, K, seed=4)
        bias = torch.randn(N).bfloat16()
        lin, w = QuantLinear(q, bias), q.dequantize()
        for M in Ms:
            x = torch.randn(M, K).bfloat16()
            for out_dtype in (torch.float32, torch.bfloat16):
                assert_dense_result(lin, w, bias, x, out_dtype)


@needs_kernel
@pytest.mark.parametrize("fmt", NAMES)
def test_row_alone_equals_row_in_any_pass(fmt):
    """A row's output does not depend on how many rows share the pass (1 to 40) or where it sits."""
    N, K = 72, 256
    lin = QuantLinear(random_blocks(fmt, N, K, seed=5))
    x = torch.randn(40, K).bfloat16()
    full = lin(x, torch.float32)
    for i in range(40):
        assert torch.equal(lin(x[i:i + 1], torch.float32)[0], full[i])
    for M in range(2, 40):
        start = (7 * M) % (41 - M)
        assert torch.equal(lin(x[start:start + M], torch.float32), full[start:start + M]), M


@needs_kernel
def test_parts_of_different_formats_share_one_output():
    """q|k|v-style parts of different formats write column slices of one output (row stride);
    the result equals the packed bf16 kernel on the concatenated weights, and each part alone."""
    K = 512
    parts = [random_blocks("q8_0", 48, K, 6), random_blocks("q4_k", 40, K, 7), random_blocks("q4_k", 24, K, 8),
             random_blocks("q6_k", 24, K, 9), random_blocks("q4_0", 20, K, 10)]
    bias = torch.randn(156).bfloat16()
    lin = QuantLinear(parts, bias)
    assert len(lin.segments) == 4  # the two q4_k parts share a call
    assert lin.nbytes == sum(p.nbytes for p in parts)
    w = torch.cat([p.dequantize() for p in parts])
    for M in (1, 6, 20):
        x = torch.randn(M, K).bfloat16()
        y = lin(x, torch.float32)
        assert_dense_result(lin, w, bias, x, torch.float32)
        n0 = 0
        for p in parts:
            alone = QuantLinear(p, bias[n0:n0 + p.shape[0]])(x, torch.float32)
            assert torch.equal(y[:, n0:n0 + p.shape[0]], alone)
            n0 += p.shape[0]
    ids = torch.tensor([0, 47, 48, 100, 155, 3])
    assert torch.equal(lin.rows(ids, torch.float32), w[ids])


@needs_kernel
@pytest.mark.parametrize("fmt", NAMES)
def test_embedding_rows(fmt):
    q = random_blocks(fmt, 90, 512, seed=11)
    lin = QuantLinear(q)
    w = q.dequantize()
    ids = torch.tensor([[89, 0, 17], [64, 65, 17]])
    assert torch.equal(lin.rows(ids, torch.float32), w[ids])
    assert torch.equal(lin.rows(ids, torch.bfloat16), w[ids].bfloat16())
    with pytest.raises(IndexError):
        lin.rows([90])


# -- quantizing ------------------------------------------------------------------------------------
# relative RMS error bounds for these N(0, 1) weights (measured: q8_0 0.0054, q4_0 0.086, q4_1 0.078,
# q4_k 0.071, q5_k 0.036)
ROUND_TRIP_RMS = {"q8_0": 0.007, "q4_0": 0.10, "q4_1": 0.09, "q4_k": 0.085, "q5_k": 0.045}


@pytest.mark.parametrize("fmt", list(ROUND_TRIP_RMS))
def test_quantize_round_trip(fmt):
    torch.manual_seed(12)
    w = torch.randn(64, 512)
    w[3] = 0.0  # an all-zero row: zero scales, exact zeros back
    w[5, :32] = 0.25  # a constant block
    q = quantize(w, fmt)
    assert q.format.name == fmt and q.shape == (64, 512)
    assert q.nbytes == 64 * 512 // q.format.block_size * q.format.block_bytes
    back = q.dequantize()
    assert torch.equal(back[3], torch.zeros(512))
    rms = ((back - w).pow(2).mean() / w.pow(2).mean()).sqrt().item()
    assert rms < ROUND_TRIP_RMS[fmt], rms
    assert torch.equal(back, gguf_dequantize(q))  # valid blocks: gguf decodes them to the same values
    if fmt in ("q8_0", "q4_0", "q4_1"):  # gguf-py's quantizers (bit-exact with ggml's) give the same bytes
        ref = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType(q.format.gguf_type))
        assert np.array_equal(q.to_blocks(), ref)


def test_k_quant_search_beats_plain_min_max():
    """Q4_K's scale/min search lowers the error below the plain min/max choice of the same format."""
    torch.manual_seed(13)
    w = torch.randn(32, 512)
    searched = ((quantize(w, "q4_k").dequantize() - w).pow(2).mean()).sqrt()
    plain = ((quantize(w, "q4_1").dequantize() - w).pow(2).mean()).sqrt()  # min/max per 32 weights
    assert searched < plain


# -- the embedded model's own tensors --------------------------------------------------------------
@pytest.fixture(scope="module")
def embedded_tensors():
    from triforce.loading import embedded_model_path

    try:
        path = embedded_model_path()
    except Exception:
        pytest.skip("embedded model not installed")
    reader = gguf.GGUFReader(path)
    return {t.name: t for t in reader.tensors}


@needs_kernel
@pytest.mark.parametrize("name", ["blk.0.attn_q.weight", "blk.7.ffn_down.weight", "token_embd.weight"])
def test_embedded_model_tensors(embedded_tensors, name):
    t = embedded_tensors[name]
    q = QuantizedTensor.from_gguf(t)
    ref = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)).reshape(q.shape)
    lin = QuantLinear(q)
    torch.manual_seed(14)
    x = torch.randn(3, q.shape[1]).bfloat16()
    y = lin(x, torch.float32)
    exact = F.linear(x.float(), ref.bfloat16().float() if ROUNDS_TO_BF16 else ref)  # what the kernel multiplies by
    assert (y - exact).abs().max() <= 1e-5 * exact.abs().max()
    ids = torch.tensor([0, 1, q.shape[0] - 1, 100])
    assert torch.equal(lin.rows(ids, torch.float32), ref[ids])
    if name != "token_embd.weight":
        assert torch.equal(q.dequantize(), ref)
        assert_dense_result(lin, ref, None, x, torch.float32)
