"""How much memory each vLLM engine of a run may take, decided before any engine starts.

On CPU, vLLM (0.32) sizes its KV cache per worker process from the whole node: without
``VLLM_CPU_KVCACHE_SPACE`` (or ``kv_cache_memory_bytes``) each worker reserves
``gpu_memory_utilization`` (0.92) of the node's total memory minus its own RSS, so two ranks on
one node both reach for nearly all of it and the kernel's OOM killer ends one of them without a
word. ``VLLM_CPU_KVCACHE_SPACE=N`` is read by vLLM's CPU platform when the engine is configured
and becomes ``kv_cache_memory_bytes = N GiB`` for every worker; ``kv_cache_memory_bytes`` is the
same setting as an engine argument, so evalkit passes that and leaves a user's variable in charge.

Each worker process holds its own KV cache: under tensor parallelism a rank holds the KV heads of
its shard (``num_kv_heads // tp``, at least one), for every sequence of the engine. So the node's
memory is divided by the ranks on the node, whatever the layout.

On CUDA each engine takes ``gpu_memory_utilization`` of its own GPU: under a launcher vLLM puts a
rank on the GPU of its LOCAL_RANK and stops with an assertion when there is none, so ranks cannot
share a GPU; more ranks on a node than GPUs is refused in one line before any engine starts.

Everything here but ``read_node`` and ``memory_options`` is plain arithmetic on plain numbers.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from evalkit.errors import UsageError

if TYPE_CHECKING:
    from evalkit.parallel import Topology

GiB = 1 << 30
# vLLM's CPU platform defaults (platforms/cpu.py, engine/arg_utils.py get_batch_defaults): tokens per
# KV block, and sequences / tokens per scheduler step for the LLM class, both per TP rank.
CPU_BLOCK_SIZE = 128
CPU_SEQS_PER_TP_RANK = 256
CPU_TOKENS_PER_TP_RANK = 4096
# What vLLM's memory check leaves to the rest of the node; MemAvailable already excludes what runs now.
NODE_FRACTION = 0.9
# Per rank, beyond weights and KV: vLLM's and torch's buffers, the tokenizer, sampler state.
RUNTIME_BYTES = 1 * GiB
DTYPE_BYTES = {
    "float32": 4,
    "float": 4,
    "bfloat16": 2,
    "float16": 2,
    "half": 2,
    "float64": 8,
    "double": 8,
}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
FIX_HINT = "run fewer processes per node, lower --max-length, or set VLLM_CPU_KVCACHE_SPACE (GiB per process)"


@dataclass(frozen=True)
class KVShape:
    """The facts of a model config that set its KV cache size."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int

    def bytes_per_token(self, tp: int) -> int:
        """One token's keys and values on one rank: TP splits KV heads, replicating them past their count."""
        heads = max(self.kv_heads // tp, 1)
        return 2 * self.layers * heads * self.head_dim * self.dtype_bytes


def kv_shape(hf_config: Any, dtype: str) -> KVShape | None:
    """The model's KV shape, or None where it is not plain multi-head attention (MLA, no heads given)."""
    text = getattr(hf_config, "text_config", None) or hf_config
    layers = getattr(text, "num_hidden_layers", None)
    heads = getattr(text, "num_attention_heads", None)
    if not layers or not heads or getattr(text, "kv_lora_rank", None):
        return None
    head_dim = getattr(text, "head_dim", None) or getattr(text, "hidden_size", 0) // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    if not head_dim:
        return None
    return KVShape(layers=layers, kv_heads=kv_heads, head_dim=head_dim, dtype_bytes=DTYPE_BYTES.get(dtype, 4))


def blocks_for(tokens: int, block: int = CPU_BLOCK_SIZE) -> int:
    return math.ceil(tokens / block)


def minimum_kv_bytes(per_token: int, max_model_len: int, block: int = CPU_BLOCK_SIZE) -> int:
    """What vLLM accepts: one max_model_len sequence in whole blocks, plus the null block its pool
    holds back (v1/core/kv_cache_utils.py check_enough_kv_cache_memory)."""
    return (blocks_for(max_model_len, block) + 1) * block * per_token


def useful_kv_bytes(per_token: int, max_model_len: int, max_seqs: int, block: int = CPU_BLOCK_SIZE) -> int:
    """The most the scheduler can fill: every sequence it runs at once at max_model_len."""
    return (max_seqs * blocks_for(max_model_len, block) + 1) * block * per_token


def logits_bytes(tokens_per_step: int, vocab: int) -> int:
    """Prompt log-probs need float32 logits and their log-softmax for every token of a step."""
    return 2 * tokens_per_step * vocab * 4


def cpu_kv_cache_bytes(
    *,
    available: int,
    local_ranks: int,
    weights_per_rank: int,
    reserve_per_rank: int,
    minimum: int,
    useful: int,
) -> int:
    """One rank's KV cache: its share of the node after weights and working memory, at most what the
    run can use; a one-line refusal when not even one max_model_len sequence fits."""
    share = int(available * NODE_FRACTION) // max(local_ranks, 1)
    room = share - weights_per_rank - reserve_per_rank
    if room < minimum:
        raise UsageError(
            f"vLLM on CPU needs {size(minimum)} of KV cache per process (one --max-length sequence) plus "
            f"{size(weights_per_rank + reserve_per_rank)} for weights and working memory, but "
            f"{local_ranks} process(es) on this node leave {size(share)} each "
            f"({size(available)} available); {FIX_HINT}"
        )
    return min(room, useful)


def gpu_sharing_problem(*, local_ranks: int, gpus: int) -> str | None:
    """vLLM gives each rank under a launcher the GPU of its LOCAL_RANK (and asserts there is one), so
    ranks cannot share a GPU as replicas of the hf backend can."""
    if local_ranks <= gpus:
        return None
    return (
        f"--backend vllm runs one engine per GPU, but {local_ranks} processes on this node share {gpus} GPU(s); "
        f"start at most {gpus} process(es) per node (one per GPU), with --tp to split a model over them"
    )


def size(n: float) -> str:
    """Bytes for a one-line message: GiB, or MiB below a tenth of one (a tiny model's KV cache)."""
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / (1 << 20):.2f} MiB"


