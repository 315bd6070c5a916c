"""Low-memory loading: `load_model(..., quantize="nf4")` of a multi-shard checkpoint never holds the bf16 model.

A fresh child process first pays every one-time cost (imports, bitsandbytes' native library, transformers' lazy
model modules) by loading a small checkpoint, then resets the kernel's peak-RSS counter (VmHWM, via clear_refs
"5") and loads the big one. Shards are read one at a time (one tensor in flight, nothing left mapped) and each
linear weight is quantized to NF4 as it lands, so the peak above the loaded NF4 model is about one shard plus one
layer, and the whole peak stays well under the size of the bf16 checkpoint.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from raytune_llm.models.tiny import build_tiny_model

_CHILD = textwrap.dedent(
    """
    import json, sys
    import torch
    torch.set_num_threads(1)
    from raytune_llm.models.load import load_model

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    warm = load_model(sys.argv[1], quantize="nf4", dtype=torch.bfloat16, device="cpu")
    del warm
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS")
    model = load_model(sys.argv[2], quantize="nf4", dtype=torch.bfloat16, device="cpu")
    after = status("VmRSS")
    peak = status("VmHWM")
    n4 = sum(type(m).__name__ == "Linear4bit" for m in model.modules())
    print(json.dumps({"before": before, "after": after, "peak": peak, "linear4bit": n4}))
    """
)


@pytest.mark.slow
def test_nf4_load_peak_rss_is_one_shard_not_the_model(tmp_path):
    small = build_tiny_model(tmp_path / "small", family="llama", vocab_size=256, seed=0)
    big = build_tiny_model(
        tmp_path / "big",
        family="llama",
        vocab_size=256,
        seed=0,
        dtype=torch.bfloat16,
        max_shard_size="8MB",
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=16,
        num_attention_heads=8,
        num_key_value_heads=4,
    )
    shards = sorted(big.glob("*.safetensors"))
    model_bytes = sum(p.stat().st_size for p in shards)
    shard_bytes = max(p.stat().st_size for p in shards)
    assert len(shards) >= 10, [p.name for p in shards]
    res = subprocess.run([sys.executable, "-c", _CHILD, str(small), str(big)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads(res.stdout.strip().splitlines()[-1])
    held = m["after"] - m["before"]  # the loaded NF4 model itself
    peak = m["peak"] - m["before"]
    mib = 2**20
    print(
        f"bf16 checkpoint {model_bytes / mib:.1f} MiB in {len(shards)} shards (largest {shard_bytes / mib:.1f} MiB); "
        f"NF4 model holds {held / mib:.1f} MiB; peak during load {peak / mib:.1f} MiB"
    )
    assert m["linear4bit"] == 16 * 7
    # NF4 keeps ~0.28 of bf16's bytes on the linear weights; the transient above it is about one shard + one layer.
    assert peak < 0.6 * model_bytes, f"peak {peak / mib:.1f} MiB for a {model_bytes / mib:.1f} MiB bf16 model"
    assert peak - held < 3 * shard_bytes, (
        f"transient {(peak - held) / mib:.1f} MiB vs shards of {shard_bytes / mib:.1f}"
    )
