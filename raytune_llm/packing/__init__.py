"""raytune_llm.packing."""
