"""One training stack at one shape, in its own process: step time, tokens/s, peak memory, losses.

Stacks (the protocol of shared/ANCHORS.md; every one loads the same random-weight folder):

- ``std_qlora``: transformers + PEFT + bitsandbytes NF4 (double quant, bf16 compute), SDPA,
  ``gradient_checkpointing_enable(use_reentrant=False)``, no ``prepare_model_for_kbit_training``.
- ``liger``: the same after ``apply_liger_kernel_to_llama(rope, rms_norm, swiglu, fused_linear_cross_entropy)``.
- ``unsloth``: ``FastLanguageModel`` 4-bit with its own (offloaded) gradient checkpointing; Unsloth is
  imported before torch / transformers / peft, as it requires.
- ``ours``: ``raytune_llm.load_model(path, quantize="nf4", lora=..., gradient_checkpointing=on|offload)``;
  with ``--synthetic 70b`` the model is built by ``raytune_llm.models.synthetic.build_synthetic_model``
  (70B shapes, never written to disk).

LoRA r=16, alpha=16, dropout 0 on q, k, v, o, gate, up, down; torch AdamW lr 2e-4; seeded random
tokens with labels = inputs. A step is forward + backward + optimizer step + zero_grad, bracketed
by ``torch.cuda.synchronize`` (wall clock; CUDA events recorded beside it). Peak memory is
``max_memory_allocated`` over the timed steps (reset after warm-up).

``--packed``: every row is ``seq`` tokens of examples whose lengths are drawn in [100, 2000] (``--doc-min``,
``--doc-max``) from the seed (the last one cut to fit), position ids restart at 0 per example and each example's first label
is -100 (the shifted loss never predicts across a boundary). Which stack masks attention between
examples is recorded in ``document_mask``: transformers (std_qlora, liger) detects restarting
position ids itself when no attention mask is passed and builds a dense block-causal SDPA mask;
Unsloth gets its padding-free ``packed_seq_lengths``; ours derives document ids from position ids.

The result JSON is written whatever happens (status ``ok`` / ``oom`` / ``error`` / ``skipped``);
exit status 0 when ok, 3 on out-of-memory, 2 when skipped, 1 on any other failure.

Usage::

    python bench/e2e/run_stack.py --stack ours --model /tmp/rtl_bench/llama31_8b_random --batch 4 --seq 2048 --out r.json
    python bench/e2e/run_stack.py --tiny --stack std_qlora --model /tmp/tiny --out r.json   # CPU, seq 64, 2 steps
"""

from __future__ import annotations

import time

T_PROCESS = time.perf_counter()

import argparse  # noqa: E402
import copy  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    LLAMA31_8B,
    LLAMA31_70B,
    REPO_ROOT,
    STACKS,
    TARGET_MODULES,
    TINY_70B,
    environment,
    flops_per_token,
    log,
    offline_env,
    write_json,
)

