"""NF4 dequantization against bitsandbytes itself: bit-exact, odd shapes, with and without double quant.

bitsandbytes 0.50.2 quantizes and dequantizes on the CPU, so the ground truth here is
``bitsandbytes.functional.dequantize_4bit`` on the very bytes the kernel reads.
"""

from __future__ import annotations

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import pytest
import torch

from raytune_llm.kernels import reference
from raytune_llm.kernels.nf4 import NF4Weight, nf4_dequantize
from tests.kernels._tolerance import kernel_device, needs_triton

DTYPES = [torch.float32, torch.bfloat16]
# Odd sizes: a single row of 7 (a padding nibble, one short block), n not a multiple of the block,
# widths that are not powers of two, and one even shape that takes bitsandbytes' native CPU kernel.
SHAPES = [(1, 7), (37, 19), (130, 70), (64, 128)]


def _quantize(shape, dtype, nested, blocksize=64, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=gen) * 0.05).to(dtype).to(device)
    packed, qs = bnbF.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type="nf4")
    return packed, qs


def _assert_bit_exact(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape, want.dtype, want.shape)
    diff = got != want
    if bool(diff.any()):
        idx = diff.nonzero()[:5].tolist()
        raise AssertionError(f"{int(diff.sum())} of {diff.numel()} elements differ, first at {idx}")


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "double_quant"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_reference_bit_exact_against_bnb(shape, nested, dtype):
    packed, qs = _quantize(shape, dtype, nested)
    _assert_bit_exact(reference.nf4_dequantize(NF4Weight.from_bnb(packed, qs)), bnbF.dequantize_4bit(packed, qs))


@needs_triton
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "double_quant"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_bit_exact_against_bnb(shape, nested, dtype, blocksize):
    packed, qs = _quantize(shape, dtype, nested, blocksize, device=kernel_device())
    _assert_bit_exact(nf4_dequantize(NF4Weight.from_bnb(packed, qs)), bnbF.dequantize_4bit(packed, qs))


@needs_triton
@pytest.mark.parametrize("pairs", [True, False], ids=["pairs", "elements"])
@pytest.mark.parametrize("blocksize", [64, 4096])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "double_quant"])
def test_kernel_programs_smaller_and_larger_than_a_block(monkeypatch, nested, blocksize, pairs):
    # The kernel broadcasts one scale per quantization block: with 256-element programs, blocksize 64 puts 4
    # blocks in a program and blocksize 4096 spreads one block over 16 programs; 300 x 70 ends mid-block.
    # Both store paths: 16-bit pairs as one 32-bit word, and one element at a time.
    import raytune_llm.kernels.nf4 as mod

    monkeypatch.setattr(mod, "_BLOCK_INTERPRET", 256)
    monkeypatch.setattr(mod, "_BLOCK", 256)
    monkeypatch.setattr(mod, "_PAIRS", pairs)
    packed, qs = _quantize((300, 70), torch.bfloat16, nested, blocksize, device=kernel_device())
    _assert_bit_exact(nf4_dequantize(NF4Weight.from_bnb(packed, qs)), bnbF.dequantize_4bit(packed, qs))


@needs_triton
def test_kernel_other_dtype_and_out_buffer():
    # Dequantizing a bf16-quantized weight to fp32 equals bnb's fp32 product before its cast.
    packed, qs = _quantize((33, 45), torch.bfloat16, nested=True, device=kernel_device())
    w = NF4Weight.from_bnb(packed, qs)
    want = reference.nf4_dequantize(w, torch.float32)
    _assert_bit_exact(nf4_dequantize(w, torch.float32), want)
    out = torch.empty(w.shape, dtype=torch.float32, device=kernel_device())
    assert nf4_dequantize(w, torch.float32, out=out) is out
    _assert_bit_exact(out, want)
    # A 16-bit output buffer that is not 4-byte aligned takes the one-element path (no 32-bit pair stores).
    out = torch.empty(w.shape.numel() + 1, dtype=torch.bfloat16, device=kernel_device())[1:].view(w.shape)
    assert out.data_ptr() % 4 == 2
    assert nf4_dequantize(w, out=out) is out
    _assert_bit_exact(out, bnbF.dequantize_4bit(packed, qs))


@needs_triton
@pytest.mark.parametrize("shape", [(16, 70), (5, 9)], ids=["even", "odd"])
def test_kernel_fp16_bit_exact(shape):
    # fp16 pairs are written through the same 32-bit stores as bf16 (an odd n takes the one-element path).
    packed, qs = _quantize(shape, torch.float16, nested=True, device=kernel_device())
    _assert_bit_exact(nf4_dequantize(NF4Weight.from_bnb(packed, qs)), bnbF.dequantize_4bit(packed, qs))


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16], ids=["uint8", "bf16_storage"])
def test_from_bnb_linear4bit_module_and_param(storage):
    # A real Linear4bit quantized on the CPU, with the bf16 quant_storage that ZeRO-3 partitions.
    gen = torch.Generator().manual_seed(3)
    dense = torch.randn(24, 40, generator=gen) * 0.05
    layer = bnb.nn.Linear4bit(40, 24, bias=False, compute_dtype=torch.float32, quant_type="nf4", quant_storage=storage)
    layer.weight = bnb.nn.Params4bit(
        dense.clone(), requires_grad=False, quant_type="nf4", compress_statistics=True, quant_storage=storage
    )
    layer = layer.to("cpu")
    want = bnbF.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    for source in (layer, layer.weight):
        w = NF4Weight.from_bnb(source)
        assert w.shape == (24, 40) and w.packed.dtype == torch.uint8 and w.nested is not None
        _assert_bit_exact(nf4_dequantize(w), want)
    assert (want.float() - dense).abs().max() < 0.05  # the quantization itself is sane


def test_bad_input_errors():
    with pytest.raises(ValueError, match="no quant_state"):
        NF4Weight.from_bnb(torch.zeros(8, dtype=torch.uint8))
    packed, qs = bnbF.quantize_4bit(torch.randn(8, 8), quant_type="fp4")
    with pytest.raises(ValueError, match="only 'nf4'"):
        NF4Weight.from_bnb(packed, qs)
    packed, qs = _quantize((8, 8), torch.float32, False)
    with pytest.raises(ValueError, match="cannot hold"):
        NF4Weight.from_bnb(packed[:-1], qs)
    with pytest.raises(TypeError, match="expects an NF4Weight"):
        nf4_dequantize(torch.zeros(4))


@pytest.mark.gpu
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "double_quant"])
@pytest.mark.parametrize("shape", [(14336, 4096), (4096, 14336), (8192, 28672)], ids=lambda s: "x".join(map(str, s)))
def test_kernel_bit_exact_real_sizes(shape, nested):
    packed, qs = _quantize(shape, torch.bfloat16, nested, device="cuda")
    _assert_bit_exact(nf4_dequantize(NF4Weight.from_bnb(packed, qs)), bnbF.dequantize_4bit(packed, qs))
