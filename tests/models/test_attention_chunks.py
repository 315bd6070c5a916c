"""Causal SDPA over groups of kv heads (q beyond MAX_SDPA_ELEMENTS) equals the single call, values and grads."""

from __future__ import annotations

import pytest
import torch

from raytune_llm.models import attention


@pytest.mark.parametrize("limit_heads", [1, 2, 3])
def test_grouped_heads_equal_one_call(monkeypatch, limit_heads):
    torch.manual_seed(0)
    b, hq, hk, s, d = 2, 8, 4, 24, 16
    q0 = torch.randn(b, hq, s, d, dtype=torch.float64)
    k0 = torch.randn(b, hk, s, d, dtype=torch.float64)
    v0 = torch.randn(b, hk, s, d, dtype=torch.float64)
    up = torch.randn(b, s, hq, d, dtype=torch.float64)

    def run():
        q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
        out = attention.causal_sdpa(q, k, v, d**-0.5)
        (out * up).sum().backward()
        return out.detach(), q.grad, k.grad, v.grad

    whole = run()
    per_kv = b * (hq // hk) * s * d
    monkeypatch.setattr(attention, "MAX_SDPA_ELEMENTS", per_kv * limit_heads)  # groups of `limit_heads` kv heads
    grouped = run()
    assert grouped[0].shape == (b, s, hq, d)
    for a, g in zip(whole, grouped):
        torch.testing.assert_close(g, a, rtol=1e-12, atol=1e-12)