SYNTHETIC = {"8b": LLAMA31_8B, "70b": LLAMA31_70B, "tiny70b": TINY_70B}
EXIT_OK, EXIT_ERROR, EXIT_SKIPPED, EXIT_OOM = 0, 1, 2, 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="one stack, one shape, one process")
    p.add_argument("--stack", required=True, choices=STACKS)
    p.add_argument("--model", type=Path, default=None, help="HF folder (make_model.py); not with --synthetic")
    p.add_argument("--synthetic", default=None, help="'8b' / '70b' / 'tiny70b' or a config JSON path: ours only")
    p.add_argument("--batch", type=int, default=None, help="rows per step (default 4, or 1 with --tiny)")
    p.add_argument("--seq", type=int, default=None, help="tokens per row (default 2048, or 64 with --tiny)")
    p.add_argument("--packed", action="store_true", help="rows packed with variable-length examples")
    p.add_argument("--doc-min", type=int, default=None, help="shortest packed example (default 100, 8 with --tiny)")
    p.add_argument("--doc-max", type=int, default=None, help="longest packed example (default 2000, 32 with --tiny)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10, or 2 with --tiny)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3, or 1 with --tiny)")
    p.add_argument(
        "--replay-warmup",
        action="store_true",
        help="run every step (warm-up and timed) once untimed first, then put the trainable weights and the "
        "optimizer state back in place and run them again, timed: no timed step meets a batch for the first time "
        "(packed rows: Unsloth's first batch of 11 documents ran ~3x its median step in every packed call)",
    )
    p.add_argument("--ckpt", default="on", choices=("on", "offload", "off"), help="gradient checkpointing mode")
    p.add_argument("--mem-cap-gib", type=float, default=None, help="set_per_process_memory_fraction to this many GiB")
    p.add_argument(
        "--layers", type=int, default=None, help="decoder layers of a --synthetic model (default: its config's)"
    )
    p.add_argument(
        "--checkpoint-layers",
        type=int,
        default=None,
        help="ours: checkpoint only this many decoder layers (models.settings.set_checkpoint_layers); default all",
    )
    p.add_argument(
        "--dequantize-once",
        action="store_true",
        help="ours: a checkpointed layer's backward reuses its recompute's dequantized weights "
        "(models.settings.set_dequantize_once)",
    )
    p.add_argument(
        "--mlp-chunk-tokens",
        default=None,
        help="ours: models.settings.set_mlp_chunk_tokens (an int, 0 = never split, or 'auto'); default the model's own",
    )
    p.add_argument(
        "--stash-attention",
        action="store_true",
        help="ours, with --ckpt offload: replay each layer's attention from host memory in the recompute "
        "(models.settings.set_stash_attention)",
    )
    p.add_argument(
        "--no-stash-o-proj",
        action="store_true",
        help="ours, with --stash-attention: the kept block ends at the attention output, not after the O projection "
        "(less host memory: set_stash_attention's o_proj=False)",
    )
    p.add_argument(
        "--cuda-graph",
        action="store_true",
        help="ours: each step (forward, backward, AdamW, zeroing) is recorded once as a CUDA graph at the last "
        "warm-up step and replayed (models.graphs.CapturedStep); the peak then covers the capture",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="one more step under torch.profiler (a replay with --cuda-graph, else eager): top kernels, where the "
        "compute stream idles and why (bench/e2e/timeline.py), every event in OUT's stem + .events.json.gz",
    )
    p.add_argument(
        "--variants",
        default=None,
        help="ours: time several recomputation settings on one loaded model, e.g. 'all,all+once,48+once+chunk0' "
        "(checkpointed layers: all or a count; +once: dequantize_once; +full: lean_recompute off; +stash: "
        "stash_attention with the O projection; +stashattn: without it; +graph: --cuda-graph; +on / +offload: "
        "the checkpointing mode; +chunkN: mlp_chunk_tokens; +keepN; +host; +sep: residual adds unfused; +lastdev); results under "
        "'variants'. The variants share the LoRA weights and AdamW state: time and peak are per variant, losses "
        "are not comparable across them. Not with --profile",
    )
    p.add_argument(
        "--keep-mlp-layers",
        type=int,
        default=None,
        help="ours: the last N checkpointed layers keep their MLP's gate/up outputs (models.settings.set_keep_mlp_layers)",
    )
    p.add_argument(
        "--keep-mlp-layers-on-host",
        type=int,
        default=None,
        help="ours, offload: N more checkpointed layers keep their MLP's gate/up outputs in host memory "
        "(models.settings.set_keep_mlp_layers_on_host)",
    )
    p.add_argument(
        "--offload-lag",
        type=int,
        default=None,
        help="ours, offload: layer i's forward waits for layer i - N's copies to the host "
        "(models.settings.set_offload_lag; default 2)",
    )
    p.add_argument(
        "--keep-mlp-gate-on-host",
        type=int,
        default=None,
        help="ours, offload: N more checkpointed layers keep their MLP's gate output alone in host memory "
        "(models.settings.set_keep_mlp_gate_on_host)",
    )
    p.add_argument(
        "--embeddings-on-host",
        action="store_true",
        help="ours: the frozen input embedding in pinned host memory (models.settings.set_embeddings_on_host)",
    )
    p.add_argument(
        "--last-layer-on-device",
        nargs="?",
        const=1,
        type=int,
        default=0,
        metavar="N",
        help="ours: the last layer's input and stash stay on the device (every layer checkpointed); N: the last N "
        "layers' (models.settings.set_last_layer_on_device)",
    )
    p.add_argument(
        "--head-on-host",
        action="store_true",
        help="ours: the frozen LM head in pinned host memory, streamed in by the loss (models.settings.set_head_on_host)",
    )
    p.add_argument(
        "--weights-on-host",
        action="store_true",
        help="ours: the decoder layers' base weights in pinned host memory, each layer's brought in as it runs "
        "(models.settings.set_weights_on_host)",
    )
    p.add_argument(
        "--memory-snapshot",
        action="store_true",
        help="after the timed steps, one more step with the CUDA allocator's history on: what is live at its peak, "
        "grouped by the allocating source line (under 'memory_at_peak'). Not with --cuda-graph",
    )
    p.add_argument(
        "--stand-for-layers",
        type=int,
        default=None,
        help="hold the resident memory of the layers the model lacks up to this many as one ballast tensor "
        "(see layer_ballast_bytes)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--tiny", action="store_true", help="CPU smoke lane: seq 64, 2 steps, wall clock only")
    p.add_argument("--out", type=Path, required=True, help="result JSON")
    args = p.parse_args(argv)
    if args.variants and args.profile:
        p.error("--profile profiles one setting; run it without --variants")
    if args.replay_warmup and (args.variants or args.profile):
        p.error("--replay-warmup times one setting from a fresh optimizer: not with --variants or --profile")
    if args.offload_lag is not None and args.offload_lag < 1:
        p.error(f"--offload-lag must be >= 1, got {args.offload_lag}")
    if args.memory_snapshot and (args.cuda_graph or args.variants):
        p.error("--memory-snapshot follows one eager step: not with --cuda-graph or --variants")
    if args.cuda_graph and args.stack != "ours":
        p.error("--cuda-graph records raytune_llm's step (models.graphs): --stack ours only")
    args.batch = args.batch or (1 if args.tiny else 4)
    args.seq = args.seq or (64 if args.tiny else 2048)
    args.steps = args.steps if args.steps is not None else (2 if args.tiny else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    args.doc_min = args.doc_min or (8 if args.tiny else 100)
    args.doc_max = args.doc_max or (32 if args.tiny else 2000)
    if (args.model is None) == (args.synthetic is None):
        p.error("give exactly one of --model and --synthetic")
    if args.synthetic and args.stack != "ours":
        p.error("--synthetic builds the model with raytune_llm.models.synthetic: --stack ours only")
    if args.layers is not None and not args.synthetic:
        p.error("--layers sets a --synthetic model's depth; a --model folder has its own (make_model.py --layers)")
    return args


def model_config(args: argparse.Namespace) -> dict:
    if args.synthetic:
        cfg = (
            copy.deepcopy(SYNTHETIC[args.synthetic])
            if args.synthetic in SYNTHETIC
            else json.loads(Path(args.synthetic).read_text())
        )
        if args.layers is not None:
            cfg["num_hidden_layers"] = args.layers
        return cfg
    return json.loads((args.model / "config.json").read_text())


def make_batches(args: argparse.Namespace, vocab: int, n: int, torch) -> list[dict]:
    """``n`` seeded batches (CPU tensors); packed rows also carry position ids and example lengths."""
    batches = []
    for step in range(n):
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g)
        batch = {"input_ids": ids, "labels": ids.clone()}
        if args.packed:
            pos_rows, lens_all = [], []
            for r in range(args.batch):
                lens, total = [], 0
                while total < args.seq:
                    n_tok = min(int(torch.randint(args.doc_min, args.doc_max + 1, (1,), generator=g)), args.seq - total)
                    lens.append(n_tok)
                    total += n_tok
                pos_rows.append(torch.cat([torch.arange(n_tok) for n_tok in lens]))
                starts = torch.tensor([0] + lens[:-1]).cumsum(0)
                batch["labels"][r, starts] = -100
                lens_all.extend(lens)
            batch["position_ids"] = torch.stack(pos_rows)
            batch["seq_lens"] = lens_all
        batches.append(batch)
    return batches


