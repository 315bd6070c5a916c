"""Registers and spills of our Triton kernels on the H200 (sm_90), compiled here, without a GPU.

`triton.compile` builds a kernel for a target it is told (no device needed: ptxas and cuobjdump come with Triton's
wheel); `cuobjdump -res-usage` then gives the registers a thread takes and its stack (local memory: spills), and
the SASS gives the spill stores (``STL``). A launch setting that spills kilobytes a thread is slow before any GPU
time is spent on it (session 21: a fused LoRA SwiGLU backward, since removed, held [16, 256] rank updates whole in
each warp and spilled ~3 KB a thread).

    python bench/kernels/spills.py      # the LoRA SwiGLU kernels at their launch settings, and lora_pair
    python bench/kernels/spills.py --max-stack 128  # exit 1 if a SwiGLU kernel spills more (tests/kernels/test_lora.py)
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from raytune_llm.kernels import lora_pair, lora_swiglu  # noqa: E402

H200 = GPUTarget("cuda", 90, 128)


def resource_usage(kernel, types: dict[str, str], constexprs: dict, num_warps: int, target=H200) -> dict:
    """``{"regs", "stack_bytes", "spill_stores", "mma"}`` of ``kernel`` compiled for ``target``.

    ``types``: each runtime argument's Triton type (``"*bf16"``, ``"i32"``, ``"fp32"``; a name missing here takes
    ``"i32"``); ``constexprs``: the compile-time ones by name.
    """
    sig, cx = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            sig[name], cx[(i,)] = "constexpr", constexprs[name]
        else:
            sig[name] = types.get(name, "i32")
    compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=cx), target=target,
                              options={"num_warps": num_warps})  # fmt: skip
    tools = Path(triton.backends.nvidia.__file__).parent / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        Path(cubin).write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([tools / "cuobjdump", "-res-usage", cubin], capture_output=True, text=True, check=True)
        sass = subprocess.run([tools / "cuobjdump", "-sass", cubin], capture_output=True, text=True, check=True)
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)", usage.stdout)
    if m is None:
        raise RuntimeError(f"spills: no resource line in cuobjdump's output: {usage.stdout[:200]!r}")
    return {
        "regs": int(m.group(1)),
        "stack_bytes": int(m.group(2)),
        "spill_stores": len(re.findall(r"\bSTL\b", sass.stdout)),
        "mma": len(re.findall(r"\bH(?:G)?MMA\b", sass.stdout)),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-stack", type=int, help="exit 1 if a LoRA SwiGLU kernel spills more bytes a thread")
    args = p.parse_args(argv)
    rows = []
    common = dict(R_PAD=16, UPCAST=False, DOT_PREC="tf32", RNE_BF16=False)
    fwd, bwd = lora_swiglu._lora_swiglu_fwd_kernel, lora_swiglu._lora_swiglu_bwd_kernel
    bm, bn, warps, stages, spans = lora_swiglu._LAUNCH
    for kernel, name, flags in (
        (fwd, "fwd G,U,H", dict(STORE_GU=True)),
        (fwd, "fwd H", dict(STORE_GU=False)),
        (bwd, "bwd lean", dict(FINISH_G=True, FINISH_U=True)),
        (bwd, "bwd kept", dict(FINISH_G=False, FINISH_U=False)),
    ):
        types = {n: "*bf16" for n in kernel.arg_names if n.endswith("_ptr")} | {"scale_g": "fp32", "scale_u": "fp32"}
        consts = common | flags | dict(BM=bm, BN=bn, STAGES=stages, SPAN=65536 // spans)  # 65,536 rows
        rows.append((f"lora_swiglu {name} {bm}x{bn} {warps}w {stages}s", resource_usage(kernel, types, consts, warps)))
    pair = lora_pair._lora_pair_kernel
    types = {n: "*bf16" for n in pair.arg_names if n.endswith("_ptr")} | {"PP_ptr": "*fp32", "QP_ptr": "*fp32"}
    bn, bk, warps, _ = lora_pair._TILE  # num_stages: spills.py compiles at Triton's default, 3 (the setting's)
    consts = common | dict(ROWS=8192, BN=bn, BK=bk, WANT_P=True, WANT_Q=True)
    rows.append((f"lora_pair {bn}x{bk} {warps}w", resource_usage(pair, types, consts, warps)))
    print(f"{'kernel (sm_90)':<44} {'regs':>5} {'stack B':>8} {'STL':>5} {'MMA':>5}")
    for name, u in rows:
        print(f"{name:<44} {u['regs']:>5} {u['stack_bytes']:>8} {u['spill_stores']:>5} {u['mma']:>5}")
    worst = max(u["stack_bytes"] for name, u in rows if name.startswith("lora_swiglu"))
    return int(args.max_stack is not None and worst > args.max_stack)


if __name__ == "__main__":
    raise SystemExit(main())
