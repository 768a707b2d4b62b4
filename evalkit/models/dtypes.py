"""The dtype names a run accepts (``--dtype``) and the torch dtype each loads weights in."""

from __future__ import annotations

from typing import Any

DTYPE_NAMES = ("auto", "float32", "float16", "bfloat16")


def torch_dtype(name: str) -> Any:
    """The torch dtype called ``name``; "auto" stays "auto" (the checkpoint's own dtype)."""
    import torch

    return name if name == "auto" else getattr(torch, name)
