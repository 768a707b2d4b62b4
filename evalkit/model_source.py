"""Checking ``--model`` before anything loads: a local folder, or a clear word about the hub; and
that what loading will read is whole: ``config.json`` is a JSON object, and every safetensors file
holds all the bytes its header promises (a copy cut short fails here, not after the run started).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from evalkit.errors import UsageError


def check_model_source(model: str) -> str:
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(
                f"--model {model}: the folder has no config.json; point --model at a transformers checkpoint folder"
            )
        check_checkpoint_files(path, model)
        return str(path)
    if path.exists():
        raise UsageError(f"--model {model} is a file; point --model at the checkpoint's folder")
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise UsageError(f"--model {model}: no such folder")
    return _from_hub_cache(model)


def check_checkpoint_files(folder: Path, model: str) -> None:
    """``config.json`` parses to an object; each ``*.safetensors`` file is as long as its header says."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(
            f"--model {model}: config.json is not valid JSON ({exc}); restore it from the checkpoint"
        ) from None
    if not isinstance(config, dict):
        raise UsageError(f"--model {model}: config.json holds a {type(config).__name__}, not a JSON object")
    for weights in sorted(folder.glob("*.safetensors")):
        problem = safetensors_problem(weights)
        if problem:
            raise UsageError(f"--model {model}: {weights.name} {problem}; copy the checkpoint again")


def safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file cannot load (cut short, or no header), from its header alone; None when whole."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"is {size} bytes, too short for a safetensors header"
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            return f"is cut short: its header alone needs {length + 8} bytes, the file has {size}"
        try:
            header = json.loads(f.read(length))
        except (ValueError, UnicodeDecodeError):
            return "has an unreadable header"
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    needed = 8 + length + max(ends, default=0)
    if size < needed:
        return f"is cut short: {size} of {needed} bytes"
    return None


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
