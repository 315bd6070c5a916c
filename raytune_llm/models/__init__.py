"""raytune_llm.models."""
