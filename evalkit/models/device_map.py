"""An explicit device map for one rank that splits its model over its own GPUs.

The map comes from the model config and per-GPU memory budgets alone: the model is built as a
skeleton on the meta device (no weights, no CUDA), so a layout that does not fit is refused before
a weight loads, and the map can be checked on any machine.

- The vision tower, the multi-modal projector and the language model's input embeddings go to the
  first of the rank's GPUs: image features are written into the text embeddings there, so keeping
  the three together moves no image feature between GPUs before the first decoder layer.
- Everything else (decoder layers, final norm, LM head) is laid out in order by accelerate's
  ``infer_auto_device_map``, each GPU first capped near an even share of the model so the layers,
  and the KV cache they hold at run time, spread over all the GPUs instead of filling the first.
- Only the given GPUs are used. A model that does not fit is refused with the shortfall.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import transformers
from accelerate import infer_auto_device_map, init_empty_weights
from accelerate.utils import compute_module_sizes, get_max_layer_size
from accelerate.utils.modeling import clean_device_map

from evalkit.errors import UsageError
from evalkit.models.dtypes import DTYPE_NAMES, torch_dtype

# The last name part of the modules (or parameters) that hold a VLM's vision tower and projector.
VISION_PARTS = frozenset({"vision_tower", "visual", "vision_model", "multi_modal_projector", "image_newline"})


def split_device_map(
    model_path: str,
    auto_class: type,
    gpus: list[int],
    memory: dict[int, int],
    dtype: torch.dtype | str,
    *,
    trust_remote_code: bool = False,
) -> dict[str, int | str]:
    """A device map (module or parameter name -> GPU) for ``from_pretrained(device_map=...)``.

    ``gpus`` are this rank's GPUs, the first one taking the vision tower, projector and input
    embeddings; ``memory`` gives each of them a budget in bytes for weights (leave room for the
    KV cache and activations when choosing it); ``dtype`` is the load dtype ("auto" reads the
    config). ``auto_class`` is the transformers auto class the model loads with.
    """
    if not gpus or len(set(gpus)) != len(gpus):
        raise UsageError(f"a split over GPUs needs distinct GPUs, got {gpus}")
    missing = [gpu for gpu in gpus if gpu not in memory]
    if missing:
        raise UsageError(f"no memory budget for GPU(s) {missing}; budgets were given for {sorted(memory)}")
    config = transformers.AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    dtype = _resolve_dtype(dtype, config)
    with init_empty_weights():
        skeleton = auto_class.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    skeleton.tie_weights()  # not done on the meta device; a tied LM head must be found and counted once
    sizes = compute_module_sizes(skeleton, dtype=dtype)
    pinned = pinned_names(skeleton)
    pinned_size = sum(sizes[name] for name in pinned)
    first = gpus[0]
    if pinned_size > memory[first]:
        raise UsageError(
            f"the vision tower, projector and input embeddings need {_size(pinned_size)} on GPU {first} but its "
            f"budget is {_size(memory[first])}; give the first GPU more memory or use --tp"
        )
    _remove(skeleton, pinned)
    rest, left_over = _lay_out_rest(skeleton, sizes, dtype, [memory[gpu] for gpu in gpus], pinned_size)
    if left_over:
        raise UsageError(
            f"the model does not fit on GPUs {gpus}: {_size(sizes[''])} of weights in {str(dtype).split('.')[-1]} "
            f"against {_size(sum(memory[g] for g in gpus))} of budgets, {_size(left_over)} left over; "
            "use a larger --gpus-per-rank or --tp"
        )
    device_map: dict[str, int | str] = dict.fromkeys(pinned, first)
    device_map.update((name, gpus[device]) for name, device in _disjoint(skeleton, rest, pinned).items())
    return clean_device_map(device_map)


def _lay_out_rest(
    skeleton: torch.nn.Module, sizes: dict[str, int], dtype: torch.dtype, memory: list[int], pinned_size: int
) -> tuple[dict[str, int | str], int]:
    """(layout of the unpinned rest over GPUs numbered 0..n-1, bytes that fit nowhere).

    Every GPU is capped at an even share of the whole model plus one layer, then at larger caps
    until everything fits or the caps reach the budgets. Numbering the GPUs 0..n-1 in the rank's
    order matters: accelerate fills devices in increasing number. It also keeps room for one more
    layer on the first device (for offloading, which never happens here); that room is left as
    headroom for encoding the images there.
    """
    no_split = sorted(skeleton._no_split_modules or [])
    largest_layer, _ = get_max_layer_size(list(skeleton.named_children()), sizes, no_split)
    share = -(-sizes[""] // len(memory)) + largest_layer
    caps = [share + k * largest_layer for k in (0, 1, 2, 4, 8, 16, 32) if share + k * largest_layer < max(memory)]
    for cap in [*caps, max(memory)]:
        budgets = {i: min(budget, cap) for i, budget in enumerate(memory)}
        budgets[0] = max(0, budgets[0] - pinned_size)
        with _quiet_accelerate():
            layout = infer_auto_device_map(
                skeleton, max_memory=budgets, no_split_module_classes=no_split, dtype=dtype, clean_result=False
            )
        left_over = sum(sizes[name] for name, device in layout.items() if not isinstance(device, int))
        if not left_over:
            break
    return layout, left_over


def pinned_names(model: torch.nn.Module) -> list[str]:
    """Names of the vision tower, projector and input embeddings (and an LM head tied to the
    embeddings, which must share their device), outermost modules only."""
    embeddings = model.get_input_embeddings()
    output = model.get_output_embeddings()
    tied = output is not None and output.weight is embeddings.weight
    names: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(f"{outer}.") for outer in names):
            continue
        if name.rsplit(".", 1)[-1] in VISION_PARTS or module is embeddings or (tied and module is output):
            names.append(name)
    for name, _ in model.named_parameters():
        if name.rsplit(".", 1)[-1] in VISION_PARTS and not any(name.startswith(f"{outer}.") for outer in names):
            names.append(name)
    return names


def _remove(model: torch.nn.Module, names: list[str]) -> None:
    """Take the pinned parts out of the skeleton, so the layout of the rest never counts them."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if child in parent._modules:
            del parent._modules[child]
        else:
            del parent._parameters[child]


