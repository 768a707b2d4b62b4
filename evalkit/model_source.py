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
    """A hub id is usable only if it is already in the local cache or the hub answers."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return snapshot_download(name, allow_patterns=["config.json"], local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):
        pass
    try:
        snapshot_download(name, allow_patterns=["config.json"], etag_timeout=5)
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise UsageError(
            f"--model {name}: not a local folder, and the Hugging Face Hub is unreachable or does not have it "
            f"({type(exc).__name__}); download it where the hub is reachable "
            f"(huggingface-cli download {name} --local-dir DIR) and pass --model DIR"
        ) from None
    return name
