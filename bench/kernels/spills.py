"""Registers and spills of our Triton kernels on the H200 (sm_90), compiled here, without a GPU.

`triton.compile` builds a kernel for a target it is told (no device needed: ptxas and cuobjdump come with Triton's
wheel); `cuobjdump -res-usage` then gives the registers a thread takes and its stack (local memory: spills), and
the SASS gives the spill stores (``STL``). A launch setting that spills kilobytes a thread is slow before any GPU
time is spent on it (session 21: the fused LoRA SwiGLU backward held [16, 256] rank updates whole in each warp and
spilled ~3 KB a thread).

    python bench/kernels/spills.py                       # the fused SwiGLU backward's settings, and its neighbours
    python bench/kernels/spills.py --settings 16:8,32:8
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

from raytune_llm.kernels import lora_pair, lora_swiglu, lora_swiglu_grad  # noqa: E402

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


def grad_kernel_usage(bn: int, warps: int, lean: bool, bk: int = 256) -> dict:
    """The fused SwiGLU backward at ``BN`` rows x ``bk`` columns, rank 16, bf16: a lean recompute's (gate and up
    finished, ``H A_d^T`` formed) or a finished layer's."""
    k = lora_swiglu_grad._lora_swiglu_grad_kernel
    types = {n: ("*fp32" if n[:2] in ("PP", "QP") else "*bf16") for n in k.arg_names if n.endswith("_ptr")}
    types.update(scale_g="fp32", scale_u="fp32")
    consts = dict(ROWS=8192, BN=bn, BK=bk, R_PAD=16, FINISH_G=lean, FINISH_U=lean, UPCAST=False, DOT_PREC="tf32")
    consts.update(RNE_BF16=False, WANT_PH=lean, WANT_QH=True, WANT_QG=True, WANT_QU=True)
    return resource_usage(k, types, consts, warps)


def fwd_kernel_usage(bn: int, warps: int, store_gu: bool, bk: int = 256) -> dict:
    """The fused SwiGLU forward (H and H A_d^T's partials) at ``BN`` rows x ``bk`` columns, rank 16, bf16."""
    k = lora_swiglu_grad._lora_swiglu_fwd_ha_kernel
    types = {n: "*bf16" for n in k.arg_names if n.endswith("_ptr")} | {"PP_ptr": "*fp32"}
    types.update(scale_g="fp32", scale_u="fp32")
    consts = dict(ROWS=8192, BN=bn, BK=bk, R_PAD=16, UPCAST=False, DOT_PREC="tf32", RNE_BF16=False, STORE_GU=store_gu)
    return resource_usage(k, types, consts, warps)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--settings", default="16:8,32:8,16:4,32:4", help="the fused backward's BN:warps settings")
    p.add_argument("--max-stack", type=int, help="exit 1 if the fused backward at its default tile spills more")
    args = p.parse_args(argv)
    if args.max_stack is not None:  # the check tests/kernels/test_lora_swiglu_grad.py runs
        tile = lora_swiglu_grad._TILE
        usage = [grad_kernel_usage(*tile, flag) for flag in (True, False)]
        usage += [fwd_kernel_usage(*tile, flag) for flag in (True, False)]
        worst = max(u["stack_bytes"] for u in usage)
        print(f"lora_swiglu_grad {tile}, backward and forward: at most {worst} B of stack a thread")
        return int(worst > args.max_stack)
    rows = []
    for text in args.settings.split(","):
        bn, warps = (int(x) for x in text.split(":"))
        for lean in (True, False):
            name = f"lora_swiglu_grad {bn}x256 {warps}w {'lean' if lean else 'finished'}"
            rows.append((name, grad_kernel_usage(bn, warps, lean)))
        for store in (True, False):
            name = f"lora_swiglu fwd+HA {bn}x256 {warps}w {'G,U,H' if store else 'H'}"
            rows.append((name, fwd_kernel_usage(bn, warps, store)))
    bwd = lora_swiglu._lora_swiglu_bwd_kernel
    types = {n: "*bf16" for n in bwd.arg_names if n.endswith("_ptr")} | {"scale_g": "fp32", "scale_u": "fp32"}
    bm, bn_, warps, _ = lora_swiglu._BWD
    consts = dict(R_PAD=16, BM=bm, BN=bn_, FINISH_G=True, FINISH_U=True, UPCAST=False, DOT_PREC="tf32", RNE_BF16=False)
    rows.append(
        (f"lora_swiglu bwd {bm}x{bn_} {warps}w lean", resource_usage(bwd, types, consts | {"COLS_FIRST": True}, warps))
    )
    pair = lora_pair._lora_pair_kernel
    types = {n: "*bf16" for n in pair.arg_names if n.endswith("_ptr")} | {"PP_ptr": "*fp32", "QP_ptr": "*fp32"}
    bn_, bk, warps = lora_pair._TILE
    consts = dict(ROWS=8192, BN=bn_, BK=bk, R_PAD=16, UPCAST=False, DOT_PREC="tf32", WANT_P=True, WANT_Q=True)
    rows.append((f"lora_pair {bn_}x{bk} {warps}w", resource_usage(pair, types, consts, warps)))
    print(f"{'kernel (sm_90)':<44} {'regs':>5} {'stack B':>8} {'STL':>5} {'MMA':>5}")
    for name, u in rows:
        print(f"{name:<44} {u['regs']:>5} {u['stack_bytes']:>8} {u['spill_stores']:>5} {u['mma']:>5}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
