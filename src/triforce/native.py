"""Build and load the native CPU kernels (kernels/*.c) on first use.

The C files are compiled with the machine's C compiler for one instruction set (ISA) and cached
under the user's cache directory, keyed by source, flags and CPU. The ISA is the best the CPU has
of "avx512" (AVX512 with BF16; AMX tiles too where present) and "avx2" (AVX2 + FMA + F16C) on
x86-64, "neon" (Advanced SIMD) on AArch64, or the one TRIFORCE_ISA names (avx512|avx2|neon|none,
so each variant can be tested and measured on one machine; NEON is tested under qemu-user only).
The kernels link OpenMP by soname, so they share the libgomp thread pool PyTorch has already
loaded. TRIFORCE_ISA=none (or TRIFORCE_NATIVE=0), another OS or CPU, or a failed build leave the
PyTorch paths in charge; `kernels()` names the path that runs.

- attention.c: decoding/verification attention over a cache buffer (dense or retrieval chunks)
- linear.c:    bf16 projections from packed weights at memory bandwidth
- glue.c:      RMSNorm, rotary embedding + cache write, SiLU-gate, each one call
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from .errors import TriforceError

MAX_KERNEL_QUERIES = 64  # beyond this many new tokens (prefill chunks) SDPA is compute-efficient
# ... except for bf16 caches on CPUs with AVX512-BF16 and no AMX, where the kernel beats
# PyTorch's CPU flash attention even for 1024-token prefill chunks; see `prefill_on_kernel`.
_SOURCES = sorted((Path(__file__).with_name("kernels")).glob("*.c"))
_FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC", "-std=gnu11"]
# Per ISA: the compiler flags and the CPU features (/proc/cpuinfo names) it needs.
# AVX2 builds without contraction: its quantized decoding rounds each product as gguf-py does.
# NEON builds without contraction too: its scalar code then rounds as the x86 builds' does.
ISA_FLAGS = {"avx512": ["-march=native"], "avx2": ["-march=x86-64-v3", "-mtune=native", "-ffp-contract=off"],
             "neon": ["-march=armv8-a", "-ffp-contract=off"]}
ISA_NEEDS = {
    "avx512": ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "fma", "f16c"),
    "avx2": ("avx2", "fma", "f16c"),
    "neon": ("asimd",),
}
ISA_MACHINE = {"avx512": "x86_64", "avx2": "x86_64", "neon": "aarch64"}  # platform.machine() of each
ISA_CHOICES = ("auto", *ISA_FLAGS, "none")
_library: ctypes.CDLL | None | bool = False  # False: not tried yet
_isa = "pytorch"  # the path that runs once library() has been called
_ENV_ISA = os.environ.get("TRIFORCE_ISA")  # what set_isa(None) returns to


def cache_dir() -> Path:
    root = os.environ.get("TRIFORCE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "triforce"
    )
    return Path(root)


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def _machine() -> str:
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def cpu_isas() -> list[str]:
    """The kernel ISAs this CPU can run, best first."""
    flags = set(_cpu_signature().split())
    return [isa for isa, needs in ISA_NEEDS.items() if ISA_MACHINE[isa] == _machine() and flags.issuperset(needs)]


def _checked_isa(value: str, name: str) -> str:
    """value, normalised, if it is one of ISA_CHOICES; else an error naming the setting."""
    isa = value.strip().lower() or "auto"
    if isa not in ISA_CHOICES:
        raise TriforceError(f"{name} must be one of {', '.join(ISA_CHOICES)}, got {isa!r}")
    return isa


def requested_isa() -> str:
    """The ISA to build for: TRIFORCE_ISA (validated here), else the best the CPU runs, else "none"."""
    wanted = _checked_isa(os.environ.get("TRIFORCE_ISA", "auto"), "TRIFORCE_ISA")
    if os.environ.get("TRIFORCE_NATIVE", "1") == "0" or wanted == "none":
        return "none"
    runs = cpu_isas()
    if wanted == "auto":
        return runs[0] if runs else "none"
    if wanted not in runs:
        if ISA_MACHINE[wanted] != _machine():
            missing = [f"an {ISA_MACHINE[wanted].replace('_', '-')} CPU"]
        else:
            missing = [f for f in ISA_NEEDS[wanted] if f not in _cpu_signature().split()]
        raise TriforceError(f"the {wanted} kernels need {', '.join(missing)}, which this CPU "
                            f"lacks (it runs: {', '.join(runs + ['none'])})")
    return wanted


def _build(isa: str) -> Path:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler found")
    flags = [*_FLAGS, *ISA_FLAGS[isa]]
    source = b"".join(p.read_bytes() for p in sorted(_SOURCES[0].parent.glob("*.[ch]")))
    key = hashlib.sha256(
        source + " ".join(flags).encode() + _cpu_signature().encode() + compiler.encode()
    ).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"triforce-{isa}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / "triforce.so"
        result = subprocess.run(
            [compiler, *flags, *map(str, _SOURCES), "-o", str(built), "-lm"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if result.returncode != 0:
            raise RuntimeError(f"compiling the native kernels failed: {result.stderr.strip()[:500]}")
        os.replace(built, target)  # atomic: concurrent builders each publish a whole file
    return target


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    i, n, f, p = ctypes.c_int, ctypes.c_long, ctypes.c_float, ctypes.c_void_p  # n: a long
    signatures = {
        "tf_attention": ([p, p, p, i, n, p, i, i, i, i, i, p, i, i, i, i, i, f, i], i),
        "tf_rope_attention_many": ([p, p, p, p, p, p, p, i, i, i, i, i, f, i], i),
        "tf_attention_staged": ([i], i),
        "tf_pack_weight": ([p, p, i, i], None),
        "tf_linear_bf16": ([p, p, p, p, i, i, i, i, i], i),
        "tf_has_bf16_linear": ([], i),
        "tf_mac_peak": ([n, i, i], f),
        "tf_mac_lanes": ([], i),
        "tf_rms_norm": ([p, p, p, i, i, f, i], None),
        "tf_rope_store": ([p, p, p, p, p, p, p, n, i, i, i, i, i, i], None),
        "tf_silu_mul": ([p, p, i, i, i], None),
        "tf_quant_repack": ([p, p, i, i, i], None),  # quant.py: GGUF-block projections
        "tf_quant_linear": ([p, p, i, p, p, i, n, i, i, i, i], i),
        "tf_quant_rows": ([p, i, i, i, p, i, p, i], i),
        "tf_quant_format_ok": ([i, i], i),
        "tf_has_quant_linear": ([], i),
    }
    for name, (args, res) in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    return lib


def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they cannot be built (PyTorch paths then run)."""
    global _library, _isa
    if _library is False:
        isa = requested_isa()  # a bad TRIFORCE_ISA raises here, every time until it is fixed
        _library, _isa = None, "pytorch"
        if isa != "none" and sys.platform.startswith("linux"):
            try:
                _library, _isa = _declare(ctypes.CDLL(str(_build(isa)))), isa
            except Exception as exc:  # any build/load failure falls back, once, with a warning
                warnings.warn(f"triforce: native kernels unavailable ({exc}); using PyTorch", stacklevel=2)
    return _library or None


