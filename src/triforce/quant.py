"""Keep projection weights in GGUF's quantized blocks and multiply by them directly.

- `FORMATS`: the block formats (Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K): block size, bytes per block,
  GGUF type, the native kernel's code.
- `QuantizedTensor`: a [N, K] matrix as its raw GGUF blocks (row-major, one row's blocks after
  another, exactly as a GGUF file stores it), with a pure-PyTorch `dequantize` that reproduces
  gguf-py's float32 dequantization bit for bit (the fallback where the kernel cannot run, and the
  tests' reference).
- `quantize`: float weights -> blocks (Q8_0, Q4_0, Q4_1 as gguf-py/ggml do; Q4_K, Q5_K with a
  vectorized form of ggml's scale/min search).
- `QuantLinear`: the native kernel (kernels/quant.c) over one or more such matrices stacked along
  N. Each weight decodes to the bf16 value `dequantize().to(torch.bfloat16)` gives and sums in
  the packed-bf16 kernel's order, so results are bit-identical to `native.PackedLinear` on those
  weights, for any number of rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import native
from .formats import FORMATS, QuantFormat

_BY_GGUF_TYPE = {f.gguf_type: f for f in FORMATS.values()}


def get_format(fmt: str | QuantFormat | int) -> QuantFormat:
    """A format by name ("q4_k"), by itself, or by GGUF type number (or gguf.GGMLQuantizationType)."""
    if isinstance(fmt, QuantFormat):
        return fmt
    if isinstance(fmt, str):
        try:
            return FORMATS[fmt.lower()]
        except KeyError:
            raise ValueError(f"unknown quantization format {fmt!r}; known: {', '.join(FORMATS)}") from None
    try:
        return _BY_GGUF_TYPE[int(fmt)]
    except KeyError:
        raise ValueError(f"GGUF type {fmt!r} is not a supported block format") from None


def kernel_supports(fmt: str | QuantFormat | int) -> bool:
    """Whether the native kernel runs this format on this machine (every format in FORMATS, on
    CPUs where the native kernels run: AVX512-BF16 or AVX2)."""
    try:
        get_format(fmt)
    except ValueError:
        return False
    lib = native.library()
    return lib is not None and bool(lib.tf_has_quant_linear())


# -- decoding in PyTorch ---------------------------------------------------------------------------
def _f16(b: torch.Tensor) -> torch.Tensor:
    """[B, 2] uint8 -> [B, 1] float32 (exact)."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[B, ..., n] bytes -> [B, ..., 2, n]: low nibbles, then high nibbles."""
    return torch.stack([qs & 15, qs >> 4], dim=-2)


