"""The target's full KV cache with its rows in a file on disk, and the RAM views the levels below the top read.

A context larger than memory keeps its exact cache in a file written and read with direct I/O
(so the page cache does not quietly hold it in RAM). Each pass of the top level streams a layer's
rows from the file into one of two staging buffers while the layer before computes, then attends
on the staging buffer exactly as on an in-RAM cache: the same bytes in the same layout, so the
results are bit for bit the in-RAM ones. The newest rows wait in a RAM tail until whole aligned
blocks can be written. Layers the RAM budget holds whole stay in RAM.

The levels below the top never touch the disk: a CompactView keeps its own copy of the rows it
reads (the retrieval chunks, or the StreamingLLM sink, then every recent row) and is fed by the
top's passes as they stream each layer (`visit`), which is also when it re-selects its chunks.
"""

from __future__ import annotations

import errno
import math
import os
import tempfile
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from .attention import KVSlot
from .cache import FullCache, check_fits, top_chunks
from .config import ModelConfig
from .errors import SettingError, TriforceError
from .settings import OFFLOAD_PASS_ROWS

BLOCK = 4096  # direct I/O offsets, sizes and buffer addresses are multiples of this
IO_PIECE = 4 << 20  # bytes per read request: several in flight keep the device's queue busy
IO_THREADS = 4
PASS_ROWS = OFFLOAD_PASS_ROWS  # most rows a decoding or verification pass adds; longer passes are prompt chunks
DISK_SLOWDOWN = 12  # a byte from a local SSD by direct I/O against one from RAM, roughly (2 vs 25 GB/s)

_pool: ThreadPoolExecutor | None = None


def _io_pool() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="triforce-kv-io")
    return _pool


