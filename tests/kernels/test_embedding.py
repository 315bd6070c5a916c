"""Embedding gather kernel against F.embedding: exact rows, odd widths, bad ids, a pinned host table (GPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from raytune_llm.kernels import reference
from raytune_llm.kernels.embedding import embedding
from tests.kernels._tolerance import compile_for_sm90, kernel_device, needs_triton


def _table(v, h, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(v, h, generator=gen).to(dtype).to(device)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("ids_shape", "width"), [((1,), 1), ((3,), 37), ((2, 5), 96), ((2, 3), 4100)])
def test_embedding_rows_are_exact(dtype, ids_shape, width):
    dev = kernel_device()
    table = _table(50, width, dtype, dev)
    ids = torch.randint(0, 50, ids_shape, generator=torch.Generator().manual_seed(1)).to(dev)
    out = embedding(ids, table)
    assert out.dtype == dtype and out.shape == (*ids_shape, width) and out.device == ids.device
    assert torch.equal(out, F.embedding(ids, table))


@needs_triton
def test_embedding_takes_strided_ids_and_a_strided_table():
    dev = kernel_device()
    table = _table(64, 24, torch.float32, dev).t().contiguous().t()  # column stride != 1: copied first
    ids = torch.arange(40, device=dev).view(5, 8).t()[:, ::2]  # non-contiguous
    assert torch.equal(embedding(ids, table), F.embedding(ids, table))


@needs_triton
def test_embedding_bad_ids_give_nan_rows_and_read_nothing_outside():
    dev = kernel_device()
    table = _table(10, 16, torch.float32, dev)
    ids = torch.tensor([[3, -1, 10, 9]], device=dev)
    out = embedding(ids, table)
    assert torch.equal(out[0, 0], table[3]) and torch.equal(out[0, 3], table[9])
    assert torch.isnan(out[0, 1]).all() and torch.isnan(out[0, 2]).all()
    assert torch.equal(reference.embedding(ids, table).isnan(), out.isnan())


def test_embedding_refuses_what_it_cannot_serve():
    table = torch.randn(4, 8)
    with pytest.raises(ValueError, match="frozen"):
        embedding(torch.tensor([0]), table.requires_grad_(True))
    with pytest.raises(ValueError, match="integers"):
        embedding(torch.tensor([0.0]), torch.randn(4, 8))
    with pytest.raises(ValueError, match=r"\[V, H\]"):
        embedding(torch.tensor([0]), torch.randn(4, 8, 2))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_embedding_reads_a_pinned_host_table_from_the_gpu(dtype):
    table = _table(128256 // 16, 4096, dtype, "cpu").pin_memory()
    ids = torch.randint(0, table.shape[0], (4, 2048), device="cuda")
    out = embedding(ids, table)
    assert out.is_cuda and torch.equal(out, F.embedding(ids, table.cuda()))
    with pytest.raises(ValueError, match="pinned"):
        embedding(ids, table.clone())  # pageable host memory: the GPU cannot read it
    with pytest.raises(ValueError, match="unit column stride"):
        embedding(ids, table.t().contiguous().pin_memory().t())  # pinned, but a row-major copy would not be


@pytest.mark.gpu
def test_embedding_from_a_host_table_records_into_a_cuda_graph():
    table = _table(1000, 256, torch.bfloat16, "cpu").pin_memory()
    ids = torch.randint(0, 1000, (2, 64), device="cuda")
    embedding(ids, table)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = embedding(ids, table)
    ids.copy_(torch.randint(0, 1000, (2, 64), device="cuda"))
    graph.replay()
    assert torch.equal(out, F.embedding(ids, table.cuda()))


@pytest.mark.slow
def test_embedding_kernel_compiles_for_sm90_without_spills(tmp_path):
    sig = {"Y_ptr": "*bf16", "E_ptr": "*bf16", "Ids_ptr": "*i64", "stride_y": "i32", "stride_e": "i32"}
    sig |= {"n_rows": "i32", "n_cols": "i32"}
    lines = compile_for_sm90(
        [("raytune_llm.kernels.embedding", "_embedding_fwd_kernel", sig, {"BLOCK": 4096}, 4)], tmp_path
    )
    assert len(lines) == 1 and "LOCAL:0" in lines[0], lines
