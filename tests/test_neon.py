"""The NEON kernels (AArch64), cross-compiled with native.py's flags and run under qemu-user by
tests/kernel_harness.c: projections (bf16 and GGUF blocks) and attention against PyTorch and
gguf-py, every row of a pass equal to that row alone, and the projections equal to the AVX2
kernel's bit for bit (the same weights, two chains per output summed in the same order)."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from triforce import native
from triforce.attention import attend_torch
from triforce.quant import FORMATS, QuantLinear

from .test_quant import gguf_dequantize, random_blocks

CROSS = shutil.which("aarch64-linux-gnu-gcc")
QEMU = shutil.which("qemu-aarch64")
SYSROOT = "/usr/aarch64-linux-gnu"

pytestmark = pytest.mark.skipif(
    not (CROSS and QEMU), reason="needs gcc-aarch64-linux-gnu and qemu-user (scripts/test.sh installs them)")


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    """run(op, header ints, *tensors) -> the output's bytes, from the NEON build under qemu."""
    work = tmp_path_factory.mktemp("neon")
    exe = work / "kernel_harness"
    flags = [f for f in native._FLAGS if f not in ("-shared", "-fPIC")] + native.ISA_FLAGS["neon"]
    sources = [*map(str, native._SOURCES), str(Path(__file__).with_name("kernel_harness.c"))]
    built = subprocess.run([CROSS, *flags, *sources, "-o", str(exe), "-lm"], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr

    def run(op: str, header: list[int], *tensors: torch.Tensor) -> bytes:
        src, out = work / "in.bin", work / "out.bin"
        src.write_bytes(struct.pack(f"<{len(header)}i", *header)
                        + b"".join(t.contiguous().view(torch.uint8).numpy().tobytes() for t in tensors))
        done = subprocess.run([QEMU, "-L", SYSROOT, str(exe), op, str(src), str(out)], capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr
        return out.read_bytes()

    return run


def _floats(raw: bytes, shape: tuple[int, ...], bf16: bool) -> torch.Tensor:
    t = torch.frombuffer(bytearray(raw), dtype=torch.bfloat16 if bf16 else torch.float32)
    return t.reshape(shape).float()


def test_the_neon_build_runs_the_projections_natively(harness):
    assert struct.unpack("<2i", harness("isa", [])) == (1, 1)  # bf16 and block-format weights


def neon_linear(harness, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, f32: bool) -> torch.Tensor:
    (M, K), N = x.shape, w.shape[0]
    raw = harness("linear", [M, N, K, int(b is not None), int(f32), 2], x, w, *([b] if b is not None else []))
    return _floats(raw, (M, N), not f32)


@pytest.mark.parametrize("M", [1, 2, 4, 7, 13])
def test_neon_projections_match_pytorch_rows_alone_and_avx2(harness, M):
    """y = x W^T + b for N not a multiple of the 16-output block; rows in tiles of near-equal
    heights give each row the bits it has alone; the AVX2 kernel gives the same bits."""
    torch.manual_seed(M)
    w = torch.randn(40, 96, dtype=torch.bfloat16)
    b = torch.randn(40, dtype=torch.bfloat16)
    x = torch.randn(M, 96, dtype=torch.bfloat16)
    ref = F.linear(x.float(), w.float(), b.float())
    got = neon_linear(harness, x, w, b, True)
    assert (got - ref).abs().max() < 1e-5 * ref.abs().max()
    got16 = neon_linear(harness, x, w, b, False)
    assert (got16 - ref).abs().max() < 1e-2 * ref.abs().max()
    assert torch.equal(got16, got.bfloat16().float())  # the bf16 output is the float32 one rounded
    for i in {0, M // 2, M - 1}:
        assert torch.equal(neon_linear(harness, x[i : i + 1], w, b, True)[0], got[i])
    no_bias = F.linear(x.float(), w.float())
    assert (neon_linear(harness, x, w, None, True) - no_bias).abs().max() < 1e-5 * no_bias.abs().max()
    if "avx2" not in native.cpu_isas():
        pytest.skip("this CPU cannot run the AVX2 kernels to compare bits with")
    try:
        native.set_isa("avx2")
        avx2 = native.PackedLinear(w, b)(x, torch.float32)
    finally:
        native.set_isa(None)
    assert torch.equal(got, avx2)


def neon_attention(harness, q, k, v, num_rows: int, first_row: int, chunks=None, chunk_size: int = 0,
                   dense_start: int = 0) -> torch.Tensor:
    T, nq, hd = q.shape
    nkv, cap, _ = k.shape
    bf16 = k.dtype == torch.bfloat16
    n_chunks = 0 if chunks is None else chunks.shape[1]
    scale = struct.unpack("<i", struct.pack("<f", hd**-0.5))[0]
    header = [T, nq, nkv, hd, int(bf16), 0, cap, num_rows, first_row, n_chunks, chunk_size, dense_start, 2, scale]
    extra = [] if chunks is None else [chunks.int()]
    return _floats(harness("attention", header, q.float(), k, v, *extra), (T, nq, hd), False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("heads", [(6, 2, 64), (4, 1, 128), (4, 4, 48)])
def test_neon_attention_matches_pytorch_and_every_row_equals_it_alone(harness, dtype, heads):
    """A 5-row pass straddling the 2048-key split: close to PyTorch's attention, dense and over a
    retrieval selection (chunks + dense tail), and each row bit-identical to decoding it alone."""
    nq, nkv, hd = heads
    torch.manual_seed(hd)
    T, first = 5, 2046
    k = torch.randn(nkv, first + T, hd).to(dtype)
    v = torch.randn(nkv, first + T, hd).to(dtype)
    q = torch.randn(T, nq, hd)
    together = neon_attention(harness, q, k, v, first + T, first)
    reference = attend_torch(q, k.float(), v.float(), first + T, first)
    assert (together - reference).abs().max() < (1e-5 if dtype == torch.float32 else 2e-2)
    for t in (0, 2, T - 1):
        alone = neon_attention(harness, q[t : t + 1], k, v, first + t + 1, first + t)
        assert torch.equal(alone[0], together[t]), t
    chunk, dense = 8, first - 40
    chunks = torch.stack([torch.randperm(dense // chunk)[:100].sort().values * chunk for _ in range(nkv)])
    selected = neon_attention(harness, q, k, v, first + T, first, chunks, chunk, dense)
    keys = torch.stack([torch.cat([*(torch.arange(c, c + chunk) for c in row.tolist()), torch.arange(dense, first + T)])
                        for row in chunks])
    gathered_k = torch.stack([k[g, keys[g]] for g in range(nkv)]).float()
    gathered_v = torch.stack([v[g, keys[g]] for g in range(nkv)]).float()
    sel_ref = attend_torch(q, gathered_k, gathered_v, keys.shape[1], keys.shape[1] - T)
    assert (selected - sel_ref).abs().max() < (1e-5 if dtype == torch.float32 else 2e-2)
    alone = neon_attention(harness, q[T - 1 :], k, v, first + T, first + T - 1, chunks, chunk, dense)
    assert torch.equal(alone[0], selected[T - 1])


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_neon_block_projections_match_gguf_rows_alone_and_avx2(harness, fmt):
    """Every GGUF block format straight from its blocks: float32 sums of gguf-py's weights, each
    row alone as in a pass, the same bits as the AVX2 kernel; and rows of the matrix (embedding
    lookups) are gguf-py's values exactly."""
    K = 512
    q = random_blocks(fmt, 40, K, seed=3)
    w = gguf_dequantize(q)
    code = FORMATS[fmt].code
    torch.manual_seed(0)
    x = torch.randn(5, K, dtype=torch.bfloat16)
    b = torch.randn(40, dtype=torch.bfloat16)

    def neon(rows: torch.Tensor, f32: bool = True) -> torch.Tensor:
        raw = harness("quant", [code, len(rows), 40, K, 1, int(f32), 2], q.blocks, rows, b)
        return _floats(raw, (len(rows), 40), not f32)

    got = neon(x)
    exact = F.linear(x.double(), w.double(), b.double())
    assert (got.double() - exact).abs().max() <= 1e-5 * exact.abs().max() + 1e-6
    assert torch.equal(neon(x, f32=False), got.bfloat16().float())
    for i in (0, 4):
        assert torch.equal(neon(x[i : i + 1])[0], got[i])
    ids = torch.tensor([0, 17, 39], dtype=torch.int64)
    rows = _floats(harness("quant_rows", [code, 40, K, 3, 1], q.blocks, ids), (3, K), False)
    assert torch.equal(rows, w[ids])
    if "avx2" not in native.cpu_isas():
        pytest.skip("this CPU cannot run the AVX2 kernels to compare bits with")
    try:
        native.set_isa("avx2")
        avx2 = QuantLinear(q, b)(x, torch.float32)
    finally:
        native.set_isa(None)
    assert torch.equal(got, avx2)
