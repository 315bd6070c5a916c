"""Tests of raytune_llm.sharding: ZeRO configs, DeepSpeed engines under Ray, the memory planner."""
