"""bench/gpu/best_variant.py: the fastest variant under a peak, as flags run_stack accepts and that set what the
variant's name set."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench" / "gpu"))
sys.path.insert(0, str(ROOT / "bench" / "e2e"))
from best_variant import main, variant_flags  # noqa: E402
from run_stack import parse_args, parse_variants  # noqa: E402


@pytest.mark.parametrize(
    "name",
    [
        "all+once+stash+host+lastdev+headhost+wh+keep13+graph",
        "all+once+stashattn+host+lastdev+headhost+keep2+hostkeep18",
        "all+once+stash+lastdev+keep2+hostkeep14+chunk0",
        "all+once+stash+lastdev2+keep2+hostkeep14+hostgate1+chunk0",
        "all+once+stash+host+headhost+wh+lastdev2+keep6+hostkeep9+lag3",
        "all+once+stash+host+lastdev3+headhost+wh+keep6+hostkeep10",
        "24+once+chunkauto#2",
    ],
)
def test_the_flags_set_what_the_name_does(name, tmp_path):
    args = parse_args(
        ["--stack", "ours", "--synthetic", "8b", "--out", str(tmp_path / "o.json"), *variant_flags(name).split()]
    )
    (v,) = parse_variants(name.split("#")[0])
    assert args.stash_attention == v["stash"] and args.no_stash_o_proj == (not v["stash_o"])
    assert args.dequantize_once == v["once"] and args.cuda_graph == v["graph"]
    assert args.embeddings_on_host == v["host"] and args.head_on_host == v["head_host"]
    assert args.last_layer_on_device == v["last_on_device"] and args.weights_on_host == v["weights_host"]
    assert (args.keep_mlp_layers or 0) == v["keep"] and (args.keep_mlp_layers_on_host or 0) == v["keep_host"]
    assert (args.keep_mlp_gate_on_host or 0) == v["gate_host"] and args.offload_lag == v["lag"]
    assert args.checkpoint_layers == v["layers"]
    assert args.mlp_chunk_tokens == (None if v["chunk"] is None else str(v["chunk"]))  # no flag: the model's own


def test_the_fastest_under_the_peak(tmp_path, capsys):
    V = "all+once+stash+host+lastdev+headhost"
    runs = {
        f"{V}+keep6+graph": {"status": "ok", "step_ms_median": 582.4, "peak_gib": 7.82},
        f"{V}+wh+keep13+graph": {"status": "ok", "step_ms_median": 571.0, "peak_gib": 8.02},
        f"{V}+wh+keep14+graph": {"status": "ok", "step_ms_median": 570.1, "peak_gib": 8.52},
        f"{V}+wh+keep20+graph": {"status": "oom", "error": "CUDA out of memory"},
    }
    path = tmp_path / "var.json"
    path.write_text(json.dumps({"variants": runs}))
    assert main([str(path), "--max-peak-gib", "8.05", "--extra", "--mlp-chunk-tokens 0"]) == 0
    out = capsys.readouterr()
    assert out.out.split() == (variant_flags(f"{V}+wh+keep13+graph") + " --mlp-chunk-tokens 0").split()
    assert "571.0 ms" in out.err
    main([str(path), str(tmp_path / "missing.json"), "--max-peak-gib", "1", "--default", "--keep-mlp-layers 2"])
    out = capsys.readouterr()
    assert out.out.strip() == "--keep-mlp-layers 2" and "missing.json" in out.err and "none qualifies" in out.err
    for name, what in (("all+full", "lean"), ("all+on", "mode"), ("8+sep", "fused_residuals")):
        with pytest.raises(SystemExit, match=f"sets {what}, which no run_stack flag sets"):
            variant_flags(name)