def _scale_min_k4(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 packed bytes [B, 12] -> 6-bit scales and mins [B, 8] (int64)."""
    s = s.long()
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([d & 63, (md & 15) | ((d >> 2) & 48)], dim=1)
    mn = torch.cat([m & 63, (md >> 4) | ((m >> 2) & 48)], dim=1)
    return sc, mn


def dequantize_blocks(blocks: torch.Tensor, fmt: str | QuantFormat | int) -> torch.Tensor:
    """[B, block_bytes] uint8 -> [B, block_size] float32, with gguf-py's operations in its order
    (each product and sum rounded to float32 on its own), hence bit-identical to it."""
    f = get_format(fmt)
    b = blocks
    B = b.shape[0]
    if f.name == "q8_0":
        return b[:, 2:].contiguous().view(torch.int8).float() * _f16(b[:, :2])
    if f.name == "q4_0":
        q = _nibbles(b[:, 2:]).reshape(B, 32).to(torch.int8) - 8
        return _f16(b[:, :2]) * q.float()
    if f.name == "q4_1":
        q = _nibbles(b[:, 4:]).reshape(B, 32).float()
        return _f16(b[:, :2]) * q + _f16(b[:, 2:4])
    if f.name in ("q4_k", "q5_k"):
        sc, mn = _scale_min_k4(b[:, 4:16])
        d = (_f16(b[:, 0:2]) * sc.float()).unsqueeze(-1)
        dm = (_f16(b[:, 2:4]) * mn.float()).unsqueeze(-1)
        if f.name == "q4_k":
            q = _nibbles(b[:, 16:].reshape(B, 4, 32)).reshape(B, 8, 32)
        else:
            ql = _nibbles(b[:, 48:].reshape(B, 4, 32)).reshape(B, 8, 32)
            shifts = torch.arange(8, dtype=torch.uint8).view(1, 8, 1)
            qh = (b[:, 16:48].unsqueeze(1) >> shifts) & 1
            q = ql | (qh << 4)
        return (d * q.float() - dm).reshape(B, 256)
    if f.name == "q6_k":
        ql = _nibbles(b[:, :128].reshape(B, 2, 64)).reshape(B, 8, 32)
        shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)
        qh = ((b[:, 128:192].reshape(B, 2, 1, 32) >> shifts) & 3).reshape(B, 8, 32)
        q = (ql | (qh << 4)).to(torch.int8) - 32
        d = (_f16(b[:, 208:210]) * b[:, 192:208].contiguous().view(torch.int8).float()).unsqueeze(-1)
        return (d * q.reshape(B, 16, 16).float()).reshape(B, 256)
    raise AssertionError(f.name)


class QuantizedTensor:
    """A [N, K] matrix stored as GGUF blocks: `blocks` is [N, K / block_size * block_bytes] uint8."""

    def __init__(self, blocks: torch.Tensor | np.ndarray, fmt: str | QuantFormat | int, shape: tuple[int, int]
                 ) -> None:
        self.format = get_format(fmt)
        N, K = int(shape[0]), int(shape[1])
        if K % self.format.block_size:
            raise ValueError(f"{self.format.name} needs K divisible by {self.format.block_size}, got {K}")
        row_bytes = K // self.format.block_size * self.format.block_bytes
        if isinstance(blocks, np.ndarray):
            blocks = torch.from_numpy(np.array(blocks, dtype=np.uint8, copy=True))  # owned, writable
        if blocks.dtype != torch.uint8 or blocks.numel() != N * row_bytes:
            raise ValueError(f"expected {N * row_bytes} uint8 bytes for {self.format.name} [{N}, {K}], "
                             f"got {blocks.numel()} {blocks.dtype}")
        self.blocks = blocks.reshape(N, row_bytes).contiguous()
        self.shape = (N, K)

    @classmethod
    def from_gguf(cls, tensor: Any) -> QuantizedTensor:
        """From a gguf.GGUFReader tensor (2-D, GGUF shape [K, N])."""
        K, N = (int(d) for d in tensor.shape)
        return cls(np.asarray(tensor.data), int(tensor.tensor_type), (N, K))

    @property
    def nbytes(self) -> int:
        return self.blocks.numel()

    def __repr__(self) -> str:
        return f"QuantizedTensor({self.format.name}, shape={self.shape}, {self.nbytes} bytes)"

    def to_blocks(self) -> np.ndarray:
        """The raw blocks as gguf-py takes them ([N, row bytes] uint8, e.g. for gguf.quants.dequantize)."""
        return self.blocks.numpy()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        N, K = self.shape
        flat = self.blocks.reshape(-1, self.format.block_bytes)
        return dequantize_blocks(flat, self.format).reshape(N, K).to(dtype)

    def rows(self, ids: torch.Tensor | Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows `ids` dequantized (an embedding lookup): [*ids.shape, K]."""
        ids = torch.as_tensor(ids, dtype=torch.long)
        picked = self.blocks[ids.reshape(-1)].reshape(-1, self.format.block_bytes)
        return dequantize_blocks(picked, self.format).reshape(*ids.shape, self.shape[1]).to(dtype)

    def permute_rows(self, perm: torch.Tensor | Sequence[int]) -> QuantizedTensor:
        """Row i of the result is row perm[i] of this one (blocks never straddle rows)."""
        perm = torch.as_tensor(perm, dtype=torch.long)
        if perm.numel() != self.shape[0]:
            raise ValueError(f"permutation of {perm.numel()} rows for a matrix of {self.shape[0]}")
        return QuantizedTensor(self.blocks[perm], self.format, self.shape)


# -- quantizing -----------------------------------------------------------------------------------
def _roundf(a: np.ndarray) -> np.ndarray:
    """C roundf: halves away from zero (ggml's Q8_0)."""
    return np.sign(a) * np.floor(np.abs(a) + np.float32(0.5))


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    return v.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _quantize_q8_0(x: np.ndarray) -> np.ndarray:
    d = np.abs(x).max(axis=1, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    q = _roundf(x * inv).astype(np.int8).view(np.uint8)
    return np.concatenate([_f16_bytes(d), q], axis=1)


def _pack_nibbles32(q: np.ndarray) -> np.ndarray:
    return (q[:, :16] | (q[:, 16:] << 4)).astype(np.uint8)


def _quantize_q4_0(x: np.ndarray) -> np.ndarray:
    imax = np.abs(x).argmax(axis=1)[:, None]
    d = np.take_along_axis(x, imax, axis=1) / np.float32(-8)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    q = np.trunc(x * inv + np.float32(8.5)).clip(0, 15).astype(np.uint8)
    return np.concatenate([_f16_bytes(d), _pack_nibbles32(q)], axis=1)


def _quantize_q4_1(x: np.ndarray) -> np.ndarray:
    hi, lo = x.max(axis=1, keepdims=True), x.min(axis=1, keepdims=True)
    d = (hi - lo) / np.float32(15)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    q = np.trunc((x - lo) * inv + np.float32(0.5)).clip(0, 15).astype(np.uint8)
    return np.concatenate([_f16_bytes(d), _f16_bytes(lo), _pack_nibbles32(q)], axis=1)


def _scale_min_search(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml's make_qkx2_quants for every row of x [S, n] at once (weighted least squares over a
    small grid of scales): returns (scale [S], -min [S], levels [S, n] in 0..nmax)."""
    f32 = np.float32
    lo = np.minimum(x.min(axis=1), f32(0))
    hi = x.max(axis=1)
    flat = hi == lo
    span = np.where(flat, f32(1), hi - lo).astype(f32)
    sum_w, sum_x = w.sum(axis=1), (w * x).sum(axis=1)
    iscale = f32(nmax) / span
    scale = f32(1) / iscale
    levels = np.clip(np.rint(iscale[:, None] * (x - lo[:, None])), 0, nmax).astype(f32)
    best = (w * (scale[:, None] * levels + lo[:, None] - x) ** 2).sum(axis=1)
    for step in range(nstep + 1):
        iscale = (f32(rmin + rdelta * step) + f32(nmax)) / span
        la = np.clip(np.rint(iscale[:, None] * (x - lo[:, None])), 0, nmax).astype(f32)
        sum_l, sum_l2, sum_xl = (w * la).sum(axis=1), (w * la * la).sum(axis=1), (w * la * x).sum(axis=1)
        D = sum_w * sum_l2 - sum_l * sum_l
        with np.errstate(divide="ignore", invalid="ignore"):
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            positive = this_min > 0
            this_scale = np.where(positive, sum_xl / sum_l2, this_scale)
            this_min = np.where(positive, f32(0), this_min)
            err = (w * (this_scale[:, None] * la + this_min[:, None] - x) ** 2).sum(axis=1)
        better = (D > 0) & (err < best)
        levels = np.where(better[:, None], la, levels)
        best = np.where(better, err, best)
        scale = np.where(better, this_scale, scale)
        lo = np.where(better, this_min, lo)
    scale = np.where(flat, f32(0), scale).astype(f32)
    levels = np.where(flat[:, None], f32(0), levels)
    return scale, (-lo).astype(f32), levels


def _quantize_k(x: np.ndarray, bits: int) -> np.ndarray:
    """Q4_K (bits 4) or Q5_K (bits 5) superblocks of x [B, 256], as ggml's reference quantizer
    does: per 32-weight sub-block a scale and a min searched by weighted least squares, both then
    quantized to 6 bits against the superblock's f16 scales, and the levels recomputed from them."""
    f32, B = np.float32, x.shape[0]
    nmax = (1 << bits) - 1
    sub = x.reshape(B * 8, 32)
    av = np.sqrt((sub * sub).sum(axis=1, keepdims=True) / f32(32))
    w = av + np.abs(sub)
    if bits == 4:
        scales, mins, levels = _scale_min_search(sub, w, nmax, -1.0, 0.1, 20)
    else:
        scales, mins, levels = _scale_min_search(sub, w, nmax, -0.5, 0.1, 15)
    scales, mins, levels = scales.reshape(B, 8), mins.reshape(B, 8), levels.reshape(B, 8, 32)
    max_scale, max_min = scales.max(axis=1, keepdims=True), mins.max(axis=1, keepdims=True)
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, f32(63) / max_scale, f32(0)).astype(f32)
        inv_min = np.where(max_min > 0, f32(63) / max_min, f32(0)).astype(f32)
    ls = np.minimum(np.rint(inv_scale * scales), 63).astype(np.uint8)
    lm = np.minimum(np.rint(inv_min * mins), 63).astype(np.uint8)
    d16, dmin16 = (max_scale / f32(63)).astype(np.float16), (max_min / f32(63)).astype(np.float16)
    d = d16.astype(f32) * ls.astype(f32)
    dm = dmin16.astype(f32) * lm.astype(f32)
    with np.errstate(divide="ignore", invalid="ignore"):
        redo = np.clip(np.rint((x.reshape(B, 8, 32) + dm[..., None]) / d[..., None]), 0, nmax)
    levels = np.where(d[..., None] != 0, redo, levels).astype(np.uint8)
    packed = np.zeros((B, 12), dtype=np.uint8)
    packed[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    packed[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (ls[:, 4:] & 15) | ((lm[:, 4:] & 15) << 4)
    pairs = levels.reshape(B, 4, 2, 32)  # sub-blocks 2c and 2c+1 share 32 bytes
    qs = ((pairs[:, :, 0] & 15) | ((pairs[:, :, 1] & 15) << 4)).reshape(B, 128).astype(np.uint8)
    head = [d16.reshape(B, 1).view(np.uint8), dmin16.reshape(B, 1).view(np.uint8), packed]
    if bits == 4:
        return np.concatenate([*head, qs], axis=1)
    fifth = (levels.reshape(B, 8, 32) >> 4).astype(np.uint8)  # bit j of byte i: sub-block j, weight i
    qh = (fifth << np.arange(8, dtype=np.uint8)[None, :, None]).sum(axis=1, dtype=np.uint8)
    return np.concatenate([*head, qh, qs], axis=1)


_QUANTIZERS = {
    "q8_0": _quantize_q8_0,
    "q4_0": _quantize_q4_0,
    "q4_1": _quantize_q4_1,
    "q4_k": lambda x: _quantize_k(x, 4),
    "q5_k": lambda x: _quantize_k(x, 5),
}


def quantize(weight: torch.Tensor | np.ndarray, fmt: str | QuantFormat | int) -> QuantizedTensor:
    """Quantize a [N, K] float matrix to `fmt` blocks (q8_0, q4_0, q4_1, q4_k or q5_k). Q8_0,
    Q4_0 and Q4_1 give the bytes gguf-py's quantizers give. Q4_K and Q5_K follow ggml's reference
    quantizers (make_qkx2_quants' search, then 6-bit scales); summed in another order, they pick
    the same blocks about half the time and have the same RMS error to 0.1%."""
    f = get_format(fmt)
    if f.name not in _QUANTIZERS:
        raise NotImplementedError(f"quantizing to {f.name} is not implemented; use one of {', '.join(_QUANTIZERS)}")
    w = weight.detach().float().cpu().numpy() if isinstance(weight, torch.Tensor) else np.asarray(weight, np.float32)
    if w.ndim != 2 or w.shape[1] % f.block_size:
        raise ValueError(f"{f.name} needs a 2-D matrix with K divisible by {f.block_size}, got {w.shape}")
    N, K = w.shape
    out = np.empty((N, K // f.block_size * f.block_bytes), dtype=np.uint8)
    rows_per = max(1, (1 << 16) // K)  # bounded temporaries
    for r in range(0, N, rows_per):
        part = np.ascontiguousarray(w[r:r + rows_per], dtype=np.float32).reshape(-1, f.block_size)
        out[r:r + rows_per] = _QUANTIZERS[f.name](part).reshape(-1, out.shape[1])
    return QuantizedTensor(torch.from_numpy(out), f, (N, K))


# -- the kernel -----------------------------------------------------------------------------------
@dataclass
class _Segment:
    format: QuantFormat
    packed: torch.Tensor  # tf_quant_repack's groups of 16 rows
    n0: int  # first output column
    n: int  # output columns

    def __post_init__(self) -> None:
        self.packed_ptr = self.packed.data_ptr()


class QuantLinear:
    """y = x W^T (+ b) with W the row-wise concatenation of `parts` (e.g. q|k|v), each in its own
    block format, read by the native kernel straight from the blocks (repacked once, same bytes).
    Consecutive parts of one format share one kernel call; parts of different formats write their
    column slices of the one output. Needs `kernel_supports` (raises RuntimeError otherwise)."""

    def __init__(self, parts: QuantizedTensor | Sequence[QuantizedTensor], bias: torch.Tensor | None = None) -> None:
        parts = [parts] if isinstance(parts, QuantizedTensor) else list(parts)
        if not parts:
            raise ValueError("QuantLinear needs at least one part")
        lib = native.library()
        if lib is None or not lib.tf_has_quant_linear():
            raise RuntimeError("the quantized-projection kernel needs the native kernels (AVX512-BF16 or AVX2)")
        self.lib = lib
        self.in_features = parts[0].shape[1]
        if any(p.shape[1] != self.in_features for p in parts):
            raise ValueError("every part needs the same number of input features")
        self.out_features = sum(p.shape[0] for p in parts)
        self._nbytes = sum(p.nbytes for p in parts)
        self.segments: list[_Segment] = []
        groups: list[list[QuantizedTensor]] = []
        for p in parts:
            if groups and groups[-1][-1].format == p.format:
                groups[-1].append(p)
            else:
                groups.append([p])
        n0 = 0
        for group in groups:
            n = sum(p.shape[0] for p in group)
            blocks = torch.cat([p.blocks for p in group]) if len(group) > 1 else group[0].blocks
            self.segments.append(_Segment(group[0].format, self._repack(blocks, group[0].format, n), n0, n))
            n0 += n
        if bias is not None and bias.numel() != self.out_features:
            raise ValueError(f"bias of {bias.numel()} for {self.out_features} outputs")
        self.bias = bias.to(torch.bfloat16).contiguous() if bias is not None else None
        self._bias_ptr = self.bias.data_ptr() if self.bias is not None else 0
        self._kernel = lib.tf_quant_linear

    def _repack(self, blocks: torch.Tensor, f: QuantFormat, N: int) -> torch.Tensor:
        K = self.in_features
        if not self.lib.tf_quant_format_ok(f.code, K):
            raise ValueError(f"the kernel cannot take {f.name} with K = {K}")
        packed = torch.empty(((N + 15) // 16) * 16 * (K // f.block_size) * f.block_bytes, dtype=torch.uint8)
        self.lib.tf_quant_repack(blocks.data_ptr(), packed.data_ptr(), f.code, N, K)
        return packed

    @property
    def nbytes(self) -> int:
        """Bytes of weight blocks (what a pass reads), as stored in the GGUF."""
        return self._nbytes

    def __call__(self, x: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        if x.dtype != torch.bfloat16 or not x.is_contiguous():
            x = x.to(torch.bfloat16).contiguous()
        if out_dtype is torch.float32:
            is_f32, size = 1, 4
        elif out_dtype is torch.bfloat16:
            is_f32, size = 0, 2
        else:
            raise ValueError(f"out_dtype must be bf16 or float32, not {out_dtype}")
        K, N = self.in_features, self.out_features
        if x.shape[-1] != K:
            raise ValueError(f"expected {K} input features, got {x.shape[-1]}")
        y = torch.empty(*x.shape[:-1], N, dtype=out_dtype)
        M = x.numel() // K
        if M == 0:
            return y
        xp, yp, threads = x.data_ptr(), y.data_ptr(), torch.get_num_threads()
        bias = self._bias_ptr
        for s in self.segments:  # usually one
            code = self._kernel(xp, s.packed_ptr, s.format.code, bias + 2 * s.n0 if bias else None,
                                yp + size * s.n0, is_f32, N, M, s.n, K, threads)
            if code != 0:
                raise RuntimeError(f"quantized linear kernel failed with code {code}")
        return y

    def rows(self, ids: torch.Tensor | Sequence[int], dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """Rows `ids` of W dequantized by the kernel (an embedding lookup from a tied output head):
        [*ids.shape, K], equal to the parts' `dequantize()` rows (bf16: rounded to nearest even)."""
        if dtype not in (torch.bfloat16, torch.float32):
            raise ValueError(f"dtype must be bf16 or float32, not {dtype}")
        ids = torch.as_tensor(ids, dtype=torch.long)
        flat = ids.reshape(-1)
        if flat.numel() and ((flat < 0) | (flat >= self.out_features)).any():
            raise IndexError(f"row id out of range for {self.out_features} rows")
        out = torch.empty(flat.numel(), self.in_features, dtype=dtype)
        for s in self.segments:
            mine = ((flat >= s.n0) & (flat < s.n0 + s.n)).nonzero().flatten()
            if mine.numel() == 0:
                continue
            local = (flat[mine] - s.n0).contiguous()
            part = out if mine.numel() == flat.numel() else torch.empty(mine.numel(), self.in_features, dtype=dtype)
            code = self.lib.tf_quant_rows(s.packed.data_ptr(), s.format.code, s.n, self.in_features,
                                          local.data_ptr(), local.numel(), part.data_ptr(),
                                          int(dtype == torch.float32))
            if code != 0:
                raise RuntimeError(f"quantized row lookup failed with code {code}")
            if part is not out:
                out[mine] = part
        return out.view(*ids.shape, self.in_features)

    def dense(self) -> torch.Tensor:
        """The weight [N, K] in float32 (to derive another copy of it)."""
        return self.rows(torch.arange(self.out_features), torch.float32)
