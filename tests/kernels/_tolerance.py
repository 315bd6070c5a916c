"""One tolerance table and comparison helper for every kernel test.

- fp32: elementwise ``|kernel - ref| <= atol + rtol * |ref|`` with rtol = atol = 1e-5.
- bf16 (and fp16): the FlashAttention rule. With ``ref32`` the reference run in fp32 on the same
  (rounded) inputs and ``ref_lp`` the reference run in the low precision itself, the kernel passes
  when ``max|kernel - ref32| <= 2 * max|ref_lp - ref32| + atol_floor``: the kernel may be at most
  twice as wrong as the plain-PyTorch code it replaces. The floor (relative to the largest
  reference magnitude) covers outputs the low-precision reference happens to get exact.

A failure names the tensor and prints the worst elements with their indices.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch

FP32 = {"rtol": 1e-5, "atol": 1e-5}
# bf16 keeps 8 significant bits (eps 7.8e-3); a floor of a quarter of that, scaled by the largest
# reference magnitude, is below one bf16 ulp of the biggest element, so it cannot hide a real bug.
LOWP_FACTOR = 2.0
LOWP_FLOOR_REL = 2e-3

ON_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# CPU kernel tests need the interpreter; without it the functionals run the reference and the
# comparison would be the reference against itself.
needs_triton = pytest.mark.skipif(
    not (ON_CUDA or INTERPRET),
    reason="Triton kernels need CUDA or TRITON_INTERPRET=1 set before import (make test sets it)",
)


def kernel_device() -> torch.device:
    """The device the non-gpu-marked kernel tests use: CUDA when present, else the interpreter's CPU."""
    return torch.device("cuda") if ON_CUDA else torch.device("cpu")


def _worst(actual: torch.Tensor, expected: torch.Tensor, k: int = 5) -> str:
    diff = (actual.double() - expected.double()).abs()
    flat = diff.flatten()
    k = min(k, flat.numel())
    vals, idx = flat.topk(k)
    lines = []
    for v, i in zip(vals.tolist(), idx.tolist()):
        where = tuple(int(c) for c in torch.unravel_index(torch.tensor(i), diff.shape)) if diff.dim() else ()
        a = actual.double().flatten()[i].item()
        e = expected.double().flatten()[i].item()
        lines.append(f"    at {where}: got {a:.6g}, expected {e:.6g}, |diff| {v:.3g}")
    return "\n".join(lines)


def assert_close(
    name: str,
    actual: torch.Tensor,
    ref32: torch.Tensor,
    ref_lp: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Compare a kernel output or gradient with the reference under the table above.

    Args:
        name: what is compared (printed on failure), e.g. ``"dx"``.
        actual: the kernel's tensor (any dtype).
        ref32: the reference computed in fp32 from the same inputs.
        ref_lp: the reference computed in the kernel's low precision; required when ``actual`` is
            not fp32.
        dtype: the precision the inputs were run in, when it differs from ``actual.dtype`` (an fp32 loss
            from bf16 inputs is judged by the bf16 rule); default ``actual.dtype``.

    Raises:
        AssertionError: with the worst elements and their indices.
    """
    assert actual.shape == ref32.shape, f"{name}: shape {tuple(actual.shape)} != reference {tuple(ref32.shape)}"
    a = actual.detach().float().cpu()
    r = ref32.detach().float().cpu()
    assert torch.isfinite(a).all() == torch.isfinite(r).all(), f"{name}: non-finite values differ\n{_worst(a, r)}"
    run_dtype = dtype or actual.dtype
    if run_dtype == torch.float32:
        ok = (a - r).abs() <= FP32["atol"] + FP32["rtol"] * r.abs()
        if not bool(ok.all()):
            raise AssertionError(
                f"{name} (fp32): {int((~ok).sum())} of {ok.numel()} elements beyond rtol=atol=1e-5\n{_worst(a, r)}"
            )
        return
    assert ref_lp is not None, f"{name}: a {run_dtype} result needs the low-precision reference"
    lp = ref_lp.detach().float().cpu()
    err = (a - r).abs().max().item() if a.numel() else 0.0
    ref_err = (lp - r).abs().max().item() if a.numel() else 0.0
    floor = LOWP_FLOOR_REL * (r.abs().max().item() if r.numel() else 0.0) + 1e-6
    bound = LOWP_FACTOR * ref_err + floor
    if err > bound:
        raise AssertionError(
            f"{name} ({run_dtype}): max error {err:.4g} vs fp32 reference exceeds "
            f"2 x {ref_err:.4g} (reference in {run_dtype}) + floor {floor:.3g}\n{_worst(a, r)}"
        )


def _floating_outputs(out) -> list[torch.Tensor]:
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [o for o in outs if isinstance(o, torch.Tensor) and o.is_floating_point()]


def check_against_reference(
    kernel_fn: Callable,
    ref_fn: Callable,
    args: Sequence,
    dtype: torch.dtype,
    views: Sequence[Callable | None] | None = None,
    names: Sequence[str] | None = None,
    seed: int = 0,
    no_grad: Sequence[int] = (),
) -> None:
    """Run ``kernel_fn`` and ``ref_fn`` on the same inputs and compare outputs and every input gradient.

    Floating tensors in ``args`` are fp32 "bases": each run rounds them to its dtype, makes them
    leaves that require grad, clones them (so in-place kernels never touch a leaf) and applies the
    matching entry of ``views`` (e.g. a strided slice, to hand the kernel a non-contiguous input).
    Other arguments (labels, eps) pass through unchanged. Both backward passes get the same upstream
    gradients, cloned per run because some backwards work in place on them.

    Args:
        kernel_fn: the functional under test.
        ref_fn: the reference with the same signature.
        args: fp32 base tensors and plain values.
        dtype: the precision the kernel runs in (fp32 or bf16).
        views: per argument, a callable applied to the cloned leaf, or None.
        names: per argument, a name for failure messages.
        seed: seed for the upstream gradients.
        no_grad: indices of floating arguments that take no gradient (e.g. rope's cos/sin).

    Raises:
        AssertionError: from :func:`assert_close` on the first mismatch.
    """
    views = list(views) if views is not None else [None] * len(args)
    names = list(names) if names is not None else [f"arg{i}" for i in range(len(args))]
    diff = [isinstance(a, torch.Tensor) and a.is_floating_point() and i not in no_grad for i, a in enumerate(args)]
    lowp = [isinstance(a, torch.Tensor) and a.is_floating_point() for a in args]
    dys: list[torch.Tensor] = []

    def run(fn: Callable, run_dtype: torch.dtype, round_to: torch.dtype):
        leaves, call = [], []
        for a, d, f, v in zip(args, diff, lowp, views):
            if f and not d:
                t = a.detach().to(round_to).to(run_dtype)
                leaves.append(None)
                call.append(v(t) if v is not None else t)
            elif d:
                leaf = a.detach().to(round_to).to(run_dtype).requires_grad_(True)
                leaves.append(leaf)
                t = leaf.clone()
                call.append(v(t) if v is not None else t)
            else:
                leaves.append(None)
                call.append(v(a) if v is not None and isinstance(a, torch.Tensor) else a)
        outs = _floating_outputs(fn(*call))
        if not dys:
            gen = torch.Generator().manual_seed(seed)
            for o in outs:
                g = torch.ones(()) if o.dim() == 0 else torch.randn(o.shape, generator=gen)
                dys.append(g.to(round_to))
        torch.autograd.backward(outs, [g.to(device=o.device, dtype=o.dtype).clone() for o, g in zip(outs, dys)])
        return outs, [leaf.grad if leaf is not None else None for leaf in leaves]

    got, got_g = run(kernel_fn, dtype, dtype)
    ref32, ref32_g = run(ref_fn, torch.float32, dtype)
    ref_lp, ref_lp_g = (None, [None] * len(args)) if dtype == torch.float32 else run(ref_fn, dtype, dtype)
    for i, (g, r) in enumerate(zip(got, ref32)):
        assert_close(f"output {i}", g, r, None if ref_lp is None else ref_lp[i], dtype)
    for name, d, g, r, lp in zip(names, diff, got_g, ref32_g, ref_lp_g):
        if not d:
            continue
        assert g is not None, f"d{name}: the kernel produced no gradient"
        assert_close(f"d{name}", g, r, lp, dtype)


_SM90_SCRIPT = """
import importlib, json, os, subprocess, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
for i, (mod, name, sig, consts, warps) in enumerate(json.loads(sys.argv[1])):
    fn = getattr(importlib.import_module(mod), name)
    src = ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in consts}}, constexprs=consts)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    path = os.path.join(sys.argv[2], f"{name}_{i}.cubin")
    open(path, "wb").write(k.asm["cubin"])
    out = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, check=True).stdout
    print(name, [line.strip() for line in out.splitlines() if "REG:" in line][0])
