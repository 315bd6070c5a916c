"""raytune_llm.models.families."""
