"""NF4 (4-bit NormalFloat) dequantization of bitsandbytes-quantized weights, in one Triton kernel.

Layout read (bitsandbytes ``quantize_4bit``, checked against 0.50.2): the weight ``W [out, in]`` is
flattened row-major to ``n = out * in`` elements and cut into blocks of ``blocksize`` consecutive
elements (the last block may be short). Element ``i`` is the 4-bit index ``q_i`` stored in byte
``i // 2`` of ``packed``: the HIGH nibble holds the even element, the low nibble the odd one (for
odd ``n`` the last byte's low nibble is padding). Each block has one fp32 scale::

    W_flat[i] = code[q_i] * absmax[i // blocksize]                     (fp32 product, then cast)

With double quantization (``compress_statistics=True``) ``absmax`` is itself stored as uint8 codes
``c_b`` into a 256-entry dynamic map ``code2``, in blocks of ``blocksize2`` (256) scales, each with
an fp32 ``absmax2``, after the mean ``offset`` was subtracted::

    absmax[b] = code2[c_b] * absmax2[b // blocksize2] + offset         (fp32 mul, then fp32 add)

The kernel computes both in fp32 in exactly that order and rounds once to the output dtype
(round-to-nearest-even, as ``Tensor.to`` does), so its output is bit-identical to
``bitsandbytes.functional.dequantize_4bit``. It is launched with ``enable_fp_fusion=False`` so the
compiler cannot contract the nested ``mul + add`` into one FMA (one rounding instead of two would
break bit-exactness).

:class:`NF4Weight` holds plain tensors only; :meth:`NF4Weight.from_bnb` reads a bitsandbytes
``Params4bit`` / ``Linear4bit`` / ``(packed, QuantState)`` by duck typing, so this module imports
torch and triton, never bitsandbytes. It keeps references (no copies) to the parameter's storage:
build it at each forward to follow a parameter that DeepSpeed or ``.to()`` may swap out.

Dtype policy: codes and scales are fp32, arithmetic fp32, one rounding on store. Dequantizing to a
dtype other than the quantization dtype (e.g. fp32 weights used in a bf16 step) is allowed through
``dtype=``; only ``dtype=w.dtype`` is the bitsandbytes-exact case.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

from raytune_llm.kernels import reference
from raytune_llm.kernels._dispatch import interpret_mode, use_triton

__all__ = ["NF4Nested", "NF4Weight", "nf4_dequantize", "nf4_dequantize_forward"]

# Elements and warps per program. Dequantization is store-bound (0.5 B read,
# 2 B written per bf16 element). Chosen by bench/kernels/sweep_nf4.py on the H200 (every setting bit-exact
# against bitsandbytes), 70B down_proj 8192 x 28672, double quant: with 16-bit pairs stored as one 32-bit word,
# 2048 elements x 2 warps ran 0.1803 ms, 0.775 of copy bandwidth, 1.51x bitsandbytes' kernel (4096 x 4: 0.1822;
# 8192 x 8: 0.1970; 1024 x 2: 0.2096); one element per store at 2048 x 2 ran 0.2078 ms, 0.673 (session 6,
# bench/results/nf4_sweep_h200_20261129_s6.json). The CPU interpreter runs programs one after another and pays
# per program, so it takes bigger blocks.
_BLOCK = 2048
_NUM_WARPS = 2
_BLOCK_INTERPRET = 8192
# Whether 16-bit outputs of even length are written as 32-bit pairs (see the kernel); the sweep tries both.
_PAIRS = True


class NF4Nested(NamedTuple):
    """Double-quantization state: how the per-block ``absmax`` bytes turn back into fp32 scales.

    Attributes:
        absmax: ``[ceil(n_blocks / blocksize)]`` fp32 scales of the scales (bitsandbytes ``state2.absmax``).
        code: ``[256]`` fp32 dynamic map (``state2.code``).
        blocksize: scales per nested block (``state2.blocksize``, 256 in bitsandbytes).
        offset: ``[1]`` fp32 mean subtracted before quantizing the scales (``QuantState.offset``).
    """

    absmax: torch.Tensor
    code: torch.Tensor
    blocksize: int
    offset: torch.Tensor


class NF4Weight(NamedTuple):
    """A 4-bit NF4 weight in bitsandbytes' layout, as plain tensors.

    Attributes:
        packed: ``[ceil(n / 2)]`` uint8, two 4-bit indices per byte (high nibble = even element).
        absmax: ``[ceil(n / blocksize)]`` fp32 scales, or uint8 codes when ``nested`` is set.
        nested: double-quantization state, or None.
        code: ``[16]`` fp32 NF4 code book.
        shape: the dequantized shape, ``(out, in)`` for a linear weight.
        blocksize: elements per scale (64 by default in bitsandbytes).
        dtype: the dtype the weight had when it was quantized (bitsandbytes' ``quant_state.dtype``).
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    nested: NF4Nested | None
    code: torch.Tensor
    shape: torch.Size
    blocksize: int
    dtype: torch.dtype

    @property
    def device(self) -> torch.device:
        """Device of the packed data."""
        return self.packed.device

    @classmethod
    def from_bnb(cls, param: Any, quant_state: Any = None) -> NF4Weight:
        """Read a bitsandbytes 4-bit weight without importing bitsandbytes.

        Args:
            param: a ``bnb.nn.Params4bit`` (carries ``.quant_state``), a ``bnb.nn.Linear4bit`` (or any
                module whose ``.weight`` is one), or the packed tensor when ``quant_state`` is given.
            quant_state: a bitsandbytes ``QuantState``; taken from ``param.quant_state`` when None.

        Returns:
            An :class:`NF4Weight` sharing storage with the parameter (no copies).

        Raises:
            ValueError: when no quant state is found, the weight is not NF4, or sizes disagree.
        """
        if isinstance(param, torch.nn.Module):
            param = param.weight  # a Linear4bit module
        qs = quant_state if quant_state is not None else getattr(param, "quant_state", None)
        if qs is None:
            raise ValueError("NF4Weight.from_bnb: no quant_state (is the weight quantized? move it to a device first)")
        if getattr(qs, "quant_type", "nf4") != "nf4":
            raise ValueError(f"NF4Weight.from_bnb: quant_type {qs.quant_type!r} is not supported, only 'nf4'")
        data = param.data if isinstance(param, torch.nn.Parameter) else param
        # quant_storage may be bf16/fp32 (ZeRO-3 partitions that dtype): the bytes are the same.
        packed = data.reshape(-1).view(torch.uint8)
        shape = torch.Size(qs.shape)
        n = shape.numel()
        if packed.numel() != (n + 1) // 2:
            raise ValueError(f"NF4Weight.from_bnb: {packed.numel()} packed bytes cannot hold shape {tuple(shape)}")
        nested = None
        if getattr(qs, "nested", False) or getattr(qs, "state2", None) is not None:
            s2 = qs.state2
            offset = qs.offset
            offset = (offset if torch.is_tensor(offset) else torch.tensor(offset)).to(torch.float32).reshape(1)
            nested = NF4Nested(
                absmax=s2.absmax, code=s2.code, blocksize=int(s2.blocksize), offset=offset.to(packed.device)
            )
        return cls(
            packed=packed,
            absmax=qs.absmax,
            nested=nested,
            code=qs.code,
            shape=shape,
            blocksize=int(qs.blocksize),
            dtype=qs.dtype,
        )


@triton.jit
def _block_scales(ABSMAX_ptr, ABSMAX2_ptr, CODE2_ptr, OFFSET_ptr, first, n_elements, blocksize, blocksize2,
                  NESTED: tl.constexpr, SCALES: tl.constexpr):  # fmt: skip
    # The fp32 scales of the SCALES quantization blocks starting at element `first`, made once per block.
    blk = first // blocksize + tl.arange(0, SCALES)
    bmask = blk * blocksize < n_elements
    if NESTED:
        c = tl.load(ABSMAX_ptr + blk, mask=bmask, other=0).to(tl.int32)
        scale = tl.load(CODE2_ptr + c, mask=bmask, other=0.0) * tl.load(ABSMAX2_ptr + blk // blocksize2, mask=bmask)
        scale = scale + tl.load(OFFSET_ptr)
    else:
        scale = tl.load(ABSMAX_ptr + blk, mask=bmask, other=0.0)
    return scale


@triton.jit
def _scaled(value, scale, SCALES: tl.constexpr, WIDTH: tl.constexpr):
    # value [WIDTH] (consecutive, starting on a block boundary or inside one block) times its block's scale.
    return tl.reshape(tl.reshape(value, [SCALES, WIDTH // SCALES]) * scale[:, None], [WIDTH])


@triton.jit
def _round_bits(value, RNE_BF16: tl.constexpr):
    if RNE_BF16:
        # Round to nearest even on the fp32 bits; the conversion after it is then exact. Only under the
        # CPU interpreter, whose fp32 -> bf16 cast truncates (498 of 1000 randn values off by one ulp).
        bits = value.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        value = bits.to(tl.float32, bitcast=True)
    return value


@triton.jit
def _nf4_dequant_kernel(
    OUT_ptr,
    PACKED_ptr,
    ABSMAX_ptr,
    CODE_ptr,
    ABSMAX2_ptr,
    CODE2_ptr,
    OFFSET_ptr,
    n_elements,
    blocksize,
    blocksize2,
    NESTED: tl.constexpr,
    RNE_BF16: tl.constexpr,
    PAIRS: tl.constexpr,
    HALF_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    GROUP: tl.constexpr,
):
    # One program: BLOCK elements, covering BLOCK // GROUP quantization blocks (GROUP = min(blocksize, BLOCK), both
    # powers of two, so a program starts on a block boundary or inside one block). The scales are made once per
    # quantization block and broadcast: the only per-element load besides the packed bytes is the 16-entry code
    # book (an L1 hit), where the first version loaded scale, scale code, nested scale and code per element.
    SCALES: tl.constexpr = BLOCK // GROUP
    pid = tl.program_id(0).to(tl.int64)
    if PAIRS:
        # 16-bit output (HALF_DTYPE), n even: byte j holds elements 2j (high nibble) and 2j + 1 (low nibble), the
        # two halves of the 32-bit output word j (little-endian: element 2j in the low half). One contiguous byte
        # load and one 32-bit store per pair, no element shuffling; OUT_ptr is the output viewed as int32.
        HALF: tl.constexpr = BLOCK // 2
        j = pid * HALF + tl.arange(0, HALF)
        jmask = j < n_elements // 2
        byte = tl.load(PACKED_ptr + j, mask=jmask, other=0).to(tl.int32)
        hi = tl.load(CODE_ptr + (byte >> 4), mask=jmask, other=0.0)
        lo = tl.load(CODE_ptr + (byte & 15), mask=jmask, other=0.0)
        scale = _block_scales(ABSMAX_ptr, ABSMAX2_ptr, CODE2_ptr, OFFSET_ptr, pid * BLOCK, n_elements, blocksize,
                              blocksize2, NESTED, SCALES)  # fmt: skip
        hi = _round_bits(_scaled(hi, scale, SCALES, HALF), RNE_BF16)
        lo = _round_bits(_scaled(lo, scale, SCALES, HALF), RNE_BF16)
        hi16 = hi.to(HALF_DTYPE).to(tl.uint16, bitcast=True).to(tl.uint32)
        lo16 = lo.to(HALF_DTYPE).to(tl.uint16, bitcast=True).to(tl.uint32)
        tl.store(OUT_ptr + j, (hi16 | (lo16 << 16)).to(tl.int32, bitcast=True), mask=jmask)
    else:
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_elements
        # Each element loads its own byte (two lanes share one, an L1 hit) and shifts its nibble out (high nibble
        # = even element): the element order is the thread layout itself, so the stores stay plain vectors.
        byte = tl.load(PACKED_ptr + offs // 2, mask=mask, other=0).to(tl.int32)
        q = (byte >> (4 - 4 * (offs & 1).to(tl.int32))) & 15
        value = tl.load(CODE_ptr + q, mask=mask, other=0.0)
        scale = _block_scales(ABSMAX_ptr, ABSMAX2_ptr, CODE2_ptr, OFFSET_ptr, pid * BLOCK, n_elements, blocksize,
                              blocksize2, NESTED, SCALES)  # fmt: skip
        value = _round_bits(_scaled(value, scale, SCALES, BLOCK), RNE_BF16)
        tl.store(OUT_ptr + offs, value.to(OUT_ptr.dtype.element_ty), mask=mask)


def nf4_dequantize_forward(w: NF4Weight, dtype: torch.dtype | None = None, out: torch.Tensor | None = None):
    """Launch the dequantization kernel.

    Args:
        w: the 4-bit weight.
        dtype: output dtype (default ``w.dtype``).
        out: optional contiguous output buffer of ``w.shape`` (reused across layers to save allocations).

    Returns:
        The dequantized weight, ``w.shape`` in ``dtype``.
    """
    dtype = dtype or w.dtype
    if out is None:
        out = torch.empty(w.shape, dtype=dtype, device=w.packed.device)
    n = w.shape.numel()
    if n == 0:
        return out
    block = _BLOCK_INTERPRET if interpret_mode() else _BLOCK
    nested = w.nested
    # Unused pointers when not nested: pass tensors that exist (never read: NESTED is a constexpr).
    absmax2, code2, offset = (nested.absmax, nested.code, nested.offset) if nested else (w.absmax, w.code, w.code)
    # Pairs of 16-bit outputs as one 32-bit word each when the output allows it (n even, 4-byte aligned).
    pairs = _PAIRS and out.element_size() == 2 and n % 2 == 0 and out.data_ptr() % 4 == 0
    _nf4_dequant_kernel[(triton.cdiv(n, block),)](
        out.view(-1).view(torch.int32) if pairs else out,
        w.packed,
        w.absmax,
        w.code,
        absmax2,
        code2,
        offset,
        n,
        w.blocksize,
        nested.blocksize if nested else 1,
        NESTED=nested is not None,
        RNE_BF16=interpret_mode() and dtype == torch.bfloat16,
        PAIRS=pairs,
        HALF_DTYPE=tl.float16 if dtype == torch.float16 else tl.bfloat16,
        BLOCK=block,
        GROUP=min(w.blocksize, block),
        num_warps=_NUM_WARPS,
        enable_fp_fusion=False,
    )
    return out


def _check(w: NF4Weight, out: torch.Tensor | None, dtype: torch.dtype | None) -> None:
    if not isinstance(w, NF4Weight):
        raise TypeError(f"nf4_dequantize expects an NF4Weight, got {type(w).__name__}")
    if w.packed.dtype != torch.uint8 or w.packed.numel() != (w.shape.numel() + 1) // 2:
        raise ValueError(f"NF4Weight.packed must be uint8 with ceil(n/2) bytes for shape {tuple(w.shape)}")
    if w.blocksize < 2 or w.blocksize & (w.blocksize - 1):
        raise ValueError(f"NF4Weight.blocksize must be a power of two (bitsandbytes' are), got {w.blocksize}")
    if out is not None and (out.shape != w.shape or not out.is_contiguous() or (dtype and out.dtype != dtype)):
        raise ValueError(f"out must be a contiguous {tuple(w.shape)} tensor of the requested dtype")


def nf4_dequantize(w: NF4Weight, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize an NF4 weight (bit-exact against ``bitsandbytes.functional.dequantize_4bit``).

    Runs the Triton kernel on CUDA or under ``TRITON_INTERPRET=1``, otherwise ``reference.nf4_dequantize``.

    Args:
        w: the 4-bit weight (see :class:`NF4Weight`).
        dtype: output dtype; defaults to ``w.dtype``, the only bitsandbytes-exact choice.
        out: optional contiguous output buffer of ``w.shape`` and ``dtype``.

    Returns:
        ``Tensor[w.shape]`` in ``dtype``.

    Raises:
        TypeError: when ``w`` is not an :class:`NF4Weight`.
        ValueError: when the packed size does not match the shape, or ``out`` does not fit.
    """
    _check(w, out, dtype)
    if use_triton(w.packed):
        return nf4_dequantize_forward(w, dtype, out)
    result = reference.nf4_dequantize(w, dtype)
    return result if out is None else out.copy_(result)
