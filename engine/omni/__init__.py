"""Megrez-3B-Omni support: media preprocessing (this slice); the vLLM model plugin comes next."""
