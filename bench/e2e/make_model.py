"""Write a Llama-3.1-8B-shaped checkpoint with random bf16 weights, fast, for the end-to-end benchmarks.

Every stack loads the same folder, so their losses are comparable step by step. The folder is what
``LlamaForCausalLM(config).save_pretrained`` would write (same tensor names, same HF initialisation:
linear and embedding weights ~ N(0, 0.02), RMSNorm weights 1), but it is produced layer by layer:
each layer is drawn directly on the GPU in bf16, copied to the host and written as its own
safetensors shard by a writer thread while the next layer is drawn. The whole model never exists
in memory at once, so the 16 GB of an 8B model are bounded by the disk's write speed (~10-40 s)
instead of the ~3 minutes ``from_config`` + ``save_pretrained`` take on the CPU.

A tokenizer is written too (Unsloth's ``from_pretrained`` loads one from the model folder): a
word-level tokenizer over ``t0 .. t{n}`` plus Llama-3.1's 256 special tokens at the top of the
vocabulary (begin_of_text = 128000, end_of_text = 128001, finetune_right_pad_id = 128004 as pad), so
``len(tokenizer) == vocab_size`` and nothing resizes the embeddings.

Usage::

    python bench/e2e/make_model.py --out /tmp/llama8b_random          # 8B shapes, GPU, ~1 min
    python bench/e2e/make_model.py --out /tmp/llama8b_2l --layers 2    # fewer layers
    python bench/e2e/make_model.py --tiny --out /tmp/tiny_llama        # CPU lane, 2 layers, small widths
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import LLAMA31_8B, TINY, log  # noqa: E402

MARKER = "raytune_bench_model.json"
INIT_STD = 0.02  # LlamaConfig.initializer_range, what _init_weights draws linear and embedding weights with


def layer_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Tensor name (within ``model.layers.{i}.``) -> shape, as LlamaDecoderLayer holds them."""
    d, ff = cfg["hidden_size"], cfg["intermediate_size"]
    hd = cfg.get("head_dim") or d // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    return {
        "input_layernorm.weight": (d,),
        "self_attn.q_proj.weight": (q, d),
        "self_attn.k_proj.weight": (kv, d),
        "self_attn.v_proj.weight": (kv, d),
        "self_attn.o_proj.weight": (d, q),
        "post_attention_layernorm.weight": (d,),
        "mlp.gate_proj.weight": (ff, d),
        "mlp.up_proj.weight": (ff, d),
        "mlp.down_proj.weight": (d, ff),
    }


def write_config(cfg: dict, out: Path) -> None:
    """config.json through transformers' own LlamaConfig, so every loader reads it as a checkpoint's."""
    import torch
    from transformers import LlamaConfig

    # A deep copy: LlamaConfig folds rope_theta into the rope_scaling dict it is given, in place.
    fields = {k: copy.deepcopy(v) for k, v in cfg.items() if k not in ("model_type", "architectures", "torch_dtype")}
    config = LlamaConfig(**fields)
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = torch.bfloat16
    config.save_pretrained(out)