def attn_len(batches: list[dict], seq: int) -> float:
    """Token-weighted attended length for the MFU count: ``seq``, or ``sum(l^2)/sum(l)`` over packed examples."""
    if "seq_lens" not in batches[0]:
        return float(seq)
    lens = [n for b in batches for n in b["seq_lens"]]
    return sum(n * n for n in lens) / sum(lens)


def lora_dict() -> dict:
    return {"r": 16, "alpha": 16, "dropout": 0.0, "target_modules": list(TARGET_MODULES)}


def load_stack(args: argparse.Namespace, torch, device: str) -> tuple[object, dict]:
    """Build the trainable model of one stack. Returns (model, facts about how it was built)."""
    facts: dict = {}
    torch.manual_seed(args.seed)
    if args.stack == "ours":
        if args.synthetic:
            from raytune_llm.models.synthetic import build_synthetic_model

            model = build_synthetic_model(
                model_config(args),
                quantize="nf4",
                lora=lora_dict(),
                gradient_checkpointing=args.ckpt,
                dtype=torch.bfloat16,
                device=device,
                seed=args.seed,
            )
        else:
            from raytune_llm import load_model

            model = load_model(
                str(args.model),
                quantize="nf4",
                lora=lora_dict(),
                gradient_checkpointing=args.ckpt,
                dtype=torch.bfloat16,
                device=device,
            )
        facts["document_mask"] = "ours: document ids from position ids restarting at 0" if args.packed else None
        from raytune_llm.models import settings as model_settings

        # the counts the command line gives (otherwise the model's own), each through its setter
        for name in ("checkpoint_layers", "keep_mlp_layers", "keep_mlp_layers_on_host", "keep_mlp_gate_on_host",
                     "offload_lag"):  # fmt: skip
            if getattr(args, name) is not None:
                getattr(model_settings, f"set_{name}")(model, getattr(args, name))
                facts[name] = getattr(args, name)
        if args.dequantize_once:
            from raytune_llm.models.settings import set_dequantize_once

            set_dequantize_once(model, True)
            facts["dequantize_once"] = True
        if args.mlp_chunk_tokens is not None:
            from raytune_llm.models.settings import set_mlp_chunk_tokens

            chunk = "auto" if args.mlp_chunk_tokens == "auto" else int(args.mlp_chunk_tokens)
            set_mlp_chunk_tokens(model, chunk)
            facts["mlp_chunk_tokens"] = chunk
        if args.stash_attention:
            from raytune_llm.models.settings import set_stash_attention

            set_stash_attention(model, True, o_proj=not args.no_stash_o_proj)
            facts["stash_attention"] = True
            facts["stash_o_proj"] = not args.no_stash_o_proj
        if args.embeddings_on_host:
            from raytune_llm.models.settings import set_embeddings_on_host

            set_embeddings_on_host(model, True)
            facts["embeddings_on_host"] = model.raytune_patch_report.embeddings_on_host
        if args.last_layer_on_device:
            from raytune_llm.models.settings import set_last_layer_on_device

            set_last_layer_on_device(model, args.last_layer_on_device)
            facts["last_layer_on_device"] = args.last_layer_on_device
        if args.head_on_host:
            from raytune_llm.models.settings import set_head_on_host

            set_head_on_host(model, True)
            facts["head_on_host"] = model.raytune_patch_report.head_on_host
        if args.weights_on_host:
            from raytune_llm.models.settings import set_weights_on_host

            set_weights_on_host(model, True)
            facts["weights_on_host"] = True
        report = getattr(model, "raytune_patch_report", None)
        facts["lean_recompute"] = bool(report is not None and report.lean_recompute and args.ckpt != "off")
        return model, facts

    if args.stack == "unsloth":
        from unsloth import FastLanguageModel

        if args.ckpt != "on":
            raise NotImplementedError("unsloth runs with its own checkpointing only (--ckpt on)")
        model, _tok = FastLanguageModel.from_pretrained(
            model_name=str(args.model), max_seq_length=args.seq, dtype=torch.bfloat16, load_in_4bit=True
        )
        model = FastLanguageModel.get_peft_model(
            model,
            r=16,
            lora_alpha=16,
            lora_dropout=0,
            target_modules=list(TARGET_MODULES),
            bias="none",
            use_gradient_checkpointing="unsloth",
            random_state=args.seed,
        )
        # Train mode with the checkpointing mode get_peft_model recorded ("unsloth"), as its own trainer restores
        # it; for_training's default (True) would overwrite the per-module flags with a plain bool.
        FastLanguageModel.for_training(model, use_gradient_checkpointing="unsloth")
        facts["gradient_checkpointing"] = "unsloth (offloaded to host)"
        if args.packed:
            backend = "flash_attn varlen" if importlib.util.find_spec("flash_attn") else None
            backend = backend or ("xformers block-diagonal" if importlib.util.find_spec("xformers") else None)
            facts["document_mask"] = f"unsloth: packed_seq_lengths ({backend or 'SDPA, dense block-causal mask'})"
        return model, facts

    # std_qlora and liger: transformers + PEFT + bitsandbytes
    if args.ckpt == "offload":
        raise NotImplementedError("transformers + PEFT has no offloaded checkpointing; --ckpt on or off")
    if args.stack == "liger":
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(
            rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=True
        )
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        str(args.model),
        quantization_config=bnb,
        dtype=torch.bfloat16,
        attn_implementation="sdpa",
        device_map={"": 0 if device == "cuda" else "cpu"},
    )
    model.config.use_cache = False
    if args.ckpt == "on":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(args.seed)
    config = LoraConfig(
        r=16, lora_alpha=16, lora_dropout=0.0, target_modules=list(TARGET_MODULES), bias="none", task_type="CAUSAL_LM"
    )
    model = get_peft_model(model, config)
    model.train()
    if args.packed:
        facts["document_mask"] = "transformers: none"
    return model, facts


