"""Megrez-3B-Omni: media preprocessing, the vLLM model plugin (config, processor, model) and request preparation."""
