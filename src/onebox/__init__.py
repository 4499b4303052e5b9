"""onebox: train, benchmark and serve LLaMA-style language models on one machine."""

__version__ = "0.1.0"