def kernels() -> str:
    """The path the model's hot loops run on: "avx512", "avx2", "neon" or "pytorch"."""
    library()
    return _isa


def set_isa(isa: str | None) -> str:
    """Choose the kernels' ISA for models loaded afterwards: one of ISA_CHOICES, or None for the
    environment's choice (tests and benchmarks compare the paths in one process). Returns the
    path that now runs (see `kernels`)."""
    global _library
    isa = _ENV_ISA if isa is None else _checked_isa(isa, "isa")
    if isa is None:
        os.environ.pop("TRIFORCE_ISA", None)
    else:
        os.environ["TRIFORCE_ISA"] = isa
    os.environ.pop("TRIFORCE_NATIVE", None)
    _library = False
    return kernels()


def prefill_on_kernel(t: torch.Tensor) -> bool:
    """Whether passes of any length over bf16 cache buffer `t` go through the attention kernel.
    Measured on AMD EPYC (Zen 5), one layer, 1024 new tokens after 0-16K cached ones: 1.9-3.0x
    faster than PyTorch's flash attention (embedded shape and Llama-8B's), 3.1-3.6x since the
    score tiles stay in registers (`triforce bench kernels` re-measures it). Not on CPUs with
    AMX tiles, which PyTorch's bf16 matrix code can use (the two were not compared there), nor
    for fp32 caches, where the kernel is 0.6-1.0x PyTorch's, nor on the AVX2 kernels, whose
    attention has no bf16 dot products."""
    return t.dtype == torch.bfloat16 and usable_for(t) and kernels() == "avx512" and not _cpu_has_amx()


@functools.cache
def _cpu_has_amx() -> bool:
    return "amx_bf16" in _cpu_signature().split()


def _is_bf16(t: torch.Tensor) -> int:
    if t.dtype == torch.bfloat16:
        return 1
    if t.dtype == torch.float32:
        return 0
    raise ValueError(f"native kernels take bf16 or fp32 tensors, not {t.dtype}")