def _disjoint(model: torch.nn.Module, layout: dict[str, int | str], pinned: list[str]) -> dict[str, int | str]:
    """The layout with each module that contains a pinned part replaced by its remaining children,
    so that no name in the final map is a prefix of another name given another device."""
    result: dict[str, int | str] = {}
    pending = list(layout.items())
    while pending:
        name, device = pending.pop(0)
        if not any(p.startswith(f"{name}.") for p in pinned):
            result[name] = device
            continue
        module = model.get_submodule(name)
        children = [
            *(n for n, _ in module.named_children()),
            *(n for n, _ in module.named_parameters(recurse=False)),
            *(n for n, _ in module.named_buffers(recurse=False)),
        ]
        pending[:0] = [(f"{name}.{child}", device) for child in children]
    return result


def _resolve_dtype(dtype: torch.dtype | str, config: transformers.PretrainedConfig) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        saved = getattr(config, "dtype", None)
        saved = getattr(torch, saved) if isinstance(saved, str) else saved
        return saved if isinstance(saved, torch.dtype) else torch.float32
    if dtype not in DTYPE_NAMES:
        raise UsageError(f"dtype {dtype!r} is not one of {', '.join(DTYPE_NAMES)}")
    return torch_dtype(dtype)


@contextmanager
def _quiet_accelerate() -> Iterator[None]:
    """accelerate warns that budgeted GPUs are absent on this machine and that the removed
    embeddings are no longer tied; both are expected when laying out a skeleton from budgets."""
    logger = logging.getLogger("accelerate.utils.modeling")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"
