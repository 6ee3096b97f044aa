"""Runs the model: input preparation, the KV cache, sampling."""
