"""raytune_llm.sharding: data-parallel strategies and the memory planner.

- `zero.py`: DeepSpeed ZeRO-2/3 config dicts from plain arguments (no torch import).
- `planner.py`: per-GPU peak memory from an HF config and the strategy that fits (no torch import).
- `engine.py`: wraps a model for one Ray Train worker (DDP or a DeepSpeed engine): step, save/load under
  ZeRO, and gathering the LoRA weights from ZeRO-3 partitions for export.

Nothing is imported here so `raytune-llm plan` stays torch-free; import the submodules.
"""