def write_tokenizer(cfg: dict, out: Path) -> None:
    """A word-level tokenizer of exactly ``vocab_size`` entries with Llama-3.1's special-token layout."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab_size, n_special = cfg["vocab_size"], 256
    n_plain = vocab_size - n_special
    specials = [f"<|reserved_special_token_{i}|>" for i in range(n_special)]
    specials[0], specials[1], specials[4] = "<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>"
    vocab = {f"t{i}": i for i in range(n_plain)}
    vocab.update({tok: n_plain + i for i, tok in enumerate(specials)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=specials[0],
        eos_token=specials[1],
        pad_token=specials[4],
        model_max_length=cfg["max_position_embeddings"],
    )
    fast.padding_side = "right"
    fast.save_pretrained(out)
    assert len(fast) == vocab_size, f"tokenizer has {len(fast)} entries, config says {vocab_size}"


def make_model(out: Path, cfg: dict, seed: int = 0, device: str | None = None) -> dict:
    """Write config, tokenizer and random bf16 weights (one shard per decoder layer) to ``out``.

    Args:
        out: the folder (created).
        cfg: the Llama config fields (see ``_common.LLAMA31_8B``).
        seed: generator seed; the same seed and shapes give the same bytes on the same device type.
        device: where the weights are drawn; default CUDA when present.

    Returns:
        The marker dict written beside the weights (shapes, seed, sizes, seconds).
    """
    import torch
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("model*.safetensors*"):
        old.unlink()
    write_config(cfg, out)
    write_tokenizer(cfg, out)

    gen = torch.Generator(device=dev).manual_seed(seed)
    n_layers, d, vocab = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]
    n_shards = n_layers + 2  # embed_tokens | each layer | norm + lm_head
    weight_map: dict[str, str] = {}
    total_bytes = 0

    def draw(shape: tuple[int, ...], name: str) -> torch.Tensor:
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=torch.bfloat16)
        w = torch.empty(shape, dtype=torch.bfloat16, device=dev).normal_(0.0, INIT_STD, generator=gen)
        return w.cpu()

    def shard_name(i: int) -> str:
        return f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"

    groups: list[dict[str, tuple[int, ...]]] = [{"model.embed_tokens.weight": (vocab, d)}]
    for i in range(n_layers):
        groups.append({f"model.layers.{i}.{k}": v for k, v in layer_shapes(cfg).items()})
    groups.append({"model.norm.weight": (d,), "lm_head.weight": (vocab, d)})

    # Two writer threads: the disk, not the GPU, is the bound; a third would only queue host memory.
    with ThreadPoolExecutor(max_workers=2) as pool:
        pending = []
        for i, group in enumerate(groups):
            tensors = {name: draw(shape, name).contiguous() for name, shape in group.items()}
            fname = shard_name(i)
            for name, t in tensors.items():
                weight_map[name] = fname
                total_bytes += t.numel() * t.element_size()
            pending.append(pool.submit(save_file, tensors, str(out / fname), {"format": "pt"}))
            if len(pending) > 4:  # bound host memory: at most ~5 shards in flight
                pending.pop(0).result()
        for fut in pending:
            fut.result()

    index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    marker = {
        "config": cfg,
        "seed": seed,
        "device": str(dev),
        "total_gb": round(total_bytes / 1e9, 3),
        "shards": n_shards,
        "seconds": round(time.perf_counter() - t0, 1),
        "init": f"linear and embedding ~ N(0, {INIT_STD}) in bf16, norms 1 (transformers' _init_weights)",
    }
    (out / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return marker


def is_complete(out: Path, cfg: dict) -> bool:
    """True when ``out`` already holds a finished model of exactly these shapes (the marker is written last)."""
    marker = out / MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text())["config"] == json.loads(json.dumps(cfg))
    except (ValueError, KeyError):
        return False


def config_for(tiny: bool = False, layers: int | None = None) -> dict:
    cfg = copy.deepcopy(TINY if tiny else LLAMA31_8B)
    if layers is not None:
        cfg["num_hidden_layers"] = layers
    return cfg


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("/tmp/rtl_bench/llama31_8b_random"), help="output folder")
    p.add_argument("--layers", type=int, default=None, help="number of decoder layers (default: 32, or 2 with --tiny)")
    p.add_argument("--tiny", action="store_true", help="CPU lane: 2 layers, hidden 64, vocab 512")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="where to draw the weights (default: cuda when present)")
    p.add_argument("--force", action="store_true", help="rewrite even when a complete model of these shapes exists")
    args = p.parse_args(argv)
    cfg = config_for(args.tiny, args.layers)
    if not args.force and is_complete(args.out, cfg):
        log(f"make_model: {args.out} already holds this model; nothing to do (--force rewrites)")
        return 0
    log(f"make_model: writing {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']} to {args.out}")
    marker = make_model(args.out, cfg, seed=args.seed, device=args.device)
    log(
        f"make_model: {marker['total_gb']} GB in {marker['shards']} shards, {marker['seconds']} s on {marker['device']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
