"""The merge streams: exporting a multi-shard checkpoint keeps peak RSS well under the model's size."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from .conftest import build_base, build_run

_CHILD = textwrap.dedent(
    """
    import json, resource, sys
    import psutil, torch, transformers, safetensors, bitsandbytes  # imports are not what we measure
    from raytune_llm.export import export
    from raytune_llm.export.merge import quantized_weight_names
    quantized_weight_names(sys.argv[3])  # builds the meta model once: warms transformers' lazy model imports
    before = psutil.Process().memory_info().rss
    out = export(sys.argv[1], "hf", dtype="fp32", max_shard_size=sys.argv[2])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"before": before, "peak": peak}))
    """
)


@pytest.mark.slow
def test_peak_rss_stays_near_one_shard(tmp_path):
    # ~34 MB of fp32 weights in 4 MB shards; 4-bit run so the NF4 round trip is part of what is measured.
    base = build_base(
        tmp_path / "base", "llama", max_shard_size="4MB", hidden_size=256, intermediate_size=768, num_hidden_layers=8
    )
    shards = [p for p in base.iterdir() if p.suffix == ".safetensors"]
    model_bytes = sum(p.stat().st_size for p in shards)
    assert len(shards) >= 6
    run = build_run(tmp_path / "run", base, bits=4)
    res = subprocess.run(
        [sys.executable, "-c", _CHILD, str(run), "4MB", str(base)], capture_output=True, text=True, check=True
    )
    m = json.loads(res.stdout.strip().splitlines()[-1])
    grew = m["peak"] - m["before"]
    print(f"model {model_bytes / 2**20:.1f} MiB in {len(shards)} shards; RSS grew {grew / 2**20:.1f} MiB during export")
    assert grew < 0.5 * model_bytes, f"RSS grew {grew / 2**20:.1f} MiB for a {model_bytes / 2**20:.1f} MiB model"
    out_shards = json.loads((run / "exports" / "hf" / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(out_shards.values())) >= 6
