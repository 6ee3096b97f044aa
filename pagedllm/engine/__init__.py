"""Requests, the scheduler and the KV block manager: plain Python, no tensors."""
