"""Checking ``--model`` before anything loads: a local folder, or a clear word about the hub."""

from __future__ import annotations

from pathlib import Path

from evalkit.errors import UsageError


def check_model_source(model: str) -> str:
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(
                f"--model {model}: the folder has no config.json; point --model at a transformers checkpoint folder"
            )
        return str(path)
    if path.exists():
        raise UsageError(f"--model {model} is a file; point --model at the checkpoint's folder")
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise UsageError(f"--model {model}: no such folder")
    return _from_hub_cache(model)


def _from_hub_cache(name: str) -> str:
    """A hub id is usable only when a complete copy is already in the local cache."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = snapshot_download(name, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):
        folder = None
    if folder is None or not (Path(folder) / "config.json").is_file():
        raise UsageError(
            f"--model {name}: not a local folder and not in the Hugging Face cache, and evalkit does not "
            f"download models; download it where the Hugging Face Hub is reachable "
            f"(huggingface-cli download {name} --local-dir DIR) and pass --model DIR"
        )
    return folder