def usable_for(t: torch.Tensor) -> bool:
    return library() is not None and t.device.type == "cpu" and t.dtype in (torch.bfloat16, torch.float32)


# -- attention --------------------------------------------------------------------------------
def chunk_args(chunks: torch.Tensor | None, dense_start: int) -> tuple[torch.Tensor | None, int, int]:
    """The kernel's view of a key selection: (chunks as contiguous int32 or None, their count,
    dense_start, which only means something alongside chunks). Keep the returned tensor alive
    until the kernel call returns."""
    if chunks is None:
        return None, 0, 0
    if chunks.dtype != torch.int32 or not chunks.is_contiguous():
        chunks = chunks.to(torch.int32).contiguous()
    return chunks, chunks.shape[1], dense_start


def _check_kv(k: torch.Tensor, v: torch.Tensor, head_dim: int) -> None:
    if k.stride(2) != 1 or k.stride(1) != head_dim or v.stride() != k.stride():
        raise ValueError("kernel needs K/V with contiguous rows and equal layouts")


def _checked(code: int) -> None:
    if code != 0:
        raise RuntimeError(f"attention kernel failed with code {code}")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_rows: int,
    first_row: int,
    chunks: torch.Tensor | None = None,
    chunk_size: int = 0,
    dense_start: int = 0,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """See attention.py for the contract. q [T, Hq, D] (float32 preferred); k/v [Hkv, cap, D]."""
    lib = library()
    assert lib is not None
    T, nq, hd = q.shape
    nkv = k.shape[0]
    _check_kv(k, v, hd)
    qf = q if (q.dtype == torch.float32 and q.is_contiguous()) else q.float().contiguous()
    out_dtype = out_dtype or q.dtype
    out = torch.empty(T, nq, hd, dtype=out_dtype)
    chunks, n_chunks, dense_start = chunk_args(chunks, dense_start)
    _checked(lib.tf_attention(
        qf.data_ptr(), k.data_ptr(), v.data_ptr(), _is_bf16(k), k.stride(0), out.data_ptr(), _is_bf16(out),
        T, nq, nkv, hd, chunks.data_ptr() if chunks is not None else None, n_chunks, chunk_size, dense_start,
        num_rows, first_row, hd**-0.5, torch.get_num_threads(),
    ))
    return out


def set_staged_attention(on: bool) -> bool:
    """Choose how passes of several rows over bf16 caches run on CPUs with AVX512-BF16: staged
    (the block's keys and values converted once, then every row's scores, softmax and p.V each in
    one loop; the default) or grouped (each group of up to four rows through all three before the
    next). Rows get the same bits either way; `triforce bench kernels` times both. Returns the
    previous choice."""
    lib = library()
    assert lib is not None
    return bool(lib.tf_attention_staged(int(on)))


