"""The GGUF block formats the quantized-projection kernels read, and the weights a model loads with."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QuantFormat:
    name: str
    block_size: int  # weights per block (along K)
    block_bytes: int
    gguf_type: int  # gguf.GGMLQuantizationType value
    code: int  # the kernel's format number (kernels/quant.c)


FORMATS: dict[str, QuantFormat] = {
    f.name: f
    for f in (
        QuantFormat("q8_0", 32, 34, 8, 0),
        QuantFormat("q4_0", 32, 18, 2, 1),
        QuantFormat("q4_1", 32, 20, 3, 2),
        QuantFormat("q4_k", 256, 144, 12, 3),
        QuantFormat("q5_k", 256, 176, 13, 4),
        QuantFormat("q6_k", 256, 210, 14, 5),
    )
}

# what a model's weights may be loaded as: a GGUF's own blocks or a directory's dense weights
# ("auto"), dense ("bf16"), or quantized at load to a block format
WEIGHTS = ("auto", "bf16", *FORMATS)
