"""The chunked NF4 round trip used by the merge is bit-identical to bitsandbytes on the whole tensor."""

from __future__ import annotations

import bitsandbytes.functional as bnbf
import pytest
import torch

from raytune_llm.export import merge


@pytest.mark.parametrize("shape", [(96, 64), (33, 200), (7,), (130, 96)])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_chunked_roundtrip_matches_bnb(monkeypatch, shape, double_quant, dtype):
    monkeypatch.setattr(merge, "_NF4_CHUNK", 256)  # force many chunks (and a ragged last one) on small tensors
    torch.manual_seed(0)
    w = torch.randn(shape) * 0.05
    quant = {"quant_bits": 4, "blocksize": 64, "double_quant": double_quant, "compute_dtype": dtype}
    got = merge.nf4_roundtrip(w, quant)
    packed, state = bnbf.quantize_4bit(
        w.to(getattr(torch, dtype)), blocksize=64, compress_statistics=double_quant, quant_type="nf4"
    )
    state.dtype = torch.float32
    # Dequantized flat: on AVX512 CPUs bitsandbytes' 2-D CPU kernel takes each row's blocks from the row's start, wrong
    # when a row is not a whole number of blocks (here 96 = 1.5 blocks); NF4 blocks run over the flattened tensor.
    state.shape = torch.Size([w.numel()])
    want = bnbf.dequantize_4bit(packed, state).reshape(shape)
    assert got.dtype == torch.float32 and torch.equal(got, want)
