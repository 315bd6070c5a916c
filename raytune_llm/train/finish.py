"""What the driver writes into a run folder once training ends: the exact-match evaluation, the loss-curve PNG,
the TensorBoard events (all from the metrics and checkpoints the workers reported) and the exports; and what a
finished run run again does (export what it lacks)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from raytune_llm.config import RunConfig
from raytune_llm.config_save import save_config
from raytune_llm.train.errors import UserError


def _generate_fn(model, tok, max_new_tokens: int = 3, batch: int = 100):
    """Greedy generation in left-padded batches (one `generate` call per batch, not per prompt)."""
    import torch

    def generate(prompts: list[str]) -> list[str]:
        outs: list[str] = []
        model.eval()
        tok.padding_side = "left"
        with torch.no_grad():
            for i in range(0, len(prompts), batch):
                enc = tok(prompts[i : i + batch], add_special_tokens=False, return_tensors="pt", padding=True)
                o = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tok.pad_token_id,
                    eos_token_id=tok.eos_token_id,
                )
                outs += tok.batch_decode(o[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        return outs

    return generate


def evaluate(
    model_path: Path,
    tokenizer_path: Path,
    records: list[dict],
    adapter: Path | None,
    bits: int,
    double_quant: bool = True,
) -> float:
    """Exact-match accuracy of greedy generations on `records` (CPU, fp32), base or base + adapter."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raytune_llm.train.task import exact_match

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if bits == 4:
        from raytune_llm.models.quantize import bnb_config

        kwargs["quantization_config"] = bnb_config(torch.float32, double_quant=double_quant)
    model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    if bits == 4:  # the exact NF4 weights, not bitsandbytes' approximate CPU repacking (models.quantize)
        from raytune_llm.models.quantize import keep_nf4_layout

        keep_nf4_layout(model)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return exact_match(_generate_fn(model, tok), records)


def plot_loss(metrics: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    ax.plot([m["step"] for m in metrics], [m["loss"] for m in metrics], lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("raytune_llm loss curve")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_tensorboard(metrics: list[dict], folder: Path) -> None:
    from tensorboardX import SummaryWriter

    shutil.rmtree(folder, ignore_errors=True)
    with SummaryWriter(str(folder)) as w:
        for m in metrics:
            for k in ("loss", "lr", "grad_norm", "tokens_per_s", "gpu_peak_gib"):
                if k in m:
                    w.add_scalar(f"train/{k}", m[k], m["step"])


def export_formats(cfg: RunConfig, run_dir: Path, summary: dict, formats) -> None:
    """Export the run folder's adapter in each format, recording each in summary["exports"] and summary.json.

    Raises:
        UserError: an export failed (recorded as "failed: ..." first).
    """
    from raytune_llm.export import ExportError, export

    exports = summary.setdefault("exports", {})
    for fmt in formats:
        try:
            exports[fmt] = str(export(run_dir, fmt, dtype=cfg.export.dtype, gguf_type=cfg.export.gguf_type, force=True))
        except ExportError as exc:
            exports[fmt] = f"failed: {exc}"
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
            raise UserError(f"training finished ({run_dir / 'adapter'}); the {fmt} export failed: {exc}") from None


def finished_again(cfg: RunConfig, summary: dict, step: int, log, t0: float) -> dict:
    """A finished run run again (`resume.finished_run`): train and evaluate nothing, export what is missing (all of
    export.formats when export.dtype or export.gguf_type changed), record the settings, return the summary."""
    from omegaconf import OmegaConf

    run_dir = cfg.run_dir.resolve()
    saved = run_dir / "config.yaml"
    before = (OmegaConf.to_container(OmegaConf.load(saved)).get("export") if saved.is_file() else None) or {}
    summary["run_dir"] = str(run_dir)  # a folder moved or copied since
    if any(before.get(k) != getattr(cfg.export, k) for k in ("dtype", "gguf_type")):
        summary["exports"] = {}  # made under other settings: forgotten before the new ones are recorded
    exports = summary.setdefault("exports", {})
    done = {
        f
        for f, v in exports.items()
        if not v.startswith("failed") and Path(v).exists() and Path(v).resolve().is_relative_to(run_dir)
    }
    todo = [f for f in cfg.export.formats if f not in done]
    log(
        f"[raytune-llm] run {cfg.name!r} already trained to step {step} in {run_dir}: nothing to train"
        + (f"; exporting {', '.join(todo)}" if todo else ", its exports are in place")
        + " (another name= or train.max_steps trains more)"
    )
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    save_config(cfg, saved)
    export_formats(cfg, run_dir, summary, todo)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return {**summary, "wall_s": round(time.time() - t0, 1)}
