"""RoPE kernel against reference.rope (and HF's apply_rotary_pos_emb): outputs and dq, dk, fp32 and bf16.

cos/sin come from transformers' own LlamaRotaryEmbedding with position ids that restart per packed
example, so the kernel is checked on exactly what the model hands it.
"""

from __future__ import annotations

import pytest
import torch

from raytune_llm.kernels import reference
from raytune_llm.kernels.rope import rope
from tests.kernels._tolerance import (
    check_against_reference,
    compile_for_sm90,
    kernel_device,
    needs_triton,
    patched_step,
    tiny_bf16_llama,
)

DTYPES = [torch.float32, torch.bfloat16]


def _cos_sin(batch: int, seq_lens: list[int], head_dim: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """HF cos/sin [batch, S, D] for one packed row of examples of ``seq_lens`` (positions restart at 0)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim, rope_theta=10000.0)
    emb = LlamaRotaryEmbedding(cfg)
    pos = torch.cat([torch.arange(n) for n in seq_lens]).unsqueeze(0).expand(batch, -1)
    x = torch.zeros(1, dtype=torch.float32)
    cos, sin = emb(x, pos)
    return cos.to(device), sin.to(device)


def _qk(b, hq, hk, s, d, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, hq, s, d, generator=gen).to(device), torch.randn(b, hk, s, d, generator=gen).to(device)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "b,hq,hk,seq_lens,d",
    [(1, 1, 1, [1], 2), (1, 4, 2, [3, 2, 4], 8), (2, 3, 1, [5, 2], 12), (1, 2, 2, [7], 6)],
)
def test_rope_matches_reference(dtype, b, hq, hk, seq_lens, d):
    dev = kernel_device()
    cos, sin = _cos_sin(b, seq_lens, d, dev)
    q, k = _qk(b, hq, hk, sum(seq_lens), d, dev)
    check_against_reference(
        rope, reference.rope, [q, k, cos, sin], dtype, names=["q", "k", "cos", "sin"], no_grad=(2, 3)
    )


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_rope_halves_equal_reads_half_the_table(dtype):
    # HF's tables repeat their first half; with halves_equal the kernel reads only that half: same result.
    dev = kernel_device()
    cos, sin = _cos_sin(2, [3, 4], 8, dev)
    assert torch.equal(cos[..., :4], cos[..., 4:]) and torch.equal(sin[..., :4], sin[..., 4:])
    q, k = _qk(2, 4, 2, 7, 8, dev, seed=5)

    def kern(q_, k_, c, s_):
        return rope(q_, k_, c, s_, halves_equal=True)

    check_against_reference(
        kern, reference.rope, [q, k, cos, sin], dtype, names=["q", "k", "cos", "sin"], no_grad=(2, 3)
    )
    # The hint is really taken: a table whose second half differs is rotated with its first half only.
    bent = cos.clone()
    bent[..., 4:] += 1.0
    with torch.no_grad():
        a = rope(q.clone(), k.clone(), bent, sin, halves_equal=True)[0]
        b = rope(q.clone(), k.clone(), cos, sin, halves_equal=True)[0]
    torch.testing.assert_close(a, b)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_rope_non_contiguous_projection_layout(dtype):
    # q/k as attention builds them: proj(x).view(B, S, H, D).transpose(1, 2) (head stride D, seq stride H*D),
    # and cos/sin shared by the batch ([1, S, D], broadcast with batch stride 0).
    dev = kernel_device()
    b, s, hq, hk, d = 2, 6, 4, 2, 8
    cos, sin = _cos_sin(1, [4, 2], d, dev)
    gen = torch.Generator().manual_seed(3)
    qp = torch.randn(b, s, hq * d, generator=gen).to(dev)
    kp = torch.randn(b, s, hk * d, generator=gen).to(dev)
    views = [lambda t: t.view(b, s, hq, d).transpose(1, 2), lambda t: t.view(b, s, hk, d).transpose(1, 2), None, None]
    check_against_reference(rope, reference.rope, [qp, kp, cos, sin], dtype, views=views, no_grad=(2, 3))


@needs_triton
def test_rope_keeps_the_attention_layout_and_reads_a_strided_head_dim(dtype=torch.float32):
    # New outputs take the layout of what the kernel reads: attention's [B, S, H, D] views stay [B, S, H, D] in
    # memory (so attention needs no transposing copy), and a dense q/k whose D is not unit-stride is read through a
    # contiguous copy and written in that copy's layout (the kernel writes D with unit stride).
    dev = kernel_device()
    b, s, hq, hk, d = 2, 6, 4, 2, 8
    cos, sin = _cos_sin(1, [4, 2], d, dev)
    gen = torch.Generator().manual_seed(4)
    qp = torch.randn(b, s, hq * d, generator=gen).to(dev).requires_grad_()
    kp = torch.randn(b, s, hk * d, generator=gen).to(dev).requires_grad_()
    qv, kv = qp.view(b, s, hq, d).transpose(1, 2), kp.view(b, s, hk, d).transpose(1, 2)
    q_out, k_out = rope(qv, kv, cos, sin)
    assert (q_out.stride(), k_out.stride()) == (qv.stride(), kv.stride())
    views = [lambda t: t.transpose(2, 3), lambda t: t.transpose(2, 3), None, None]
    qd = torch.randn(b, hq, d, s, generator=gen).to(dev)  # [B, H, D, S] storage: D has stride S
    kd = torch.randn(b, hk, d, s, generator=gen).to(dev)
    check_against_reference(rope, reference.rope, [qd, kd, cos, sin], dtype, views=views, no_grad=(2, 3))


@needs_triton
def test_rope_matches_hf_apply_rotary_pos_emb_and_is_in_place():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    dev = kernel_device()
    cos, sin = _cos_sin(2, [3, 5], 16, dev)
    q, k = _qk(2, 4, 2, 8, 16, dev, seed=5)
    want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin)
    q2, k2 = q.clone(), k.clone()
    got_q, got_k = rope(q2, k2, cos, sin)
    assert got_q.data_ptr() == q2.data_ptr() and got_k.data_ptr() == k2.data_ptr()
    torch.testing.assert_close(got_q, want_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_k, want_k, rtol=1e-5, atol=1e-5)


def test_rope_rejects_bad_shapes():
    q, k = torch.randn(1, 2, 4, 6), torch.randn(1, 1, 4, 6)
    with pytest.raises(ValueError, match="cos must be"):
        rope(q, k, torch.randn(1, 3, 6), torch.randn(1, 3, 6))
    with pytest.raises(ValueError, match="even"):
        rope(torch.randn(1, 2, 4, 5), torch.randn(1, 1, 4, 5), torch.randn(1, 4, 5), torch.randn(1, 4, 5))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("hq,hk", [(32, 8), (64, 8)])
def test_rope_real_sizes(dtype, hq, hk):
    dev = torch.device("cuda")
    cos, sin = _cos_sin(1, [1024, 3000, 4168], 128, dev)
    q, k = _qk(1, hq, hk, 8192, 128, dev)
    check_against_reference(rope, reference.rope, [q, k, cos, sin], dtype, no_grad=(2, 3))


@pytest.mark.slow
def test_rope_kernel_compiles_for_sm90_without_spills(tmp_path):
    from raytune_llm.kernels.rope import _rope_kernel

    sig = {
        n: ("*bf16" if n.endswith("_ptr") else "i32")
        for n in _rope_kernel.arg_names
        if not (n.startswith("BLOCK") or n in ("BACKWARD", "HALVES_EQUAL"))
    }
    consts = {"BLOCK_HQ": 32, "BLOCK_HK": 8, "BLOCK_D": 64}
    mod = "raytune_llm.kernels.rope"
    lines = compile_for_sm90(
        [
            (mod, "_rope_kernel", sig, {**consts, "BACKWARD": bw, "HALVES_EQUAL": eq}, 8)
            for bw in (False, True)
            for eq in (False, True)
        ],
        tmp_path,
    )
    assert len(lines) == 4 and all("LOCAL:0" in line for line in lines), lines


@needs_triton
def test_a_stashed_lean_recompute_runs_no_rope_forward_and_gives_the_same_bits(tmp_path, monkeypatch):
    # Offloaded checkpointing with the attention stash: the recompute replays attention and (lean_qkv) leaves q, k
    # uninitialised, so RoPE there gives its graph without running. The gradients are those of a recompute that
    # rotates them anyway, bit for bit, with one RoPE forward a layer instead of two.
    import raytune_llm.kernels.rope as rope_mod
    import raytune_llm.models.patch as patch_mod

    model, ids = tiny_bf16_llama(tmp_path)
    forwards = [0]
    real_launch = rope_mod._launch

    def launch(q, k, q_out, k_out, cos, sin, backward, *rest):
        forwards[0] += not backward
        return real_launch(q, k, q_out, k_out, cos, sin, backward, *rest)

    monkeypatch.setattr(rope_mod, "_launch", launch)
    with monkeypatch.context() as m:  # the recompute rotates its (uninitialised) q and k as the forward did
        m.setattr(patch_mod, "lean_qkv_active", lambda: False)
        loss0, g0 = patched_step(model, ids)
    n0, forwards[0] = forwards[0], 0
    loss1, g1 = patched_step(model, ids)
    n1 = forwards[0]
    layers = model.get_base_model().config.num_hidden_layers
    assert (n0, n1) == (2 * layers, layers)  # forward and recompute, then the forward alone
    assert torch.equal(loss1, loss0)
    for name in g0:
        assert torch.equal(g1[name], g0[name]), name
