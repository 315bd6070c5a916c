"""Triton helpers shared by the kernels: rounding fp32 to bf16 as the GPU does, also under the CPU interpreter."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def rne_bf16(x):
    # The CPU interpreter's fp32 -> bf16 cast truncates; rounding the fp32 bits to nearest even
    # first makes the cast exact, so interpreter results match the GPU's cvt.rn rounding.
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)
