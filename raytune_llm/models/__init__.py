"""raytune_llm.models: the only layer that touches transformers' classes.

- load.py: `load_model` (local HF folder -> NF4 via bitsandbytes -> PEFT LoRA -> fused kernels).
- stream_load.py: NF4 loading one safetensors shard at a time, each Linear quantized as it arrives (low host memory).
- patch.py: `patch` / `unpatch`, per-instance forward swaps with a report of what stayed stock and why (report.py).
- settings.py: the patched model's run-time settings (checkpointed layers, recompute, stash, MLP split).
- attention.py: causal attention for packed rows (document ids from restarting position_ids).
- checkpointing.py: per-layer activation checkpointing, optionally offloading the kept input to host (copied back
  ahead of use); the recompute skips what backward never reads (kernels.lora.lean_recompute).
- attention_stash.py: under offloaded checkpointing, attention kept in host memory and replayed in the recompute.
- lora.py, quantize.py: PEFT attachment / LoRAWeight reading, bitsandbytes NF4 config and per-Linear quantization;
  lora_spec.py: LoRA hyper-parameters and the target-name check (no torch: the CLI's validate uses it).
- families/: what differs between Llama, Mistral, Qwen2 and Qwen3.
- tiny.py, synthetic.py: random-weight models (tiny on disk for tests; any size built on the device for benchmarks).

Submodules import torch and transformers; import them explicitly (`raytune_llm.load_model` is lazy).
"""
