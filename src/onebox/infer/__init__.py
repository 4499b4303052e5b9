"""Inference: sampling and the KV-cache decode engine."""
