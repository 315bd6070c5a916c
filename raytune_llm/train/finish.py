"""What the driver writes into a run folder once training ends: the exact-match evaluation, the loss-curve PNG
and the TensorBoard events (all from the metrics and checkpoints the workers reported)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any


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
