"""The merge streams: exporting a multi-shard checkpoint keeps peak RSS well under the model's size."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from .conftest import build_base, build_run

# The child pays every one-time cost first (imports, bitsandbytes' native library, transformers' lazy model modules)
# with a warm-up export of a tiny run, then resets the kernel's peak-RSS counter (VmHWM, via clear_refs "5") and
# exports the big run, so the growth measured is what the export itself holds.
_CHILD = textwrap.dedent(
    """
    import json, sys
    from raytune_llm.export import export

    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith(("VmHWM", "VmRSS")):
                yield int(line.split()[1]) * 1024

    export(sys.argv[1], "hf", dtype="fp32", max_shard_size=sys.argv[3])
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before, _ = hwm()
    export(sys.argv[2], "hf", dtype="fp32", max_shard_size=sys.argv[3])
    peak, _ = hwm()
    print(json.dumps({"before": before, "peak": peak}))
    """
)


def _as_qlora(run):
    # The adapter format does not depend on the base's quantization; marking the run 4-bit makes the export do the
    # NF4 round trip on every linear weight (the costlier path) without a slow bitsandbytes load at build time.
    meta = {"quant_bits": 4, "quant_type": "nf4", "double_quant": True, "blocksize": 64, "compute_dtype": "bfloat16"}
    (run / "adapter" / "raytune_llm.json").write_text(json.dumps(meta))
    return run


@pytest.mark.slow
def test_peak_rss_stays_near_one_shard(tmp_path):
    small = _as_qlora(build_run(tmp_path / "small", build_base(tmp_path / "small_base")))
    base = build_base(
        tmp_path / "base", "llama", max_shard_size="8MB", hidden_size=512, intermediate_size=1536, num_hidden_layers=16
    )
    shards = [p for p in base.iterdir() if p.suffix == ".safetensors"]
    model_bytes = sum(p.stat().st_size for p in shards)
    assert len(shards) >= 10
    run = _as_qlora(build_run(tmp_path / "run", base))
    res = subprocess.run(
        [sys.executable, "-c", _CHILD, str(small), str(run), "8MB"], capture_output=True, text=True, check=True
    )
    m = json.loads(res.stdout.strip().splitlines()[-1])
    grew = m["peak"] - m["before"]
    print(
        f"model {model_bytes / 2**20:.1f} MiB in {len(shards)} shards; peak RSS grew {grew / 2**20:.1f} MiB in export"
    )
    assert grew < 0.25 * model_bytes, f"RSS grew {grew / 2**20:.1f} MiB for a {model_bytes / 2**20:.1f} MiB model"
    out_shards = json.loads((run / "exports" / "hf" / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(out_shards.values())) >= 10
