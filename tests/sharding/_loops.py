"""Ray Train worker loops for the sharding tests (importable by Ray workers, not collected by pytest).

Each loop builds a tiny real Llama + PEFT LoRA from a config, wraps it with raytune_llm.sharding.engine and
writes what it measured to `config["out"]` from rank 0.
"""

from __future__ import annotations

import os

import torch

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEQ, MICRO_BATCH, STEPS, SAVE_AT, LR = 16, 2, 10, 5, 1e-2


def tiny_lora_model(seed: int = 0, lora_seed: int | None = None):
    """A fp32 tiny Llama with LoRA r=4 on every linear; the same `seed` gives the same base on every rank."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**TINY))
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS))
    torch.manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero; random B makes A's gradient non-zero from step 1
            torch.nn.init.normal_(p, std=0.02)
    if lora_seed is not None:  # a different adapter init, to prove a resume really loads the checkpoint
        torch.manual_seed(lora_seed)
        for p in model.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.05)
    return model


def batch(step: int, rank: int) -> dict[str, torch.Tensor]:
    """Deterministic per-(step, rank) token batch, two batches in turn so the loss can fall; labels = inputs."""
    g = torch.Generator().manual_seed(1000 * (step % 2) + rank)
    ids = torch.randint(0, TINY["vocab_size"], (MICRO_BATCH, SEQ), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def _wrap(strategy: str, model, world: int):
    from raytune_llm.sharding.engine import wrap_model
    from raytune_llm.sharding.zero import build_zero_config

    ds_config = None
    if strategy != "ddp":
        ds_config = build_zero_config(
            int(strategy[-1]),
            micro_batch=MICRO_BATCH,
            grad_accum=1,
            dtype="fp32",
            grad_clip=1.0,
            lr=LR,
            world_size=world,
        )
        if strategy == "zero3":  # partition even the tiny LoRA factors so gathering is really exercised
            ds_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    return wrap_model(model, strategy, ds_config, lr=LR, grad_clip=1.0, dtype="fp32")


def strategies_run(config: dict, rank: int, world: int) -> dict:
    """Per strategy: 10 steps (checkpoint after step 5), then a fresh model resumed from step 5 to 10."""
    import torch.distributed as dist

    results = {}
    for strategy in config["strategies"]:
        ckpt = os.path.join(config["ckpt_root"], strategy)
        sharded = _wrap(strategy, tiny_lora_model(), world)
        losses = []
        for step in range(STEPS):
            losses.append(sharded.step(batch(step, rank)))
            if step + 1 == SAVE_AT:
                sharded.save(ckpt, tag=f"step{SAVE_AT}", client_state={"step": SAVE_AT})
        final = sharded.gather_trainable_state_dict()
        shapes_outside_gather = {n: tuple(p.shape) for n, p in sharded.module.named_parameters() if p.requires_grad}

        resumed = _wrap(strategy, tiny_lora_model(lora_seed=123), world)
        state = resumed.load(ckpt, tag=f"step{SAVE_AT}")
        resumed_losses = [resumed.step(batch(step, rank)) for step in range(state["step"], STEPS)]
        resumed_final = resumed.gather_trainable_state_dict()
        results[strategy] = {
            "losses": losses,
            "resumed_losses": resumed_losses,
            "final": final,
            "resumed_final": resumed_final,
            "shapes_outside_gather": shapes_outside_gather,
        }
        dist.barrier()
    return results


def save_tiny_base(folder: str) -> None:
    """Write the tiny Llama's random base weights as an HF folder (the QLoRA check loads and quantizes it)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**TINY)).save_pretrained(folder)


def qlora_zero3_run(config: dict, rank: int, world: int) -> dict:
    """Load the tiny base in NF4 with a float storage dtype, wrap it in ZeRO-3, and check the base survives.

    `config["dtype"]` is the engine dtype ("fp32" on CPU, "bf16" on GPUs); the 4-bit storage follows it.
    Returns how many 4-bit weights there are, how many are partitioned, how many came back from ZeRO-3's
    partitions bit-for-bit different (after wrapping and after training), the forward difference
    before/after wrapping, and a few training losses.
    """
    import deepspeed
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from raytune_llm.models.quantize import keep_nf4_layout
    from raytune_llm.sharding.engine import setup_device, wrap_model
    from raytune_llm.sharding.zero import build_zero_config, quant_storage_dtype_name

    dtype = config.get("dtype", "fp32")
    torch_dtype = getattr(torch, quant_storage_dtype_name(3, dtype))
    device = setup_device()
    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch_dtype,
        bnb_4bit_quant_storage=torch_dtype,
    )
    model = AutoModelForCausalLM.from_pretrained(
        config["base"], quantization_config=bnb, dtype=torch_dtype, device_map={"": device}
    )
    keep_nf4_layout(model)  # the no-grad probe below must not repack the weights (AVX512-BF16 CPUs)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS))
    four_bit = {n: p.detach().clone() for n, p in model.named_parameters() if type(p).__name__ == "Params4bit"}
    probe = batch(0, 0)["input_ids"].to(device)
    with torch.no_grad():
        before = model(input_ids=probe).logits.float()

    ds_config = build_zero_config(3, micro_batch=MICRO_BATCH, dtype=dtype, lr=LR, world_size=world)
    ds_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition every tensor
    sharded = wrap_model(model, "zero3", ds_config, dtype=dtype, device=device)
    params = dict(sharded.module.named_parameters())
    partitioned = sum(1 for n in four_bit if params[n].numel() == 0)

    def mismatches() -> int:
        bad = 0
        for name, original in four_bit.items():
            with deepspeed.zero.GatheredParameters([params[name]]):
                gathered = params[name].data
                same = gathered.shape == original.shape and torch.equal(
                    gathered.view(torch.uint8), original.view(torch.uint8)
                )
                bad += 0 if same else 1
        return bad

    bad_after_wrap = mismatches()
    with torch.no_grad():
        after = sharded.wrapped(input_ids=probe).logits.float()
    losses = [sharded.step(batch(step, rank)) for step in range(4)]
    return {
        "n_4bit": len(four_bit),
        "storage_dtypes": sorted({str(t.dtype) for t in four_bit.values()}),
        "partitioned": partitioned,
        "bad_after_wrap": bad_after_wrap,
        "bad_after_training": mismatches(),
        "forward_diff": (after - before).abs().max().item(),
        "losses": losses,
    }


def suite_loop(config: dict) -> None:
    """One Ray Train worker loop for the whole sharding suite (one fit: worker start-up is paid once).

    `config["parts"]` lists "strategies" and/or "qlora"; rank 0 saves {part: results} to `config["out"]`.
    """
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    results = {}
    if "strategies" in config["parts"]:
        results["strategies"] = strategies_run(config, rank, world)
    if "qlora" in config["parts"]:
        results["qlora"] = qlora_zero3_run(config, rank, world)
    if rank == 0:
        torch.save(results, config["out"])
