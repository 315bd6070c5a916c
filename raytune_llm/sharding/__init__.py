"""raytune_llm.sharding."""
