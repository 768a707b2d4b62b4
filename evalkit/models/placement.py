"""Where a model's weights live on this rank.

- replica: the whole model on this rank's device (data parallel).
- deepspeed: DeepSpeed-Inference AutoTP shards across this rank's TP group (the default for tp > 1).
- transformers: transformers' own tensor parallelism (``tp_plan="auto"``) over the same groups,
  for model families AutoTP cannot shard.
- gpus-per-rank K: one rank splits its model over its own K GPUs with ``device_map``; GPUs of
  other ranks are never given to it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

from evalkit.errors import UsageError
from evalkit.models.device_map import split_device_map
from evalkit.models.dtypes import torch_dtype
from evalkit.parallel import Placement, Topology


def _from_pretrained(path: str, dtype: str, trust_remote_code: bool, auto_class: type, **kwargs) -> torch.nn.Module:
    # safetensors whenever present, so a pickled .bin next to it is never unpickled.
    safetensors = any(Path(path).glob("*.safetensors")) if Path(path).is_dir() else False
    if hasattr(transformers.PreTrainedModel, "set_use_kernels"):
        # No hub kernels (transformers 5 swaps them in by default): they are fetched from the hub
        # while loading, so an offline GPU machine fails there, and they apply only to a model
        # loaded onto GPUs, so a split rank would compute otherwise than a replica moved there.
        kwargs.setdefault("use_kernels", False)
    return auto_class.from_pretrained(
        path,
        dtype=torch_dtype(dtype),
        use_safetensors=safetensors or None,
        trust_remote_code=trust_remote_code,
        **kwargs,
    )


def rank_gpus(local_rank: int, gpus_per_rank: int, visible: int) -> list[int]:
    """The GPUs that belong to one rank: [local_rank*K, (local_rank+1)*K) of this node."""
    first = local_rank * gpus_per_rank
    if first + gpus_per_rank > visible:
        raise UsageError(
            f"--gpus-per-rank {gpus_per_rank}: local rank {local_rank} needs GPUs {first}..{first + gpus_per_rank - 1} "
            f"but this node has {visible}; start at most {visible // gpus_per_rank} processes per node"
        )
    return list(range(first, first + gpus_per_rank))


def load_model(
    path: str, dtype: str, topo: Topology, *, trust_remote_code: bool, auto_class: type | None = None
) -> torch.nn.Module:
    """Load the model where the layout's placement puts it. ``auto_class`` is the transformers
    auto class of the backend (causal LM by default, image-text-to-text for VLMs)."""
    auto_class = auto_class or transformers.AutoModelForCausalLM
    load = functools.partial(_from_pretrained, path, dtype, trust_remote_code, auto_class)
    placement = topo.layout.placement
    if placement is Placement.DEEPSPEED_TP:
        return _deepspeed_autotp(load, topo)
    if placement is Placement.TRANSFORMERS_TP:
        return _transformers_tp(load, topo)
    if placement is Placement.SPLIT:
        return _split_over_own_gpus(load, path, dtype, topo, auto_class, trust_remote_code)
    # device_map is never passed here: under a launcher transformers could choose a layout itself.
    return load().to(topo.device)


def _deepspeed_autotp(load: Callable[..., torch.nn.Module], topo: Topology) -> torch.nn.Module:
    import deepspeed
    import deepspeed.comm
    from deepspeed.inference.engine import InferenceEngine

    model = load()
    deepspeed.init_distributed(dist_backend=topo.backend)
    _use_torch_all_reduce_on_cpu(topo)
    # DeepSpeed builds its TP group from ranks 0..tp-1 unless one is set here; with dp > 1 the
    # other replicas would then fail, so hand it this rank's own TP group.
    InferenceEngine.inference_mp_group = topo.tp_group
    engine = deepspeed.init_inference(
        model,
        tensor_parallel={"tp_size": topo.layout.tp},
        dtype=model.dtype,
        replace_with_kernel_inject=False,
        **_injection_policy(model),
    )
    _use_torch_all_reduce_on_cpu(topo)
    return engine.module


# Vision-language families whose whole model AutoTP's automatic policy shards correctly (a CLIP
# vision tower and a Llama-style decoder): measured equal to the unsharded model's generations.
AUTOTP_WHOLE_VLM = frozenset({"llava", "llava_next"})


def _injection_policy(model: torch.nn.Module) -> dict:
    """For other vision-language models, AutoTP shards only the language decoder's layers.

    Its automatic policy splits Qwen2-VL's fused qkv vision attention and InternVL's vision output
    projection the wrong way (shape errors at the first forward); naming the decoder layer and its
    row-parallel projections keeps the vision tower whole on every rank, which is correct.
    """
    config = model.config
    if getattr(config, "vision_config", None) is None or config.model_type in AUTOTP_WHOLE_VLM:
        return {}
    layer = model.get_decoder().layers[0]
    return {"injection_policy": {type(layer): ("self_attn.o_proj", "mlp.down_proj")}}


def _use_torch_all_reduce_on_cpu(topo: Topology) -> None:
    """DeepSpeed's shared-memory CPU all-reduce crashes (SIGSEGV) here; the torch one is correct."""
    if topo.device.type == "cpu":
        import deepspeed.comm.comm as ds_comm

        if ds_comm.cdb is not None:
            ds_comm.cdb.shm_vector_kernel_level = 0


def _transformers_tp(load: Callable[..., torch.nn.Module], topo: Topology) -> torch.nn.Module:
    layout = topo.layout
    config = transformers.DistributedConfig(tp_plan="auto", tp_size=layout.tp, dp_replicate_size=layout.dp)
    return load(distributed_config=config)


def _split_over_own_gpus(
    load: Callable[..., torch.nn.Module],
    path: str,
    dtype: str,
    topo: Topology,
    auto_class: type,
    trust_remote_code: bool,
) -> torch.nn.Module:
    """An explicit device map over this rank's GPUs only, computed before any weight loads, with the
    vision tower, projector and embeddings on the rank's first GPU (``models.device_map``).

    ``device_map="auto"`` is not passed to transformers: under a launcher it may pick tensor
    parallelism by itself, and it would consider every visible GPU.
    """
    if topo.device.type != "cuda":
        raise UsageError("--gpus-per-rank needs CUDA devices; use --tp for tensor parallelism on CPU")
    mine = rank_gpus(topo.local_rank, topo.layout.gpus_per_rank, torch.cuda.device_count())
    # Weights get what is left after the KV cache and activations' share (SPLIT_WEIGHT_SHARE).
    budget = {gpu: int(torch.cuda.get_device_properties(gpu).total_memory * SPLIT_WEIGHT_SHARE) for gpu in mine}
    device_map = split_device_map(path, auto_class, mine, budget, dtype, trust_remote_code=trust_remote_code)
    return load(device_map=device_map)


# The part of each GPU a split model's weights may take; the rest holds the KV cache, activations
# and the CUDA context.
SPLIT_WEIGHT_SHARE = 0.85


def input_device(model: torch.nn.Module, topo: Topology) -> torch.device:
    """Where input ids go: the embedding's device (the first GPU of a split model)."""
    return model.get_input_embeddings().weight.device if topo.device.type == "cuda" else topo.device


def local_parameter_count(model: torch.nn.Module) -> int:
    """Parameters this rank holds (a TP shard counts only its own slice)."""
    total = 0
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel()
    return total
