"""The committed test model is exactly what ``python -m evalkit.testing.tinymodel`` builds (what `make demo` runs)."""

from __future__ import annotations

import hashlib
import json

from evalkit.testing.tinymodel import DEFAULT_TASKS_DIR, build_tiny_llama, corpus_from_tasks

from conftest import TINY_MODEL


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def model_config(path) -> dict:
    """config.json without the version of transformers that wrote it (a new release changes only that)."""
    config = json.loads(path.read_text())
    config.pop("transformers_version", None)
    return config


def test_builder_reproduces_the_fixture(tmp_path):
    built = build_tiny_llama(tmp_path / "tiny", corpus_from_tasks(DEFAULT_TASKS_DIR))
    for name in ("model.safetensors", "tokenizer.json"):
        assert digest(built / name) == digest(TINY_MODEL / name), name
    assert model_config(built / "config.json") == model_config(TINY_MODEL / "config.json")
