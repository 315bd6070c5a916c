"""The planner's predictions against the peaks measured on the H200 (bench/results/e2e_*.json), within 15%.

The measurements are the end-to-end benchmark's (Llama-3.1-8B shapes, NF4, LoRA r=16 on all projections,
checkpointing on): raytune_llm's fused stack and the standard transformers + PEFT + bitsandbytes stack. This
keeps a planner change honest against real numbers without a GPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raytune_llm.sharding.planner import plan_from_values

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"
MEASURED = sorted(RESULTS.glob("e2e_h200_*.json"))


def _cases():
    for path in MEASURED:
        e2e = json.loads(path.read_text())
        for shape, s in e2e["summary"].items():
            for stack, fused in (("ours", True), ("std_qlora", False)):
                if (s.get("peak_gib") or {}).get(stack) is not None:
                    yield pytest.param(e2e, shape, fused, s["peak_gib"][stack], id=f"{path.stem}-{shape}-{stack}")


@pytest.mark.skipif(not MEASURED, reason="no H200 e2e measurements in bench/results")
@pytest.mark.parametrize("e2e,shape,fused,measured", list(_cases()))
def test_planner_within_15_percent_of_h200_peak(e2e, shape, fused, measured):
    mb, seq = (1, int(shape.split("_")[1])) if shape.startswith("packed_") else map(int, shape.split("x"))
    plan = plan_from_values(
        e2e["model"]["config"],
        seq_len=seq,
        micro_batch=mb,
        checkpointing="on",
        gpu_mem_gib=e2e["environment"]["gpu_total_gib"],
        fused=fused,
    )
    assert abs(plan.peak_gib / measured - 1) <= 0.15, (shape, fused, plan.peak_gib, measured)