def rope_attention_many(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, fields: list[list[int]],
    num_heads: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`rope_store` then `attention` for one or several sequences in one call (a layer's step).
    qkv [N, Hq + 2 Hkv, D]: the sequences' tokens one after another; positions [N] int64;
    fields: per sequence [k, v (addresses), head_stride, row0, T, chunks (address or 0),
    n_chunks, chunk_size, dense_start]. The caches share qkv's dtype. Returns (attention
    output [N, Hq, D] in qkv's dtype, rotated queries [N, Hq, D] float32)."""
    lib = library()
    assert lib is not None
    N, heads, D = qkv.shape
    qkv = qkv.contiguous()
    q = torch.empty(N, num_heads, D, dtype=torch.float32)
    out = torch.empty(N, num_heads, D, dtype=qkv.dtype)
    table = torch.tensor(fields, dtype=torch.int64)
    _checked(lib.tf_rope_attention_many(
        qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), positions.data_ptr(), q.data_ptr(), out.data_ptr(),
        table.data_ptr(), len(fields), num_heads, (heads - num_heads) // 2, D, _is_bf16(qkv), D**-0.5,
        torch.get_num_threads(),
    ))
    return out, q


# -- projections -----------------------------------------------------------------------------
def packed_linear_supported() -> bool:
    lib = library()
    return lib is not None and bool(lib.tf_has_bf16_linear())


class PackedLinear:
    """y = x W^T (+ b) with bf16 weights packed for the native kernel (see kernels/linear.c)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        lib = library()
        assert lib is not None
        self.out_features, self.in_features = weight.shape
        self.lib = lib
        blocks = (self.out_features + 15) // 16
        w = weight.to(torch.bfloat16).contiguous()
        self.packed = torch.empty(blocks * 16 * self.in_features, dtype=torch.bfloat16)
        lib.tf_pack_weight(w.data_ptr(), self.packed.data_ptr(), self.out_features, self.in_features)
        self.bias = bias.to(torch.bfloat16).contiguous() if bias is not None else None

    @property
    def nbytes(self) -> int:
        return self.out_features * self.in_features * 2

    def unpacked(self) -> torch.Tensor:
        """The weight [N, K] as given (bf16), undoing the packing."""
        K = self.in_features
        blocks = self.packed.view(-1, K // 2, 16, 2)
        return blocks.permute(0, 2, 1, 3).reshape(-1, K)[: self.out_features]

    def __call__(self, x: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        shape = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != torch.bfloat16 or not x2.is_contiguous():
            x2 = x2.to(torch.bfloat16).contiguous()
        y = torch.empty(x2.shape[0], self.out_features, dtype=out_dtype)
        code = self.lib.tf_linear_bf16(
            x2.data_ptr(), self.packed.data_ptr(), self.bias.data_ptr() if self.bias is not None else None,
            y.data_ptr(), int(out_dtype == torch.float32), x2.shape[0], self.out_features, self.in_features,
            torch.get_num_threads(),
        )
        if code != 0:
            raise RuntimeError("bf16 linear kernel unavailable")
        return y.view(*shape, self.out_features)


DOT_CHAINS = (2, 4, 6, 8, 12, 16)  # the chain counts tf_mac_peak is compiled for
MAC_INSTRUCTION = {32: "bf16 pair dot product", 8: "float32 multiply-add (8 lanes)",
                   4: "float32 multiply-add (4 lanes)"}
# Chains that reach each instruction's ceiling: AVX2's 16 registers hold 8 chains, the two weights
# and a broadcast; more chains spill (measured: 12 and 16 chains ran at half the rate of 8).
MAC_CHAINS = {32: 16, 8: 8, 4: 16}


def mac_instruction() -> str | None:
    """The multiply-add instruction the kernels' hot loops are built on, or None without kernels."""
    lib = library()
    return MAC_INSTRUCTION.get(lib.tf_mac_lanes()) if lib is not None else None


def mac_peak_gmacs(threads: int, seconds: float = 0.5, chains: int | None = None) -> float | None:
    """Measured multiply-adds per second (GMAC/s) of `threads` threads running nothing but the
    kernels' multiply-add instruction (`mac_instruction`) in `chains` (one of DOT_CHAINS; default:
    as many as reach the ceiling) independent chains: the kernels' compute ceiling. None without
    kernels."""
    if chains is not None and chains not in DOT_CHAINS:
        raise ValueError(f"chains must be one of {DOT_CHAINS}, got {chains}")
    lib = library()
    lanes = lib.tf_mac_lanes() if lib is not None else 0
    if not lanes:
        return None
    chains = chains or MAC_CHAINS[lanes]
    iterations = 1 << 16
    while True:
        t0 = time.perf_counter()
        lib.tf_mac_peak(iterations, threads, chains)
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return iterations * chains * lanes * threads / elapsed / 1e9
        iterations = int(iterations * max(2.0, 1.2 * seconds / max(elapsed, 1e-6)))


# -- glue ------------------------------------------------------------------------------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    lib = library()
    assert lib is not None
    x = x.contiguous()
    out = torch.empty_like(x)
    H = x.shape[-1]
    lib.tf_rms_norm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // H, H, eps, _is_bf16(x))
    return out


def rope_store(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    row: int,
    num_heads: int,
) -> torch.Tensor:
    """Rotate q and k of qkv [T, Hq + 2 Hkv, D] at `positions` [T]; store k and v at rows
    row.. of k_buffer/v_buffer [Hkv, cap, D]; return q [T, Hq, D] in float32."""
    lib = library()
    assert lib is not None
    T, heads, D = qkv.shape
    nkv = (heads - num_heads) // 2
    qkv = qkv.contiguous()
    pos = positions if (positions.dtype == torch.int64 and positions.is_contiguous()) else positions.long().contiguous()
    q = torch.empty(T, num_heads, D, dtype=torch.float32)
    lib.tf_rope_store(
        qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), pos.data_ptr(), q.data_ptr(), k_buffer.data_ptr(),
        v_buffer.data_ptr(), k_buffer.stride(0), row, T, num_heads, nkv, D, _is_bf16(qkv),
    )
    return q


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    lib = library()
    assert lib is not None
    gate_up = gate_up.contiguous()
    inter = gate_up.shape[-1] // 2
    out = torch.empty(*gate_up.shape[:-1], inter, dtype=gate_up.dtype)
    lib.tf_silu_mul(gate_up.data_ptr(), out.data_ptr(), gate_up.numel() // (2 * inter), inter, _is_bf16(gate_up))
    return out