def weight_bytes(folder: Path) -> int:
    """The checkpoint's weight files (sizes through the hub cache's links)."""
    files = [p for p in folder.iterdir() if p.name.endswith(WEIGHT_SUFFIXES)] if folder.is_dir() else []
    safetensors = [p for p in files if p.name.endswith(".safetensors")]
    return sum(p.stat().st_size for p in (safetensors or files))


def run_weight_bytes(stored: int, checkpoint_dtype: str, run_dtype: str) -> int:
    """Weights as the engine holds them: a checkpoint stored in another dtype is converted."""
    have, want = DTYPE_BYTES.get(checkpoint_dtype), DTYPE_BYTES.get(run_dtype)
    return stored * want // have if have and want else stored


@dataclass(frozen=True)
class NodeFacts:
    user_kv_space: str | None  # VLLM_CPU_KVCACHE_SPACE as the user set it
    available: int  # bytes the node can still give (MemAvailable)
    gpus: int  # visible to this process (CUDA only)


def read_node(device: torch.device) -> NodeFacts:
    """The only reads of the environment, /proc and CUDA here."""
    return NodeFacts(
        user_kv_space=os.environ.get("VLLM_CPU_KVCACHE_SPACE") or None,  # vLLM ignores it when empty
        available=mem_available(Path("/proc/meminfo")),
        gpus=torch.cuda.device_count() if device.type == "cuda" else 0,
    )


def mem_available(meminfo: Path) -> int:
    """MemAvailable: free memory plus what the kernel can reclaim (page cache), as vLLM's psutil sees it."""
    for line in meminfo.read_text().splitlines() if meminfo.is_file() else []:
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class ModelFacts:
    shape: KVShape | None
    weights: int  # bytes, whole model, as the engine holds it
    vocab: int
    max_model_len: int
    tp: int


def model_facts(hf_config: Any, path: str, options: dict[str, Any], checkpoint_dtype: str) -> ModelFacts:
    dtype = options["dtype"] if options["dtype"] != "auto" else checkpoint_dtype
    text = getattr(hf_config, "text_config", None) or hf_config
    return ModelFacts(
        shape=kv_shape(hf_config, dtype),
        weights=run_weight_bytes(weight_bytes(Path(path)), checkpoint_dtype, dtype),
        vocab=getattr(text, "vocab_size", 0) or 0,
        max_model_len=options["max_model_len"],
        tp=options["tensor_parallel_size"],
    )


def plan(model: ModelFacts, node: NodeFacts, device_type: str, local_ranks: int) -> dict[str, Any]:
    """The engine arguments that bound this rank's memory ({} where vLLM's own choice is safe)."""
    per_token = model.shape.bytes_per_token(model.tp) if model.shape else 0
    minimum = minimum_kv_bytes(per_token, model.max_model_len)
    weights = model.weights // model.tp
    if device_type == "cpu":
        if node.user_kv_space is not None:
            return {}
        reserve = RUNTIME_BYTES + logits_bytes(CPU_TOKENS_PER_TP_RANK * model.tp, model.vocab)
        useful = useful_kv_bytes(per_token, model.max_model_len, CPU_SEQS_PER_TP_RANK * model.tp) if per_token else None
        kv = cpu_kv_cache_bytes(
            available=node.available,
            local_ranks=local_ranks,
            weights_per_rank=weights,
            reserve_per_rank=reserve,
            minimum=minimum,
            useful=useful if useful is not None else node.available,
        )
        return {"kv_cache_memory_bytes": kv}
    problem = gpu_sharing_problem(local_ranks=local_ranks, gpus=node.gpus) if device_type == "cuda" else None
    if problem:
        raise UsageError(problem)
    return {}


def memory_options(
    hf_config: Any, path: str, options: dict[str, Any], checkpoint_dtype: str, topo: Topology
) -> dict[str, Any]:
    """This rank's memory arguments for vllm.LLM. Every rank plans from the smallest MemAvailable any
    rank saw before any engine started (an engine built early would shrink a later rank's reading),
    so every rank gets the same KV cache (vLLM's external launcher takes the minimum over ranks
    anyway) and a refusal ends every rank with the same line."""
    node = read_node(topo.device)
    node = NodeFacts(node.user_kv_space, min(topo.all_gather(node.available)), node.gpus)
    model = model_facts(hf_config, path, options, checkpoint_dtype)
    return topo.agreed(lambda: plan(model, node, topo.device.type, topo.local_world_size))
