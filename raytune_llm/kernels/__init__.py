"""raytune_llm.kernels."""