"""

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def compile_for_sm90(specs: Sequence[tuple], tmp_path) -> list[str]:
    """Compile ``@triton.jit`` kernels to sm_90 (H100/H200) cubins on this CPU-only machine.

    Runs in one subprocess without ``TRITON_INTERPRET`` (under the interpreter the decorator yields an
    interpreted function that cannot be compiled), through the installed triton's own ptxas: it proves
    the kernels lower for the GPU machine's triton before any GPU time is spent, and reports registers
    and local-memory spills.

    Args:
        specs: ``(module, kernel name, {arg: triton type like "*bf16" / "i32" / "fp32"}, {constexpr: value},
            num_warps)`` per compilation.
        tmp_path: a folder for the cubins.

    Returns:
        One line per spec: the kernel name and cuobjdump's ``REG:.. STACK:.. SHARED:.. LOCAL:..``.

    Raises:
        AssertionError: with the compiler's error output when a compilation fails.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run(
        [sys.executable, "-c", _SM90_SCRIPT, json.dumps([list(s) for s in specs]), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert res.returncode == 0, f"compiling for sm_90 failed:\n{res.stderr[-3000:]}"
    return res.stdout.strip().splitlines()


def tiny_bf16_llama(folder) -> tuple[torch.nn.Module, torch.Tensor]:
    """A tiny Llama with LoRA (r 4) in bf16 on `kernel_device()`, its B adapters non-zero, and a batch of ids: for the
    tests that run the whole patched model through the fused kernels (the model tests run fp32 on the reference)."""
    from raytune_llm.models.load import load_model
    from raytune_llm.models.tiny import build_tiny_model

    path = build_tiny_model(Path(folder) / "llama", family="llama", vocab_size=256, seed=0)
    dev = kernel_device()
    model = load_model(path, lora=dict(r=4, alpha=8), dtype=torch.bfloat16, device=dev)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    return model, torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(0)).to(dev)


def patched_step(model, ids, mode: str = "offload", stash: bool = True, setup=None):
    """One training step of `tiny_bf16_llama`'s model patched afresh (``mode`` checkpointing, the attention stash,
    then ``setup(model)``): the loss and every trained parameter's gradient."""
    from raytune_llm.models.patch import patch, unpatch
    from raytune_llm.models.settings import set_stash_attention

    unpatch(model)
    patch(model, gradient_checkpointing=mode)
    if stash:
        set_stash_attention(model, True)
    if setup is not None:
        setup(model)
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
