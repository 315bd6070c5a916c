"""raytune_llm.export."""
