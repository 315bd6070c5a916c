"""The embedded default end to end on a real local Ray cluster: trains, learns, and fills the run folder."""

from __future__ import annotations

import json

import pytest

from raytune_llm.cli import main

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def run(ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    rc = main(["train", "conf/quickstart.yaml", f"output_dir={out}"])
    assert rc == 0
    return out / "quickstart"


def test_accuracy_rises_clearly(run):
    ev = json.loads((run / "eval.json").read_text())
    assert ev["n"] == 200
    assert ev["exact_match_before"] <= 0.1
    assert ev["exact_match_after"] >= ev["exact_match_before"] + 0.3, ev


def test_run_folder_contents(run):
    for name in ("config.yaml", "metrics.jsonl", "loss_curve.png", "summary.json", "adapter/adapter_config.json"):
        assert (run / name).exists(), name
    assert list((run / "tb").glob("events.out.tfevents.*"))
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, len(metrics) + 1))
    assert metrics[-1]["loss"] < 0.5 * metrics[0]["loss"]
    assert (run / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_adapter_and_merged_model_load_with_peft_and_transformers(run):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 9, 17, 3, 11]])
    base = AutoModelForCausalLM.from_pretrained(run / "base_model", dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, run / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(run / "exports" / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        a, b = peft(ids).logits, merged(ids).logits
    # the hf export is bf16 by default: compare at bf16 rounding of the weights
    assert torch.allclose(a, b, atol=5e-2, rtol=5e-2), (a - b).abs().max()


def test_qlora_nf4_run_trains_and_merges_exactly(ray_session, tmp_path):
    """quant.bits=4: the base is NF4 through bitsandbytes on CPU; the merged export equals PEFT on the NF4 base."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from raytune_llm.models.quantize import bnb_config, keep_nf4_layout

    rc = main(
        [
            "train", "conf/quickstart.yaml", f"output_dir={tmp_path}", "name=qlora", "quant.bits=4",
            "train.max_steps=30", "data.num_examples=600", "data.eval_examples=0", "train.num_workers=1",
            "export.formats=[adapter,hf]", "export.dtype=fp32",
        ]
    )  # fmt: skip
    assert rc == 0
    run = tmp_path / "qlora"
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    meta = json.loads((run / "adapter" / "raytune_llm.json").read_text())
    assert meta["quant_bits"] == 4 and meta["compute_dtype"] == "float32"
    from raytune_llm.train.worker import latest_complete

    # A checkpoint exports like the run's adapter: it carries the same quantization record (without it the merge
    # took a QLoRA checkpoint's base for 16-bit and skipped the NF4 round trip).
    ckpt = latest_complete(run / "ray" / "train")
    assert json.loads((ckpt / "adapter" / "raytune_llm.json").read_text()) == meta
    base = AutoModelForCausalLM.from_pretrained(
        run / "base_model", dtype=torch.float32, quantization_config=bnb_config(torch.float32)
    )
    assert any("Linear4bit" in type(m).__name__ for m in base.modules())
    keep_nf4_layout(base)  # the exact NF4 reference in eval mode on AVX512-BF16 CPUs too
    peft = PeftModel.from_pretrained(base, run / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(run / "exports" / "hf", dtype=torch.float32).eval()
    ids = torch.tensor([[5, 9, 17, 3, 11, 40, 2]])
    with torch.no_grad():
        diff = (peft(ids).logits - merged(ids).logits).abs().max().item()
    assert diff < 1e-4, diff
