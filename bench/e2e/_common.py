"""Shared pieces of the end-to-end benchmarks: logging, the environment record, JSON output, shapes.

Nothing here imports torch at module level: ``run_stack.py`` must be able to import Unsloth before
torch, transformers or peft are touched, and the driver scripts (``bench_e2e.py``,
``max_context.py``) never initialise CUDA themselves, so every measured process owns the GPU alone.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
E2E_DIR = Path(__file__).resolve().parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"

# Where the GPU machine installs the packages (see bench/NOTES.md). The anchors (liger-kernel, unsloth,
# unsloth_zoo, trl, torchao) must be importable only in the processes that measure them.
DEFAULT_ANCHOR_SITE = "/tmp/site_anchors"
ANCHOR_STACKS = ("liger", "unsloth")
STACKS = ("ours", "unsloth", "std_qlora", "liger")
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Llama-3.1-8B and -70B shapes (config.json of the released checkpoints, weights random).
LLAMA31_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
LLAMA31_8B = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "rope_scaling": LLAMA31_ROPE_SCALING,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "initializer_range": 0.02,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "torch_dtype": "bfloat16",
}
LLAMA31_70B = {**LLAMA31_8B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80}
LLAMA31_70B["num_attention_heads"] = 64
# The --tiny lane: 2 layers, small widths (multiples of bitsandbytes' 64-element NF4 block).
TINY = {
    **LLAMA31_8B,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 512,
    "bos_token_id": 256,
    "eos_token_id": 257,
}
TINY_70B = {**TINY, "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 8, "head_dim": 16}


def log(msg: str) -> None:
    """Print one line with a UTC timestamp and flush (the device tool only keeps the output tail)."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%H:%M:%S")
    print(f"[{stamp}] {msg}", flush=True)


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def utc_day() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d")


def version(dist: str) -> str | None:
    """Installed version of a distribution, or None (read from metadata: nothing gets imported)."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> dict[str, Any]:
    """HEAD commit and whether the tree had local changes; None values where there is no git."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=REPO_ROOT, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
            cwd=REPO_ROOT,
            timeout=10,
        ).stdout.strip()
        return {"git_commit": head, "git_dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_dirty": None}


def environment(torch_module: Any | None = None) -> dict[str, Any]:
    """Where a number was taken: GPU, library versions, commit, date.

    Args:
        torch_module: the imported torch, when the caller has one (adds GPU name, memory, CUDA version);
            without it only package metadata is read, so no CUDA context is created.

    Returns:
        A flat dict of strings / numbers / None.
    """
    env: dict[str, Any] = {
        "date_utc": utc_now(),
        "python": sys.version.split()[0],
        "hostname": os.uname().nodename,
        "cpu_count": os.cpu_count(),
    }
    for dist in (
        "torch",
        "triton",
        "transformers",
        "peft",
        "accelerate",
        "bitsandbytes",
        "liger-kernel",
        "unsloth",
        "unsloth_zoo",
        "trl",
        "safetensors",
    ):
        env[dist.replace("-", "_")] = version(dist)
    env.update(git_commit())
    if torch_module is not None:
        cuda = torch_module.cuda.is_available()
        env["cuda"] = torch_module.version.cuda
        env["gpu"] = torch_module.cuda.get_device_name(0) if cuda else "cpu"
        env["gpu_total_gib"] = (
            round(torch_module.cuda.get_device_properties(0).total_memory / 2**30, 2) if cuda else None
        )
        env["gpu_capability"] = ".".join(map(str, torch_module.cuda.get_device_capability(0))) if cuda else None
    env["pytorch_cuda_alloc_conf"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
    return env


def gpu_slug(gpu_name: str) -> str:
    """``"NVIDIA H200"`` -> ``"h200"``; ``"cpu"`` stays ``"cpu"``."""
    name = gpu_name.lower().replace("nvidia", "").strip()
    return "-".join(name.split()) or "gpu"


def write_json(path: Path, doc: dict[str, Any], copy_to_out: bool = True) -> None:
    """Write ``doc`` atomically (a killed call never leaves half a file) and copy it into ``$OUT`` when set."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)
    out = os.environ.get("OUT")
    if copy_to_out and out and Path(out).resolve() != path.parent.resolve():
        Path(out).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(out) / path.name)


def child_env(stack: str, anchor_site: str = DEFAULT_ANCHOR_SITE) -> dict[str, str]:
    """Environment for a measured subprocess.

    The repository root comes first on PYTHONPATH (``import raytune_llm`` from the working tree); the
    anchor site is added only for the anchor stacks and removed for all others, so liger / unsloth
    never leak into the standard stack or ours; offline and no-telemetry switches are set for all.
    """
    env = dict(os.environ)
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p.rstrip("/") != anchor_site.rstrip("/")]
    head = [str(REPO_ROOT)] + ([anchor_site] if stack in ANCHOR_STACKS and Path(anchor_site).is_dir() else [])
    env["PYTHONPATH"] = os.pathsep.join(head + [p for p in parts if p != str(REPO_ROOT)])
    env.update(offline_env())
    return env


def offline_env() -> dict[str, str]:
    """No hub access, no telemetry (Unsloth's statistics ping downloads from the hub unless this is set)."""
    return {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "UNSLOTH_DISABLE_STATISTICS": "1",
        "DO_NOT_TRACK": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    }


def parse_shape(shape: str) -> tuple[int, int, bool]:
    """``"4x2048"`` -> (4, 2048, False); ``"packed_8192"`` -> (1, 8192, True)."""
    if shape.startswith("packed_"):
        return 1, int(shape.split("_", 1)[1]), True
    b, s = shape.lower().split("x")
    return int(b), int(s), False


def linear_params(cfg: dict[str, Any]) -> int:
    """N_linear of the MFU convention: every decoder linear (q, k, v, o, gate, up, down) plus the lm_head."""
    d, ff, n_layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    head_dim = cfg.get("head_dim") or d // cfg["num_attention_heads"]
    q = cfg["num_attention_heads"] * head_dim
    kv = cfg["num_key_value_heads"] * head_dim
    per_layer = d * q + 2 * d * kv + q * d + 3 * d * ff
    return n_layers * per_layer + cfg["vocab_size"] * d


def flops_per_token(cfg: dict[str, Any], attn_len: float) -> float:
    """``4 * N_linear + 6 * L * s * d`` (forward + input-gradient backward of a frozen base, causal attention).

    ``attn_len`` is the length one token attends over on average times two: the sequence length for
    unpacked rows, and for packed rows the token-weighted document length ``sum(l^2) / sum(l)``.
    """
    return 4 * linear_params(cfg) + 6 * cfg["num_hidden_layers"] * attn_len * cfg["hidden_size"]


def elapsed(t0: float) -> float:
    return round(time.perf_counter() - t0, 2)
