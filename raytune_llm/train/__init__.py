"""raytune_llm.train."""
