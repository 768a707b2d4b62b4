"""evalkit: evaluate language models across processes and GPUs, with lm-eval's numbers."""

__version__ = "0.1.0"