def block_rows(config: ModelConfig, dtype: torch.dtype) -> int:
    """Rows of one KV head that make a whole number of I/O blocks."""
    row = config.head_dim * (torch.finfo(dtype).bits // 8)
    return BLOCK // math.gcd(BLOCK, row)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def aligned_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zeroed CPU tensor whose first byte sits on an I/O block boundary."""
    nbytes = math.prod(shape) * (torch.finfo(dtype).bits // 8)
    raw = torch.zeros(nbytes + BLOCK, dtype=torch.uint8)
    skip = -raw.data_ptr() % BLOCK
    return raw[skip : skip + nbytes].view(dtype).view(shape)


def _memory(rows: torch.Tensor) -> Any:
    """The bytes of contiguous rows [n, D], as a writable buffer for os.preadv/pwrite."""
    return rows.view(torch.uint8).numpy()


def check_directory(directory: str) -> None:
    """Refuse an offload directory that does not exist or cannot be written."""
    if not os.path.isdir(directory):
        raise SettingError("kv_offload", f"is not a directory: {directory}")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise SettingError("kv_offload", f"directory {directory} is not writable")


def offload_plan(config: ModelConfig, capacity: int, dtype: torch.dtype, budget: int, views_bytes: int,
                 prefill_chunk: int) -> tuple[int, int]:
    """(layers held whole in RAM, RAM tail rows) of an OffloadedCache of `capacity` rows within
    `budget` bytes, beside views of the cache taking `views_bytes`; refused when the budget
    cannot hold what must stay in RAM."""
    tail_rows = max(prefill_chunk, PASS_ROWS) + block_rows(config, dtype)
    fixed = OffloadedCache.bytes_for(config, capacity, dtype, 0, tail_rows) + views_bytes
    if fixed > budget:
        raise SettingError("kv_ram_budget", f"is {budget / 2**20:.0f} MiB, but at {capacity} tokens the retrieval "
                           f"cache, staging buffers and newest rows need {fixed / 2**20:.0f} MiB of RAM")
    ram_layers = min(config.num_layers - 1, (budget - fixed) // OffloadedCache.layer_bytes(config, capacity, dtype))
    return ram_layers, tail_rows


class KVFile:
    """[layers, K|V, kv heads, rows, head_dim] in a file opened for direct I/O.

    The file is reserved in full when made (a full disk fails here, not mid-generation) and is
    removed when the cache is freed or the process exits (unlinked at once unless `keep`)."""

    def __init__(self, directory: str, layers: int, heads: int, rows: int, row_bytes: int, keep: bool = False) -> None:
        check_directory(directory)
        self.directory = directory
        self.read_bytes = self.written_bytes = 0  # traffic requested so far
        self.layers, self.heads, self.rows, self.row_bytes = layers, heads, rows, row_bytes
        align = BLOCK // math.gcd(BLOCK, row_bytes)
        self.piece_rows = max(align, IO_PIECE // row_bytes // align * align)
        self.size = layers * 2 * heads * rows * row_bytes
        st = os.statvfs(directory)
        free = st.f_bavail * st.f_frsize
        if self.size > free:
            raise TriforceError(f"the KV offload file needs {self.size / 2**30:.2f} GiB but {directory} has "
                                f"{free / 2**30:.2f} GiB free")
        try:
            handle, self.path = tempfile.mkstemp(prefix="triforce-kv-", suffix=".bin", dir=directory)
        except OSError as exc:
            raise SettingError("kv_offload", f"directory {directory} refused a new file: {exc.strerror}") from None
        try:
            try:  # reserved now, on the plain handle, so that a full disk fails here and not mid-generation
                os.posix_fallocate(handle, 0, self.size)
            except (AttributeError, OSError) as exc:
                if getattr(exc, "errno", None) == errno.ENOSPC:
                    raise
                os.ftruncate(handle, self.size)  # no fallocate on this OS or filesystem
            self.fd = os.open(self.path, os.O_RDWR | getattr(os, "O_DIRECT", 0))
        except OSError as exc:
            os.unlink(self.path)
            if exc.errno == errno.EINVAL:
                raise SettingError("kv_offload", f"directory {directory} does not support direct I/O") from None
            raise TriforceError(f"cannot make the {self.size / 2**30:.2f} GiB KV offload file in {directory}: "
                                f"{exc.strerror}") from None
        finally:
            os.close(handle)
        if not keep:
            os.unlink(self.path)  # the space is freed when the descriptor closes, even after a crash
        self._closer = weakref.finalize(self, os.close, self.fd)

    def close(self) -> None:
        self._closer()

    def offset(self, layer: int, kv: int, head: int, row: int) -> int:
        return (((layer * 2 + kv) * self.heads + head) * self.rows + row) * self.row_bytes

    def _io(self, write: bool, layer: int, buffers: tuple[torch.Tensor, torch.Tensor], row0: int, row1: int,
            buffer_row0: int) -> list[Future[None]]:
        """Move rows [row0, row1) of a layer between the file and buffers (K, V) [heads, n, D], whose
        row `buffer_row0` holds file row `row0`; in pieces on the I/O threads."""
        step = self.piece_rows
        moved = 2 * self.heads * (row1 - row0) * self.row_bytes
        if write:
            self.written_bytes += moved
        else:
            self.read_bytes += moved
        futures = []
        for kv, buf in enumerate(buffers):
            for head in range(self.heads):
                for a in range(row0, row1, step):
                    b = min(row1, a + step)
                    rows = buf[head, buffer_row0 + a - row0 : buffer_row0 + b - row0]
                    futures.append(_io_pool().submit(self._move, write, rows, self.offset(layer, kv, head, a)))
        return futures

    def _move(self, write: bool, rows: torch.Tensor, offset: int) -> None:
        mem = _memory(rows)
        try:
            done = os.pwritev(self.fd, [mem], offset) if write else os.preadv(self.fd, [mem], offset)
        except OSError as exc:
            raise TriforceError(f"{'writing' if write else 'reading'} the KV offload file failed: {exc.strerror}") \
                from None
        if done != mem.nbytes:
            raise TriforceError(f"the KV offload file was cut short while in use ({'wrote' if write else 'read'} "
                                f"{done} of {mem.nbytes} bytes)")

    def read(self, layer: int, buffers: tuple[torch.Tensor, torch.Tensor], row0: int, row1: int,
             buffer_row0: int | None = None) -> list[Future[None]]:
        return self._io(False, layer, buffers, row0, row1, row0 if buffer_row0 is None else buffer_row0)

    def write(self, layer: int, buffers: tuple[torch.Tensor, torch.Tensor], row0: int, row1: int,
              buffer_row0: int) -> list[Future[None]]:
        return self._io(True, layer, buffers, row0, row1, buffer_row0)


def wait(futures: list[Future[None]]) -> None:
    """Wait for every request, then raise the first failure (none left running on a buffer)."""
    errors = [f.exception() for f in futures]
    for error in errors:
        if error is not None:
            raise error


class OffloadedCache(FullCache):
    """The exact cache with layers [ram_layers, layers) in a KVFile.

    For those layers, rows [0, tail_start) are in the file and rows from tail_start on in a RAM
    tail of `tail_rows` rows; `tail_start` is block-aligned. A pass hands out a staging buffer per
    layer holding rows [0, length) (read while the previous layer computed, plus the tail), the
    attention writes the pass's rows into it, and they are copied to the tail when the layer is
    done. Views registered in `visitors` see each layer's complete rows then.
    """

    def __init__(self, config: ModelConfig, capacity: int, dtype: torch.dtype, directory: str, ram_layers: int,
                 tail_rows: int, keep_file: bool = False) -> None:
        self.config = config
        self.align = block_rows(config, dtype)
        self.capacity = round_up(capacity, self.align)
        self.device = torch.device("cpu")
        self.dtype = dtype
        self.ram_layers = ram_layers
        self.disk_layers = config.num_layers - ram_layers
        if not 0 <= ram_layers < config.num_layers:
            raise ValueError(f"an offloaded cache keeps 0 to {config.num_layers - 1} layers in RAM, not {ram_layers}")
        hkv, hd = config.num_kv_heads, config.head_dim
        self.tail_rows = round_up(tail_rows, self.align)
        check_fits(self.bytes_for(config, capacity, dtype, ram_layers, tail_rows), f"a KV cache of {capacity} tokens")
        # layers held whole in RAM, as a FullCache holds them
        self.k = torch.zeros(ram_layers, hkv, self.capacity, hd, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.file = KVFile(directory, self.disk_layers, hkv, self.capacity, hd * self.k.element_size(), keep_file)
        self.stage = [(aligned_zeros((hkv, self.capacity, hd), dtype), aligned_zeros((hkv, self.capacity, hd), dtype))
                      for _ in range(2)]
        self.tail = (aligned_zeros((self.disk_layers, hkv, self.tail_rows, hd), dtype),
                     aligned_zeros((self.disk_layers, hkv, self.tail_rows, hd), dtype))
        self.tail_start = 0
        # per staging buffer: (layer, file rows it holds from row 0, reads in flight) or None
        self.staged: list[tuple[int, int, list[Future[None]]] | None] = [None, None]
        self.open: tuple[int, torch.Tensor, torch.Tensor] | None = None  # the layer whose slot is out
        self.pass_rows = 0
        self.visitors: list[CompactView] = []
        self.broken = False  # an I/O error left the file behind the cache: it must not be reused
        self.length = 0
        self.aligned_rows, self.aligned_chunk, self.kernel_from = 0, 0, 0
        self.last_queries, self.queries_from = [], 0
        self.record_queries = False

    @staticmethod
    def layer_bytes(config: ModelConfig, rows: int, dtype: torch.dtype) -> int:
        """One layer's K and V for `rows` rows, rounded up to whole I/O blocks."""
        per_row = config.kv_bytes_per_token(torch.finfo(dtype).bits // 8) // config.num_layers
        return per_row * round_up(rows, block_rows(config, dtype))

    @staticmethod
    def bytes_for(config: ModelConfig, capacity: int, dtype: torch.dtype, ram_layers: int = 0,  # type: ignore[override]
                  tail_rows: int = 0) -> int:
        """RAM bytes: the layers held whole, two staging layers and the tail."""
        layer = OffloadedCache.layer_bytes
        return (ram_layers + 2) * layer(config, capacity, dtype) + (
            config.num_layers - ram_layers) * layer(config, tail_rows, dtype)

    @property
    def nbytes(self) -> int:
        return self.bytes_for(self.config, self.capacity, self.dtype, self.ram_layers, self.tail_rows)

    @property
    def buffer_like(self) -> torch.Tensor:
        return self.stage[0][0]

    # -- a pass ----------------------------------------------------------------------------------
    def positions(self, num_tokens: int) -> torch.Tensor:
        self.open = None  # a pass that raised midway left its layer open: its rows were never committed
        positions = super().positions(num_tokens)
        if num_tokens > self.tail_rows - self.align:
            raise TriforceError(f"a pass of {num_tokens} tokens exceeds the offloaded cache's RAM tail")
        if self.length + num_tokens > self.tail_start + self.tail_rows:
            self._flush()
        self.pass_rows = num_tokens
        for view in self.visitors:
            view.begin_pass(self.length, num_tokens)
        return positions

    def slot(self, layer: int) -> KVSlot:
        self._finish_layer()
        if layer < self.ram_layers:
            k, v = self.k[layer], self.v[layer]
        else:
            b = layer % 2
            k, v = self.stage[b]
            self._load(b, layer)
            n = self.length - self.tail_start
            d = layer - self.ram_layers
            k[:, self.tail_start : self.length] = self.tail[0][d, :, :n]
            v[:, self.tail_start : self.length] = self.tail[1][d, :, :n]
            if layer + 1 < self.config.num_layers:
                self._request(1 - b, layer + 1)  # the next layer streams in while this one computes
        self.open = (layer, k, v)
        return KVSlot(k, v, self.length)

    def _finish_layer(self) -> None:
        """The open layer's pass is over: keep its new rows in the tail, show its rows to the views."""
        if self.open is None:
            return
        layer, k, v = self.open
        self.open = None
        a, b = self.length, self.length + self.pass_rows
        if layer >= self.ram_layers:
            d = layer - self.ram_layers
            self.tail[0][d, :, a - self.tail_start : b - self.tail_start] = k[:, a:b]
            self.tail[1][d, :, a - self.tail_start : b - self.tail_start] = v[:, a:b]
        queries = self.last_queries[layer] if self.record_queries and len(self.last_queries) > layer else None
        for view in self.visitors:
            view.visit(layer, k, v, b, queries)

    def commit(self, num_tokens: int) -> None:
        self._finish_layer()
        super().commit(num_tokens)
        for view in self.visitors:
            view.end_pass()
        if self.disk_layers:
            self._request(self.ram_layers % 2, self.ram_layers)  # the next pass's first layer

    # -- file traffic ----------------------------------------------------------------------------
    def _request(self, b: int, layer: int) -> None:
        """Start reading a layer's file rows into staging buffer b."""
        current = self.staged[b]
        if current is not None:
            if current[0] == layer and current[1] >= self.tail_start:
                return
            self.staged[b] = None  # before waiting: a failed read must not stay behind
            self._checked(current[2])
        futures = self.file.read(layer - self.ram_layers, self.stage[b], 0, self.tail_start) if self.tail_start else []
        self.staged[b] = (layer, self.tail_start, futures)

    def _load(self, b: int, layer: int) -> None:
        """Staging buffer b holds the layer's file rows [0, tail_start) once this returns."""
        current = self.staged[b]
        if current is None or current[0] != layer:
            self._request(b, layer)
            current = self.staged[b]
        assert current is not None
        self.staged[b] = None
        self._checked(current[2])
        rows = current[1]
        if rows < self.tail_start:  # the tail was written out since the read began
            self._checked(self.file.read(layer - self.ram_layers, self.stage[b], rows, self.tail_start))
        self.staged[b] = (layer, self.tail_start, [])

    def _checked(self, futures: list[Future[None]]) -> None:
        try:
            wait(futures)
        except TriforceError:
            self.broken = True
            raise

    def _flush(self) -> None:
        """Write the tail's whole blocks below the current length to the file and slide the rest down."""
        new_start = self.length // self.align * self.align
        n = new_start - self.tail_start
        if n <= 0:
            raise TriforceError("the offloaded cache's RAM tail is full")
        futures = []
        for d in range(self.disk_layers):
            futures += self.file.write(d, (self.tail[0][d], self.tail[1][d]), self.tail_start, new_start, 0)
        self._checked(futures)
        keep = self.length - new_start
        for t in self.tail:
            t[:, :, :keep] = t[:, :, n : n + keep].clone()
        self.tail_start = new_start

    def truncate(self, length: int) -> None:
        super().truncate(length)
        if length >= self.tail_start:
            return
        # back below the rows the file holds: the tail takes them back from the file
        new_start = length // self.align * self.align
        end = round_up(length, self.align)  # <= tail_start, which is aligned
        futures = []
        for d in range(self.disk_layers):
            futures += self.file.read(d, (self.tail[0][d], self.tail[1][d]), new_start, end, 0)
        self._checked(futures)
        self.tail_start = new_start
        for b, current in enumerate(self.staged):
            if current is not None and current[1] > new_start:  # rows above will be written again
                self.staged[b] = None
                self._checked(current[2])
                self.staged[b] = (current[0], new_start, [])

    def report(self, read_from: int, new_tokens: int, seconds: float) -> dict[str, Any]:
        """What the offloaded cache held where, and the file traffic of a decoding run that began
        with `read_from` bytes read and produced `new_tokens` in `seconds`."""
        read = self.file.read_bytes - read_from
        return {"ram_mb": round(self.nbytes / 1e6, 1), "file_mb": round(self.file.size / 1e6, 1),
                "layers_in_ram": self.ram_layers, "read_mb_per_token": round(read / 1e6 / max(1, new_tokens), 1),
                "read_gbs": round(read / 1e9 / seconds, 2) if seconds > 0 else None}

    def grown(self, capacity: int, keep: int) -> FullCache:
        raise TriforceError("an offloaded KV cache cannot grow; the engine makes a new one")

    def close(self) -> None:
        for current in self.staged:  # no read may land in freed buffers; their errors were reported
            for future in current[2] if current is not None else []:
                future.exception()
        self.staged = [None, None]
        self.file.close()


class CompactView:
    """A level's sparse view of an OffloadedCache, in its own buffers [layers, kv heads, rows, D]:
    first the rows of the chosen chunks, then every row from `dense_start` on. A subclass says
    which chunks (`layout`, `choose`).

    The top's passes feed it (begin_pass, visit per layer, end_pass): each copies the rows it
    wrote into the dense part, and a pass that re-selects (every `rebuild_every`-th, the first,
    or when the dense part would overflow) rewrites the whole view from the layer it streams.
    Rows from the top's length on hold this level's own drafts, until the top's next pass.
    """

    record_queries = False

    def __init__(self, full: OffloadedCache, chunk_rows: int, dense_rows: int, rebuild_every: int = 1) -> None:
        cfg = full.config
        self.full, self.chunk_rows, self.dense_rows = full, chunk_rows, dense_rows
        self.rebuild_every = rebuild_every
        self.k = torch.zeros(cfg.num_layers, cfg.num_kv_heads, chunk_rows + dense_rows, cfg.head_dim, dtype=full.dtype)
        self.v = torch.zeros_like(self.k)
        self.length = 0
        self.front = 0  # rows of chosen chunks at the start of the buffers
        self.dense_start = 0
        self.ready = False
        self.passes = 0
        self.selections = 0
        self.plan: tuple[int, int, int] | None = None  # a re-selection this pass: (kept, dense_start, chunks)
        self.copy_from = 0  # first row of the current pass

    @staticmethod
    def bytes_for(config: ModelConfig, chunk_rows: int, dense_rows: int, dtype: torch.dtype) -> int:
        return config.kv_bytes_per_token(torch.finfo(dtype).bits // 8) * (chunk_rows + dense_rows)

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    # -- the level's passes ----------------------------------------------------------------------
    def _row(self, row: int) -> int:
        return self.front + row - self.dense_start

    def positions(self, num_tokens: int) -> torch.Tensor:
        if self.length < self.dense_start:
            raise TriforceError("a level's view of the offloaded KV cache lost its recent rows")
        if self._row(self.length + num_tokens) > self.chunk_rows + self.dense_rows:
            held = self.chunk_rows + self.dense_rows
            raise TriforceError(f"a level's view of the offloaded KV cache holds {held} rows; this pass needs more")
        return torch.arange(self.length, self.length + num_tokens)

    def slot(self, layer: int) -> KVSlot:
        return KVSlot(self.k[layer], self.v[layer], self._row(self.length))

    def saw_queries(self, layer: int, q: torch.Tensor) -> None:
        pass

    def visible_rows(self) -> int:
        return self._row(self.length)

    def commit(self, num_tokens: int) -> None:
        self.length += num_tokens

    def truncate(self, length: int) -> None:
        self.length = length

    def snapshot(self) -> Any:
        # later passes rewrite the buffers and the layout: keep them whole (once per prompt of several samples)
        return self.k.clone(), self.v.clone(), self.length, self.front, self.dense_start, self.ready

    def restore(self, state: Any) -> None:
        k, v, self.length, self.front, self.dense_start, self.ready = state
        self.k.copy_(k)
        self.v.copy_(v)

    # -- fed by the top's passes -----------------------------------------------------------------
    def begin_pass(self, start: int, num_tokens: int) -> None:
        self.passes += 1
        # rows surely kept after the pass: all of a prompt chunk's, the first of a verification's
        kept = start + (num_tokens if num_tokens > PASS_ROWS else 1)
        overflow = self._row(start + num_tokens + PASS_ROWS) > self.chunk_rows + self.dense_rows
        self.plan = None
        if not self.ready or overflow or self.passes % self.rebuild_every == 0:
            dense_start, chunks = self.layout(kept)
            self.plan = (kept, dense_start, chunks)
            self.ready = False  # until every layer is rewritten
        self.copy_from = start

    def visit(self, layer: int, k: torch.Tensor, v: torch.Tensor, end: int, queries: torch.Tensor | None) -> None:
        """Layer `layer` of the top holds its exact rows [0, end) in k, v [Hkv, capacity, D]."""
        if self.plan is None:
            a, b = self._row(self.copy_from), self._row(end)
            self.k[layer, :, a:b] = k[:, self.copy_from : end]
            self.v[layer, :, a:b] = v[:, self.copy_from : end]
            return
        kept, dense_start, chunks = self.plan
        rows = self.choose(layer, k, kept, dense_start, chunks, queries)  # [Hkv, n] rows below dense_start
        n = rows.shape[1]
        index = rows[:, :, None].expand(-1, -1, k.shape[-1])
        self.k[layer, :, :n] = torch.gather(k, 1, index)
        self.v[layer, :, :n] = torch.gather(v, 1, index)
        self.k[layer, :, n : n + end - dense_start] = k[:, dense_start:end]
        self.v[layer, :, n : n + end - dense_start] = v[:, dense_start:end]
        self.front = n

    def end_pass(self) -> None:
        if self.plan is not None:
            _, self.dense_start, _ = self.plan
            self.plan = None
            self.ready = True
            self.selections += 1

    def layout(self, kept: int) -> tuple[int, int]:
        """(dense_start, chunks to choose) for a selection when rows [0, kept) are final."""
        raise NotImplementedError

    def choose(self, layer: int, k: torch.Tensor, kept: int, dense_start: int, chunks: int,
               queries: torch.Tensor | None) -> torch.Tensor:
        """Rows [Hkv, n] (ascending, below dense_start) of the layer's chosen chunks."""
        raise NotImplementedError


class CompactRetrieval(CompactView):
    """TriForce's retrieval cache (as cache.RetrievalView chooses it) over an offloaded cache:
    the chunks whose mean key the query at the newest kept row weighs most, the first chunk, and
    the `recent` last rows, `budget` rows in all. The mean keys are kept in the cache's dtype
    (RetrievalView keeps float32): at 32K tokens of the embedded model that is 47 MB of RAM less,
    and the choice only steers drafts."""

    def __init__(self, full: OffloadedCache, budget: int, chunk_size: int = 8, recent: int = 64,
                 rebuild_every: int = 1) -> None:
        super().__init__(full, self.chunk_rows_for(full.capacity, budget, chunk_size),
                         self.dense_rows_for(chunk_size, recent), rebuild_every)
        cfg = full.config
        self.budget, self.chunk_size, self.recent = budget, chunk_size, recent
        self.means = torch.zeros(cfg.num_layers, cfg.num_kv_heads, full.capacity // chunk_size, cfg.head_dim,
                                 dtype=full.dtype)
        self.means_ready = 0

    @staticmethod
    def chunk_rows_for(capacity: int, budget: int, chunk_size: int) -> int:
        return min(round_up(budget, chunk_size), round_up(capacity, chunk_size))

    @staticmethod
    def dense_rows_for(chunk_size: int, recent: int) -> int:
        # the recent rows, a partial chunk, the pass that re-selects, and the drafts above it
        return recent + chunk_size + 3 * PASS_ROWS

    @classmethod
    def bytes_needed(cls, config: ModelConfig, capacity: int, budget: int, chunk_size: int, dtype: torch.dtype) -> int:
        rows = cls.chunk_rows_for(capacity, budget, chunk_size) + cls.dense_rows_for(chunk_size, 64)
        means = config.num_layers * config.num_kv_heads * (capacity // chunk_size) * config.head_dim * (
            torch.finfo(dtype).bits // 8)
        return cls.bytes_for(config, 0, rows, dtype) + means

    def layout(self, kept: int) -> tuple[int, int]:
        cs = self.chunk_size
        dense_start = (kept - min(self.recent, self.budget // 2)) // cs * cs
        old = max(0, dense_start // cs)
        keep = max(1, (self.budget - (kept - dense_start)) // cs)
        return max(dense_start, 0), min(keep, old)

    def choose(self, layer: int, k: torch.Tensor, kept: int, dense_start: int, chunks: int,
               queries: torch.Tensor | None) -> torch.Tensor:
        cfg, cs = self.full.config, self.chunk_size
        old = dense_start // cs
        offsets = torch.arange(cs)
        if chunks == old:  # every old chunk fits
            picked = torch.arange(old).expand(cfg.num_kv_heads, -1)
        else:
            if self.means_ready < old:  # the mean keys of chunks that became old (their rows are final)
                a, b = self.means_ready * cs, old * cs
                self.means[layer, :, self.means_ready : old] = k[:, a:b].float().view(
                    cfg.num_kv_heads, old - self.means_ready, cs, cfg.head_dim).mean(2)
                if layer == cfg.num_layers - 1:
                    self.means_ready = old
            assert queries is not None, "a retrieval view needs the top's queries"
            q = queries[kept - 1 - self.copy_from].float()  # [Hq, D]
            picked = top_chunks(q[None], self.means[layer : layer + 1, :, :old].float(), chunks, cfg)[0]
        return (picked[:, :, None] * cs + offsets).reshape(cfg.num_kv_heads, -1)

    def snapshot(self) -> Any:
        return super().snapshot(), self.means_ready

    def restore(self, state: Any) -> None:
        view, self.means_ready = state  # means of chunks made final later are recomputed
        super().restore(view)


class CompactStreaming(CompactView):
    """StreamingLLM attention over an offloaded cache: the first `sink` rows and the last `window`."""

    def __init__(self, full: OffloadedCache, sink: int, window: int) -> None:
        super().__init__(full, sink, window + 3 * PASS_ROWS)
        self.sink, self.window = sink, window

    @staticmethod
    def bytes_needed(config: ModelConfig, sink: int, window: int, dtype: torch.dtype) -> int:
        return CompactView.bytes_for(config, sink, window + 3 * PASS_ROWS, dtype)

    def layout(self, kept: int) -> tuple[int, int]:
        start = kept - self.window
        return (start, 1 if self.sink else 0) if start > self.sink else (0, 0)

    def choose(self, layer: int, k: torch.Tensor, kept: int, dense_start: int, chunks: int,
               queries: torch.Tensor | None) -> torch.Tensor:
        return torch.arange(self.sink if chunks else 0).expand(self.full.config.num_kv_heads, -1)
