"""Time the host-table embedding gather (kernels.embedding) against a device-table lookup, at 8B's width.

    python bench/kernels/bench_embedding.py --out r.json     # GPU

Rows of a pinned host table [128256, 4096] bf16 gathered by CUDA ids, by tile width and warps (bench/_harness.py's timing:
CUDA events, median); F.embedding on a device copy of the table beside it; GB/s counts the rows read.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from _harness import Harness  # noqa: E402

import raytune_llm.kernels.embedding as emb  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192, 16384])
    args = p.parse_args()
    h = Harness()

    def _ms(fn) -> float:
        return h.time(lambda _: fn()).ms

    table = torch.randn(128256, 4096, dtype=torch.bfloat16).pin_memory()
    device_table = table.cuda()
    rows = []
    for n in args.tokens:
        ids = torch.randint(0, table.shape[0], (n,), device="cuda")
        nbytes = n * table.shape[1] * table.element_size()
        ref = _ms(lambda ids=ids: F.embedding(ids, device_table))
        rows.append(
            {"tokens": n, "kind": "device F.embedding", "ms": round(ref, 4), "GBps": round(nbytes / ref / 1e6, 1)}
        )
        for block in (1024, 2048, 4096):
            emb._BLOCK = block
            ms = _ms(lambda ids=ids: emb.embedding(ids, table))
            rows.append(
                {
                    "tokens": n,
                    "kind": f"host gather BLOCK {block}",
                    "ms": round(ms, 4),
                    "GBps": round(nbytes / ms / 1e6, 1),
                }
            )
        assert torch.equal(emb.embedding(ids, table), F.embedding(ids, device_table))
    for r in rows:
        print(f"{r['tokens']:6d} {r['kind']:26s} {r['ms']:8.4f} ms {r['GBps']:8.1f} GB/s")
    with open(args.out, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
