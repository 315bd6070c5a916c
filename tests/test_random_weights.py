"""`model.random_weights`: a run from a folder holding only config.json trains on weights drawn on the worker.

What a user runs to see a big model's memory and speed before downloading it (the multi-GPU bench runs 8B and 70B
this way). Here: the quickstart's tiny Llama shape as a bare config.json, NF4 on one CPU worker, through the CLI.
"""

from __future__ import annotations

import json

import pytest
import torch

from raytune_llm.cli import main

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_trains_from_a_bare_config_and_exports_nothing(ray_session, tmp_path):
    from transformers import LlamaConfig

    folder = tmp_path / "shape"
    LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512,
    ).save_pretrained(folder)  # fmt: skip
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"]
    rc = main(
        [
            "train", "conf/quickstart.yaml", f"output_dir={tmp_path}", "name=rw", f"model.path={folder}",
            "model.random_weights=true", "export.formats=[]", "quant.bits=4", "train.num_workers=1",
            "train.max_steps=12", "train.log_every=4", "data.num_examples=300",
            # The memory settings reach the worker. On the CPU they change nothing: the table is on the host already,
            # the MLP runs the reference and auto checkpoints every layer (tests/models/test_memory_settings.py checks
            # the first two on the GPU, tests/sharding/test_planner.py what auto picks).
            "model.gradient_checkpointing=on", "model.keep_mlp_layers=1", "model.embeddings_on_host=true",
            "model.checkpoint_layers=auto",
        ]
    )  # fmt: skip
    assert rc == 0
    run = tmp_path / "rw"
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 12 and all(torch.isfinite(torch.tensor([m["loss"] for m in metrics])))
    assert metrics[-1]["loss"] < metrics[0]["loss"], [m["loss"] for m in metrics]
    assert all(m["tokens_per_s"] > 0 and "gpu_peak_gib" not in m for m in metrics if m["step"] % 4 == 0)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["exports"] == {} and summary["exact_match_before"] is None and summary["exact_match_after"] is None
    assert not (run / "eval.json").exists() and not (run / "exports").exists()
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"]  # nothing written into the user's folder
    # exporting it afterwards says why there is nothing to export, in one line
    from raytune_llm.export import ExportError, export

    with pytest.raises(ExportError, match=r"trained on random base weights \(model.random_weights\), which were never"):
        export(str(run), "hf")