def _tensors(obj, depth: int = 0):
    """Tensors an object holds directly or through attribute objects (bitsandbytes' QuantState and its state2)."""
    import torch

    if isinstance(obj, torch.Tensor):
        yield obj
        return
    if depth > 3 or not hasattr(obj, "__dict__") or isinstance(obj, (torch.nn.Module, type)):
        return
    for v in vars(obj).values():
        if isinstance(v, (list, tuple)):
            for x in v:
                yield from _tensors(x, depth + 1)
        else:
            yield from _tensors(v, depth + 1)


def layer_ballast_bytes(model, torch) -> tuple[int, int, int]:
    """Resident bytes of one decoder layer in training, the part of it held at load, and the layer count.

    Counts every device storage the first decoder layer reaches (parameters, buffers, bitsandbytes' quant
    states, each rounded up to the caching allocator's 512-byte block), plus a gradient and two AdamW
    states for each of its trainable parameters (they are resident from the second step on; counting them
    in the first step's peak errs towards less memory for activations). The model's decoder layers are
    identical in shape, so ``(L - n) * this`` is what the ``L - n`` layers a reduced model lacks would hold.
    """
    lists = [m for n, m in model.named_modules() if n.endswith("layers") and isinstance(m, torch.nn.ModuleList)]
    if not lists:
        raise RuntimeError("no decoder-layer ModuleList found for --stand-for-layers")
    layers = max(lists, key=len)
    seen: dict[int, int] = {}
    for mod in layers[0].modules():
        tensors = list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False))
        tensors += [t for p in mod.parameters(recurse=False) for t in _tensors(getattr(p, "quant_state", None))]
        tensors += [t for v in vars(mod).values() if not isinstance(v, torch.nn.Module) for t in _tensors(v)]
        for t in tensors:
            if t.device.type == "meta" or t.numel() == 0:
                continue
            st = t.untyped_storage()
            seen[st.data_ptr()] = -(-st.nbytes() // 512) * 512
    trainable = sum(-(-p.numel() * p.element_size() // 512) * 512 for p in layers[0].parameters() if p.requires_grad)
    return sum(seen.values()) + 3 * trainable, sum(seen.values()), len(layers)


def forward_kwargs(args: argparse.Namespace, batch: dict, device: str, torch) -> dict:
    kw = {"input_ids": batch["input_ids"].to(device), "labels": batch["labels"].to(device)}
    if "position_ids" in batch:
        kw["position_ids"] = batch["position_ids"].to(device)
        if args.stack == "unsloth":
            kw["packed_seq_lengths"] = torch.tensor(batch["seq_lens"], dtype=torch.int32)
    if args.stack in ("std_qlora", "liger"):
        kw["use_cache"] = False
    return kw


def forward_loss(model, kw: dict, result: dict):
    """The model's loss on one batch; an Unsloth build without the padding-free kwarg runs unmasked (recorded)."""
    try:
        return model(**kw).loss
    except TypeError as exc:
        if "packed_seq_lengths" not in kw or "packed_seq_lengths" not in str(exc):
            raise
        kw.pop("packed_seq_lengths")
        result["document_mask"] = f"unsloth: none (packed_seq_lengths rejected: {str(exc)[:200]})"
        return model(**kw).loss


def _recorded_step(args, model, optimizer, keep: dict | None):
    """A ``models.graphs.CapturedStep`` of the step (eager warm-up steps, the capture at the last warm-up step);
    ``keep`` receives it as ``"captured"``."""
    from raytune_llm.models.graphs import CapturedStep

    if args.warmup < 2:
        raise SystemExit("--cuda-graph needs --warmup >= 2 (an eager step, then the capture)")
    captured = CapturedStep(model, optimizer, warmup=args.warmup - 1)
    if keep is not None:
        keep["captured"] = captured
    return captured


def _train_step(model, optimizer, captured, kw: dict, result: dict):
    """One step (forward, backward, AdamW, zero_grad), recorded or eager; its loss."""
    if captured is not None:
        return captured(**kw).loss
    loss = forward_loss(model, kw, result)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def _replay_pass(args, model, optimizer, batches, device: str, torch, result: dict, graph: bool, keep) -> dict:
    """``--replay-warmup``'s first pass: every step once, untimed (a recorded step captured at the usual step), then
    the trainable weights and AdamW's state put back in place (the same tensors, so a recorded step stays valid; zeroed
    state is what a fresh AdamW's first step starts from), so the timed pass repeats the same updates on the same
    batches. Returns the pass's step times and losses and the recorded step (None without one)."""
    if type(optimizer) not in (torch.optim.AdamW, torch.optim.Adam) or optimizer.state:
        raise RuntimeError(f"--replay-warmup: needs a fresh torch Adam/AdamW, got {type(optimizer).__name__}")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    # in host memory: a device copy would be live when a recorded step's peak is reset below, and count in it
    saved = [p.detach().to("cpu", copy=True) for p in params]
    cuda = device == "cuda"
    captured = _recorded_step(args, model, optimizer, keep) if graph else None
    step_ms, losses = [], []
    for step, batch in enumerate(batches):
        if step == args.warmup - 1 and captured is not None and cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        kw = forward_kwargs(args, batch, "cpu" if captured is not None else device, torch)
        t0 = time.perf_counter()
        loss = _train_step(model, optimizer, captured, kw, result)
        if cuda:
            torch.cuda.synchronize()
        step_ms.append(round((time.perf_counter() - t0) * 1e3, 3))
        losses.append(float(loss.detach().float().cpu()))
        log(f"run_stack {args.stack}: first pass, step {step} {step_ms[-1]:.0f} ms loss {losses[-1]:.4f}")
    with torch.no_grad():
        for p, v in zip(params, saved):
            p.copy_(v)
    for state in optimizer.state.values():
        for key, value in state.items():
            if torch.is_tensor(value):
                value.zero_()
            elif key == "step":
                state[key] = 0
    return {"step_ms": step_ms, "losses": losses, "captured": captured}


def time_steps(
    args, model, optimizer, batches, device: str, torch, result: dict, graph: bool = False, keep: dict | None = None
) -> dict:
    """Warm-up, then timed steps (forward, backward, AdamW, zero_grad) of one model: the timing fields.

    With ``graph`` the step is a ``models.graphs.CapturedStep``: eager warm-up steps, the capture at the last
    warm-up step, replays after it. A replay allocates nothing, so the peak is reset before the capture, not after
    the warm-up: it is then the recorded step's own peak. ``keep`` receives that step as ``"captured"``.
    """
    cuda = device == "cuda"
    replay = None
    if getattr(args, "replay_warmup", False):
        replay = _replay_pass(args, model, optimizer, batches, device, torch, result, graph, keep)
        graph = False  # the recorded step (when there is one) was captured in the first pass; it replays below
    times_ms, event_ms, losses = [], [], []
    captured = replay["captured"] if replay else (_recorded_step(args, model, optimizer, keep) if graph else None)
    reset_at = args.warmup - 1 if graph else args.warmup
    if replay and replay["captured"] is not None:
        reset_at = -1  # the peak was reset before the first pass's capture: it counts the recorded step's own
    eager_before = captured.eager_steps if captured is not None else 0  # the replay's first pass made its own
    for step, batch in enumerate(batches):
        if step == reset_at and cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        # A recorded step takes host tensors: it copies them in (and counts packed rows' documents there).
        kw = forward_kwargs(args, batch, "cpu" if captured is not None else device, torch)
        if cuda:
            torch.cuda.synchronize()
            ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            ev0.record()
        t0 = time.perf_counter()
        loss = _train_step(model, optimizer, captured, kw, result)
        if cuda:
            ev1.record()
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) * 1e3
        times_ms.append(round(dt, 3))
        if cuda:
            event_ms.append(round(ev0.elapsed_time(ev1), 3))
        losses.append(float(loss.detach().float().cpu()))
        result["step_ms_all"], result["losses"] = times_ms, losses
        log(
            f"run_stack {args.stack}: step {step} {'(warm-up) ' if step < args.warmup else ''}{dt:.0f} ms loss {losses[-1]:.4f}"
        )
    timed = times_ms[args.warmup :]
    tokens = args.batch * args.seq
    if replay:
        first = replay["losses"]
        result["replay_pass_ms"], result["replay_pass_losses"] = replay["step_ms"], first
        result["replay_loss_max_diff"] = round(max(abs(a - b) for a, b in zip(first, losses)), 6)
    return dict(
        status="ok",
        phase="done",
        step_ms_all=times_ms,
        losses=losses,
        warmup_ms=times_ms[: args.warmup],
        step_ms_median=round(statistics.median(timed), 3),
        step_ms_mean=round(statistics.fmean(timed), 3),
        step_ms_min=round(min(timed), 3),
        event_ms_median=round(statistics.median(event_ms[args.warmup :]), 3) if cuda else None,
        tokens_per_step=tokens,
        tokens_per_s=round(tokens * len(timed) / (sum(timed) / 1e3), 1),
        peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
        peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 3) if cuda else None,
        pinned_host_gib=pinned_host_gib(torch) if cuda else None,
        cuda_graph=captured.captured if captured is not None else False,
        # a recorded step's eager fallbacks in this pass (packed rows over its document capacity or longest document:
        # slower steps, their memory outside the graph's pool) and those bounds
        graph_eager_steps=captured.eager_steps - eager_before if captured is not None else None,
        graph_doc_bounds=[captured.doc_capacity, captured.doc_longest] if captured is not None else None,
    )


def pinned_host_gib(torch) -> float | None:
    """The pinned host memory torch's caching host allocator holds now (blocks in use and cached, each rounded up to
    a power of two), in GiB; None where this torch does not say."""
    stats = getattr(torch.cuda, "host_memory_stats", None)
    value = stats().get("allocated_bytes.current") if stats is not None else None
    return round(value / 2**30, 3) if value is not None else None


def release_pinned_cache(torch) -> None:
    """Give the cached pinned host blocks back (a variant's stash and copies, which the next variant's sizes may not
    reuse: left cached they count twice, and session 17's second 1x65536 variant then ran out of host memory)."""
    for name in ("_accelerator_emptyHostCache", "_host_emptyCache"):
        if hasattr(torch._C, name):
            getattr(torch._C, name)()
            return


def profile_step(args, model, optimizer, batch: dict, device: str, torch, top: int = 30, captured=None) -> dict:
    """One more step under torch.profiler: GPU time per kernel name (summed), largest first. With ``captured`` (a
    recorded step, `--cuda-graph`) a replay of it: the host takes no part, so the idle time left is the GPU's own."""
    from torch.profiler import ProfilerActivity, profile

    kw = forward_kwargs(args, batch, "cpu" if captured is not None else device, torch)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:  # CPU: the launch calls
        if captured is not None:
            captured(**kw)
        else:
            model(**kw).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        on_host = "CPU" in str(getattr(e, "device_type", ""))  # host ops carry their kernels' time too
        if us > 0 and e.key and not on_host and not e.key.startswith("ProfilerStep"):
            rows.append((e.key, us / 1e3, e.count))
    rows.sort(key=lambda r: -r[1])
    total = sum(r[1] for r in rows)
    log(f"run_stack profile: {total:.1f} ms of GPU time in kernels")
    for name, ms, n in rows[:top]:
        log(f"  {ms:9.2f} ms {100 * ms / total:5.1f}% x{n:<5d} {name[:110]}")
    out = {"gpu_ms_total": round(total, 2), "top": [[n[:200], round(ms, 3), c] for n, ms, c in rows[:top]]}
    try:  # by kind (bench/e2e/timeline.py); the table above stands without it
        from timeline import kernel_categories

        out["categories"] = cats = kernel_categories(rows)
        log("run_stack profile by kind: " + ", ".join(f"{k} {v['ms']:.1f} ms" for k, v in cats.items()))
    except Exception as exc:
        out["categories"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    try:  # where the compute stream idles, and why (bench/e2e/timeline.py)
        from timeline import dump_events, events_from_profile, stream_gaps

        events = os.path.splitext(args.out)[0] + ".events.json.gz"
        out["events_file"] = os.path.basename(events)
        out["events"] = dump_events(prof, events)

        out["timeline"] = tl = stream_gaps(events_from_profile(prof))
        log(
            f"run_stack timeline: compute stream busy {tl['busy_ms']} of {tl['span_ms']} ms, idle by cause "
            f"{tl['idle_by_cause_ms']}, {tl['n_gaps']} gaps; longest: {tl['gaps'][:3]}"
        )
    except Exception as exc:  # the kernel table above stands without it
        out["timeline"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    return out


def _site(frames: list[dict]) -> str:
    """The innermost frame of our code (raytune_llm or bench), else the innermost Python frame, as file:line fn."""
    for f in frames:
        name = f.get("filename", "")
        if "raytune_llm/" in name or "/bench/" in name:
            return f"{name.split('raytune_llm/')[-1] if 'raytune_llm/' in name else name.split('/bench/')[-1]}:{f.get('line')} {f.get('name')}"
    for f in frames:
        if f.get("filename", "").endswith(".py"):
            return f"{f['filename'].rsplit('/', 1)[-1]}:{f.get('line')} {f.get('name')}"
    return "?"


def memory_at_peak(args, model, optimizer, batch: dict, device: str, torch, top: int = 30) -> dict:
    """One more eager step with the allocator's history on: the blocks live at its peak, by allocating line.

    Blocks allocated before the step (weights, optimizer state) are not in the history; they are the ``before``
    figure. The step's own blocks are replayed from the trace up to its largest total.
    """
    kw = forward_kwargs(args, batch, device, torch)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=500_000, stacks="python")
    try:
        model(**kw).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        snap = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    trace = next((t for t in snap["device_traces"] if t), [])
    total = peak = 0
    peak_at = -1
    sizes: dict[int, int] = {}
    for i, e in enumerate(trace):
        if e["action"] == "alloc":
            sizes[e["addr"]] = e["size"]
            total += e["size"]
        elif e["action"] == "free_completed":
            total -= sizes.pop(e["addr"], e["size"])
        if total > peak:
            peak, peak_at = total, i
    live: dict[int, tuple[int, str]] = {}
    for e in trace[: peak_at + 1]:
        if e["action"] == "alloc":
            live[e["addr"]] = (e["size"], _site(e.get("frames", [])))
        elif e["action"] == "free_completed":
            live.pop(e["addr"], None)
    by_site: dict[str, list] = {}
    for size, site in live.values():
        entry = by_site.setdefault(site, [0, 0])
        entry[0] += size
        entry[1] += 1
    rows = sorted(by_site.items(), key=lambda kv: -kv[1][0])
    log(f"run_stack memory: {before / 2**30:.3f} GiB before the step, +{peak / 2**30:.3f} GiB at its peak")
    for site, (size, n) in rows[:top]:
        log(f"  {size / 2**20:9.1f} MiB x{n:<4d} {site[:120]}")
    return {
        "before_step_gib": round(before / 2**30, 3),
        "step_peak_extra_gib": round(peak / 2**30, 3),
        "trace_events": len(trace),
        "live_at_peak_mib": [[site[:200], round(size / 2**20, 1), n] for site, (size, n) in rows[:top]],
    }


# A variant's fixed flags and the settings each sets (keepN and chunkN carry a number: parse_variants).
_VARIANT_FLAGS = {
    "once": {"once": True},
    "full": {"lean": False},
    "stash": {"stash": True},
    "stashattn": {"stash": True, "stash_o": False},  # the stash without the O projection (sessions 7-9)
    "graph": {"graph": True},
    "on": {"mode": "on"},
    "offload": {"mode": "offload"},
    "chunkauto": {"chunk": "auto"},
    "host": {"host": True},
    "sep": {"fused_residuals": False},
    "lastdev": {"last_on_device": True},
    "headhost": {"head_host": True},
    "wh": {"weights_host": True},
}


def parse_variants(text: str) -> list[dict]:
    """``"all,all+once,48+once+chunk0"`` -> one dict per variant: name, layers (checkpoint_layers, None = all),
    once (dequantize_once), lean (lean_recompute; ``+full`` turns it off), stash (stash_attention; ``+stashattn``:
    without the O projection), graph
    (``+graph``: a CUDA-graph step), mode (``+on`` / ``+offload``; None = the model's own), chunk (``chunkN``:
    ``mlp_chunk_tokens``, ``chunk0`` never split, ``chunkauto`` the default; None = the model's own setting), keep
    (``+keepN``: keep_mlp_layers), keep_host (``+hostkeepN``: keep_mlp_layers_on_host), gate_host (``+hostgateN``:
    keep_mlp_gate_on_host), lag (``+lagN``: offload_lag; None: ``--offload-lag`` or 2), host (``+host``:
    embeddings_on_host), fused_residuals (``+sep``: off, the
    residual adds as separate kernels), last_on_device (``+lastdev``: last_layer_on_device; ``+lastdevN``: the last N
    layers), head_host
    (``+headhost``: head_on_host) and weights_host (``+wh``: weights_on_host).
    """
    out = []
    for name in text.split(","):
        layers, *flags = name.strip().split("+")
        v = {
            "name": name.strip(),
            "once": False,
            "lean": True,
            "stash": False,
            "stash_o": True,
            "mode": None,
            "chunk": None,
            "graph": False,
            "keep": 0,
            "keep_host": 0,
            "gate_host": 0,
            "lag": None,
            "host": False,
            "fused_residuals": True,
            "last_on_device": False,
            "head_host": False,
            "weights_host": False,
        }
        for flag in flags:
            if flag in _VARIANT_FLAGS:
                v.update(_VARIANT_FLAGS[flag])
            elif flag.startswith("keep") and flag[4:].isdigit():
                v["keep"] = int(flag[4:])
            elif flag.startswith("lastdev") and flag[7:].isdigit():
                v["last_on_device"] = int(flag[7:])
            elif flag.startswith("hostkeep") and flag[8:].isdigit():
                v["keep_host"] = int(flag[8:])
            elif flag.startswith("hostgate") and flag[8:].isdigit():
                v["gate_host"] = int(flag[8:])
            elif flag.startswith("lag") and flag[3:].isdigit() and int(flag[3:]) >= 1:
                v["lag"] = int(flag[3:])
            elif flag.startswith("chunk") and flag[5:].isdigit():
                v["chunk"] = int(flag[5:])
            else:
                raise SystemExit(
                    f"--variants: unknown flag {flag!r} in {name!r} "
                    f"({', '.join(_VARIANT_FLAGS)}, chunkN, keepN, hostkeepN, hostgateN, lagN, lastdevN)"
                )
        if not (layers == "all" or layers.isdigit()):
            raise SystemExit(f"--variants: {name!r} does not start with 'all' or a layer count")
        v["layers"] = None if layers == "all" else int(layers)
        out.append(v)
    return out


def check_pinned_host_memory(args, model, device: str) -> None:
    """Ours on CUDA: raise `HostMemoryError` (one line) when the model's offload settings would pin more host memory
    than this machine has (`sharding.host_memory`); session 16's +hostkeep16 at 1x65536 was killed instead."""
    if args.stack == "ours" and device == "cuda":
        from raytune_llm.sharding.host_memory import check_patched_host_memory

        report = getattr(model, "raytune_patch_report", None)
        check_patched_host_memory(report, model.config.to_dict(), args.batch * args.seq)


def run_variants(args, model, optimizer, batches, device: str, torch, result: dict) -> None:
    """Time each variant on the one loaded model into ``result["variants"]`` (kept after each one, so a crash
    leaves the finished variants); an out-of-memory variant is recorded and the next one runs."""
    import gc

    from raytune_llm.models import settings as P
    from raytune_llm.sharding.host_memory import HostMemoryError

    report = getattr(model, "raytune_patch_report", None)
    chunk_default = report.mlp_chunk_tokens if report is not None else "auto"
    out = {}
    for v in parse_variants(args.variants):
        name, runs = v["name"], sum(k.split("#")[0] == v["name"] for k in out)
        name += f"#{runs + 1}" if runs else ""  # a name given twice (a base timed first and last) keeps both
        P.set_checkpoint_layers(model, v["layers"])
        P.set_dequantize_once(model, v["once"])
        P.set_lean_recompute(model, v["lean"])
        P.set_stash_attention(model, v["stash"], o_proj=v["stash_o"])
        P.set_gradient_checkpointing(model, v["mode"] or args.ckpt)
        P.set_mlp_chunk_tokens(model, chunk_default if v["chunk"] is None else v["chunk"])
        P.set_keep_mlp_layers(model, v["keep"])
        P.set_keep_mlp_layers_on_host(model, v["keep_host"])
        P.set_keep_mlp_gate_on_host(model, v["gate_host"])
        P.set_offload_lag(model, v["lag"] or args.offload_lag or 2)
        P.set_embeddings_on_host(model, v["host"])
        P.set_fused_residuals(model, v["fused_residuals"])
        P.set_last_layer_on_device(model, v["last_on_device"])
        P.set_head_on_host(model, v["head_host"])
        P.set_weights_on_host(model, v["weights_host"])
        optimizer.zero_grad(set_to_none=True)
        try:
            check_pinned_host_memory(args, model, device)
            out[name] = time_steps(args, model, optimizer, batches, device, torch, {}, graph=v["graph"])
        except HostMemoryError as exc:  # refused up front: past it the kernel kills the process, results and all
            out[name] = {"status": "host_memory", "error": str(exc)}
        except torch.OutOfMemoryError as exc:
            out[name] = {"status": "oom", "error": str(exc).splitlines()[0][:300]}
        except RuntimeError as exc:  # a step that cannot be recorded: say why, time the next variant
            if not (v["graph"] and str(exc).startswith("CapturedStep")):
                raise
            out[name] = {"status": "error", "error": str(exc)[:600]}
        optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
            release_pinned_cache(torch)
        v = out[name]
        log(f"run_stack variant {name}: {v['status']} {v.get('tokens_per_s')} tok/s, peak {v.get('peak_gib')} GiB")
        result["variants"] = out
        write_json(args.out, result, copy_to_out=False)  # the finished variants, should a later one kill the process


def run(args: argparse.Namespace, result: dict) -> int:
    for key, value in offline_env().items():
        os.environ.setdefault(key, value)
    missing = {"liger": "liger_kernel", "unsloth": "unsloth"}.get(args.stack)
    if missing and importlib.util.find_spec(missing) is None:
        result.update(status="skipped", reason=f"{missing} is not importable in this process")
        log(f"run_stack {args.stack}: skipped ({result['reason']})")
        return EXIT_SKIPPED
    t_import = time.perf_counter()
    if args.stack == "unsloth":
        import unsloth  # noqa: F401  (must precede torch / transformers / peft: it patches them on import)
    import torch

    result["import_s"] = round(time.perf_counter() - t_import, 2)
    cuda = torch.cuda.is_available() and not args.tiny
    device = "cuda" if cuda else "cpu"
    result["environment"] = environment(torch)
    result["device"] = device
    if args.tiny and args.stack == "unsloth":
        result.update(status="skipped", reason="unsloth needs a GPU")
        return EXIT_SKIPPED
    if cuda and args.mem_cap_gib:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.mem_cap_gib * 2**30 / total))
        result["mem_cap_gib"] = args.mem_cap_gib

    cfg = model_config(args)
    n_steps = args.warmup + args.steps
    batches = make_batches(args, cfg["vocab_size"], n_steps, torch)
    result["attn_len"] = round(attn_len(batches, args.seq), 1)
    result["flops_per_token"] = flops_per_token(cfg, result["attn_len"])
    if args.packed:
        result["packed_docs_per_step"] = [len(b["seq_lens"]) for b in batches]
        result["packed_lens_step0"] = batches[0]["seq_lens"]

    result["phase"] = "load"
    t_load = time.perf_counter()
    model, facts = load_stack(args, torch, device)
    if cuda:
        torch.cuda.synchronize()
    result["load_s"] = round(time.perf_counter() - t_load, 2)
    result.update(facts)
    params = [p for p in model.parameters() if p.requires_grad]
    result["trainable_params"] = sum(p.numel() for p in params)
    result["trainable_dtypes"] = sorted({str(p.dtype).replace("torch.", "") for p in params})
    if cuda:
        result["allocated_after_load_gib"] = round(torch.cuda.memory_allocated() / 2**30, 3)
    log(f"run_stack {args.stack}: loaded in {result['load_s']} s, {result['trainable_params']:,} trainable params")
    if args.packed and args.stack in ("std_qlora", "liger"):
        from transformers.masking_utils import find_packed_sequence_indices

        detected = find_packed_sequence_indices(batches[0]["position_ids"]) is not None
        result["document_mask"] = (
            "transformers: packed sequence detected from position_ids (dense block-causal SDPA mask)"
            if detected
            else "transformers: none (attends across examples)"
        )
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    ballast = None
    if args.stand_for_layers:
        per_layer, at_load, n_layers = layer_ballast_bytes(model, torch)
        missing = max(0, args.stand_for_layers - n_layers)
        result.update(
            layers_run=n_layers,
            stands_for_layers=args.stand_for_layers,
            layer_resident_mib=round(per_layer / 2**20, 2),
            layer_at_load_mib=round(at_load / 2**20, 2),
            ballast_gib=round(missing * per_layer / 2**30, 3),
        )
        if cuda and missing:
            ballast = torch.empty(missing * per_layer, dtype=torch.uint8, device=device)
        log(
            f"run_stack {args.stack}: {n_layers} layers standing for {args.stand_for_layers}: ballast {result['ballast_gib']} GiB"
        )

    result["phase"] = "steps"
    if args.variants:
        run_variants(args, model, optimizer, batches, device, torch, result)  # fills result["variants"] as it goes
        result["ballast_held"] = ballast is not None
        result.update(status="ok", phase="done")
        return EXIT_OK
    kept: dict = {}
    check_pinned_host_memory(args, model, device)
    result.update(time_steps(args, model, optimizer, batches, device, torch, result, graph=args.cuda_graph, keep=kept))
    result["ballast_held"] = ballast is not None  # alive through every step above
    if args.memory_snapshot and cuda:
        try:
            result["memory_at_peak"] = memory_at_peak(args, model, optimizer, batches[-1], device, torch)
        except Exception as exc:  # the timing above stands without it
            result["memory_at_peak"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    if args.profile and cuda:
        try:
            captured = kept.get("captured")
            replay = captured if captured is not None and captured.captured else None
            result["profile"] = profile_step(args, model, optimizer, batches[-1], device, torch, captured=replay)
        except Exception as exc:  # the timing above stands without it
            result["profile"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shape = f"packed_{args.seq}" if args.packed else f"{args.batch}x{args.seq}"
    result: dict = {
        "stack": args.stack,
        "shape": shape,
        "batch": args.batch,
        "seq": args.seq,
        "packed": args.packed,
        "model": str(args.model) if args.model else None,
        "synthetic": args.synthetic,
        "ckpt": args.ckpt,
        "steps": args.steps,
        "warmup": args.warmup,
        "replay_warmup": args.replay_warmup,
        "seed": args.seed,
        "lr": args.lr,
        "doc_len_range": [args.doc_min, args.doc_max] if args.packed else None,
        "tiny": args.tiny,
        "lora": lora_dict(),
        "status": "error",
        "phase": "start",
        "repo_root": str(REPO_ROOT),
    }
    log(f"run_stack {args.stack} {shape}: start (ckpt {args.ckpt}, {args.warmup}+{args.steps} steps)")
    try:
        code = run(args, result)
    except Exception as exc:  # recorded, never lost: the driver reads the JSON
        oom = "out of memory" in str(exc).lower() or type(exc).__name__ == "OutOfMemoryError"
        result["status"] = "oom" if oom else "error"
        result["error"] = f"{type(exc).__name__}: {str(exc)[:2000]}"
        result["traceback"] = traceback.format_exc()[-6000:]
        code = EXIT_OOM if oom else EXIT_ERROR
        log(f"run_stack {args.stack} {shape}: {result['status']} in phase {result['phase']}: {result['error'][:300]}")
        if not oom:
            print(result["traceback"], flush=True)
    result["process_s"] = round(time.perf_counter() - T_PROCESS, 2)
    write_json(args.out, result, copy_to_out=False)
    if result["status"] == "ok" and "variants" not in result:
        peak = f"{result['peak_gib']:.2f} GiB" if result["peak_gib"] is not None else "n/a"
        log(
            f"run_stack {args.stack} {shape}: {result['tokens_per_s']:,.0f} tokens/s, "
            f"{result['step_ms_median']:.1f} ms/step, peak {peak}, process {result['process_s']} s"
        )
    return code


if __name__ == "__main__":
    sys.exit(main())
