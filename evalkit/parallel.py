"""The parallel layout: one validated value, and the process group built from it once.

The layout comes only from our flags (``--tp``) and the launcher's RANK / LOCAL_RANK /
WORLD_SIZE. Ranks of one tensor-parallel group are consecutive, so a TP group shares a node.
Data is sharded by dp rank; tp rank 0 of each group carries results; global rank 0 scores.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from evalkit.errors import UsageError


@dataclass(frozen=True, kw_only=True)
class ParallelDims:
    world_size: int
    tp: int

    def __post_init__(self) -> None:
        problems = []
        if self.world_size < 1:
            problems.append(f"world_size({self.world_size}) must be at least 1")
        if self.tp < 1:
            problems.append(f"tp({self.tp}) must be at least 1")
        elif self.world_size >= 1 and self.world_size % self.tp:
            problems.append(
                f"tp({self.tp}) does not divide world_size({self.world_size}); "
                f"pick --tp from {_divisors(self.world_size)} or change the process count"
            )
        if problems:
            raise UsageError("bad parallel layout: " + "; ".join(problems))

    @property
    def dp(self) -> int:
        return self.world_size // self.tp


@dataclass(frozen=True, kw_only=True)
class Topology:
    """Where this process sits in the layout."""

    dims: ParallelDims
    rank: int
    local_rank: int
    device: torch.device
    backend: str
    # Process groups by axis name ("dp", "tp"), built once from a 2-D device mesh.
    groups: dict[str, Any] = field(default_factory=dict)

    def group(self, axis: str) -> Any:
        return self.groups[axis]

    @property
    def dp_rank(self) -> int:
        return self.rank // self.dims.tp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.dims.tp

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def carries_results(self) -> bool:
        return self.tp_rank == 0

    @property
    def distributed(self) -> bool:
        return self.dims.world_size > 1

    def describe(self) -> dict:
        return {
            "world_size": self.dims.world_size,
            "dp": self.dims.dp,
            "tp": self.dims.tp,
            "backend": self.backend,
            "device": self.device.type,
        }


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise UsageError(f"environment variable {name}={raw!r} is not an integer") from None


def read_launcher_env() -> tuple[int, int, int]:
    """World size, global rank and local rank from the launcher's environment."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    if world_size < 1 or not 0 <= rank < world_size:
        raise UsageError(f"RANK={rank} is outside WORLD_SIZE={world_size}; check the launcher")
    return world_size, rank, local_rank


def pick_device(requested: str | None, local_rank: int, world_size: int, gpus_per_rank: int) -> torch.device:
    """The device for this rank: CUDA devices are indexed by LOCAL_RANK, never global rank.

    With --gpus-per-rank K a rank owns GPUs [local_rank*K, (local_rank+1)*K) and works on the first.
    """
    name = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name} was asked for but no CUDA device is visible; use --device cpu")
        if name != "cuda" and world_size > 1:
            raise UsageError(
                f"--device {name} would put every rank on one GPU; use --device cuda "
                f"(each rank takes the GPU of its local rank)"
            )
        if name == "cuda":
            return torch.device("cuda", (local_rank * gpus_per_rank) % torch.cuda.device_count())
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise UsageError(f"--device {name!r} is not supported; use cpu, cuda or cuda:N")
    return torch.device(name)


def build_groups(dims: ParallelDims, rank: int, timeout_s: float) -> dict[str, Any]:
    """The (dp, tp) grid's groups by axis name; TP groups are consecutive ranks, so they share a node.

    Every rank creates every group in the same order (a collective requirement), keeps its own,
    and all of them carry the run's --timeout.
    """
    if dims.world_size == 1:
        return {}
    grid = [[d * dims.tp + t for t in range(dims.tp)] for d in range(dims.dp)]
    slices = {"tp": grid, "dp": [list(column) for column in zip(*grid, strict=True)]}
    mine = {}
    for axis, groups in slices.items():
        for ranks in groups:
            group = dist.new_group(ranks, timeout=timedelta(seconds=timeout_s))
            if rank in ranks:
                mine[axis] = group
    return mine


def init_topology(tp: int, device: str | None, timeout_s: float, gpus_per_rank: int = 1) -> Topology:
    """Build the process group once, prove it works, then agree on the layout on every rank.

    The group comes first so that a bad layout is reported by every rank together.
    """
    from evalkit.collectives import agreed

    world_size, rank, local_rank = read_launcher_env()
    dev = pick_device(device, local_rank, world_size, gpus_per_rank)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
            device_id=dev if dev.type == "cuda" else None,
        )
        check = torch.ones(1, device=dev)
        dist.all_reduce(check)
        if int(check.item()) != world_size:
            raise RuntimeError(f"startup all_reduce saw {int(check.item())} ranks, expected {world_size}")
    dims = agreed(world_size, lambda: ParallelDims(world_size=world_size, tp=tp))
    groups = build_groups(dims, rank, timeout_s)
    return Topology(dims=dims, rank=rank, local_rank=local_rank, device=dev, backend=backend, groups=groups)


def settle_before_exit() -> None:
    """After an error every rank agreed on: let every rank print it before any rank exits."""
    if dist.is_initialized():
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=timedelta(seconds=30))
        else:
            dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
