"""The parallel layout: one validated value, the process group built from it once, and the few
collectives the loop uses.

The layout comes only from our flags (``--tp``, ``--tp-backend``, ``--gpus-per-rank``) and the
launcher's RANK / LOCAL_RANK / WORLD_SIZE / LOCAL_WORLD_SIZE, read here and nowhere else. Ranks of
one tensor-parallel group are consecutive, so a TP group shares a node. Data is sharded by dp
rank; tp rank 0 of each group carries results; global rank 0 scores.

Every collective of the loop is a ``Topology`` method and a no-op at world size 1. Errors found
while preparing a run are agreed on by all ranks, so a bad input found on one rank ends every rank
with the same one-line message instead of leaving the others waiting.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from enum import Enum
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from evalkit.errors import UsageError

T = TypeVar("T")
# A collective that failed because a peer is gone: never one request's fault.
CollectiveError = dist.DistError


class AgreedError(UsageError):
    """Bad input that every rank knows about, so ranks may wait for each other before exiting."""


class Placement(str, Enum):
    """Where one model replica's weights live."""

    REPLICA = "replica"  # the whole model on this rank's device (data parallel)
    DEEPSPEED_TP = "deepspeed"  # DeepSpeed-Inference AutoTP across the rank's TP group
    TRANSFORMERS_TP = "transformers"  # transformers' own tensor parallelism across the TP group
    VLLM_TP = "vllm"  # one vLLM engine across the TP group (external_launcher)
    SPLIT = "split"  # one rank splits its model over its own K GPUs (device_map)


@dataclass(frozen=True, kw_only=True)
class Layout:
    """The whole parallel layout, validated once: every layout question is answered here.

    Ranks of one TP group are consecutive (a group shares a node); data is sharded by dp rank;
    tp rank 0 of each group carries results; global rank 0 scores.
    """

    world_size: int
    tp: int = 1
    placement: Placement = Placement.REPLICA
    gpus_per_rank: int = 1

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
        if self.gpus_per_rank < 1:
            problems.append(f"gpus_per_rank({self.gpus_per_rank}) must be at least 1")
        if self.tp > 1 and self.placement not in TP_PLACEMENTS:
            problems.append(f"tp({self.tp}) needs a tensor-parallel placement, not {self.placement.value}")
        if self.tp == 1 and self.placement in TP_PLACEMENTS:
            problems.append(f"placement {self.placement.value} needs tp > 1")
        if (self.gpus_per_rank > 1) != (self.placement is Placement.SPLIT):
            problems.append("--gpus-per-rank K > 1 is the split placement and cannot be combined with --tp")
        if problems:
            raise UsageError("bad parallel layout: " + "; ".join(problems))

    @classmethod
    def from_flags(cls, world_size: int, tp: int, tp_placement: str, gpus_per_rank: int) -> Layout:
        """The layout of ``tp`` and ``gpus_per_rank``; ``tp_placement`` is what splits a TP group
        (--tp-backend, or a backend that splits models itself)."""
        if tp > 1:
            placement = Placement(tp_placement)
        elif gpus_per_rank > 1:
            placement = Placement.SPLIT
        else:
            placement = Placement.REPLICA
        return cls(world_size=world_size, tp=tp, placement=placement, gpus_per_rank=gpus_per_rank)

    @property
    def dp(self) -> int:
        return self.world_size // self.tp

    @property
    def tensor_parallel(self) -> bool:
        return self.tp > 1

    def dp_rank(self, rank: int) -> int:
        return rank // self.tp

    def tp_rank(self, rank: int) -> int:
        return rank % self.tp

    def carries_results(self, rank: int) -> bool:
        """One rank per replica writes results: the first of its TP group."""
        return self.tp_rank(rank) == 0

    def tp_ranks(self, dp_rank: int) -> list[int]:
        return list(range(dp_rank * self.tp, (dp_rank + 1) * self.tp))

    def describe(self) -> dict[str, Any]:
        return {
            "world_size": self.world_size,
            "dp": self.dp,
            "tp": self.tp,
            "placement": self.placement.value,
            "gpus_per_rank": self.gpus_per_rank,
        }


TP_PLACEMENTS = (Placement.DEEPSPEED_TP, Placement.TRANSFORMERS_TP, Placement.VLLM_TP)


@dataclass(frozen=True, kw_only=True)
class Topology:
    """Where this process sits in the layout, and the one process group it shares with others."""

    layout: Layout
    rank: int
    local_rank: int
    device: torch.device
    backend: str
    # Processes of this launch on this node (they share its memory and GPUs).
    local_world_size: int = 1
    # This rank's TP group (None without tensor parallelism): the ranks that run the same batches
    # and so must agree on when to stop.
    tp_group: Any = None

    @property
    def dp_rank(self) -> int:
        return self.layout.dp_rank(self.rank)

    @property
    def tp_rank(self) -> int:
        return self.layout.tp_rank(self.rank)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def carries_results(self) -> bool:
        return self.layout.carries_results(self.rank)

    @property
    def distributed(self) -> bool:
        return self.layout.world_size > 1

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    def describe(self) -> dict:
        return {**self.layout.describe(), "backend": self.backend, "device": self.device.type}

    # -- collectives ---------------------------------------------------------------------------

    def all_gather(self, value: Any) -> list[Any]:
        return all_gather(self.world_size, value)

    def agreed(self, step: Callable[[], T]) -> T:
        """Run ``step`` on every rank; if it fails with bad input on any rank, fail on all of them."""
        return agreed(self.world_size, step)

    def hand_out(self, make: Callable[[], list[T]]) -> T:
        """Rank 0 makes one value per dp rank and every rank receives its own; every rank of a TP
        group gets its group's value. Bad input found by ``make`` ends every rank."""
        per_dp: list[Any] = []
        status: list[Any] = [None]
        if self.is_main:
            try:
                per_dp = make()
            except UsageError as exc:
                status = [str(exc)]
        if not self.distributed:
            if status[0] is not None:
                raise AgreedError(status[0])
            return per_dp[0]
        dist.broadcast_object_list(status, src=0)
        if status[0] is not None:
            raise AgreedError(status[0])
        mine: list[Any] = [None]
        scattered = [per_dp[self.layout.dp_rank(r)] for r in range(self.world_size)] if self.is_main else None
        dist.scatter_object_list(mine, scattered, src=0)
        return mine[0]

    def any_in_tp_group(self, flag: bool) -> bool:
        """Whether any rank of this rank's TP group raised ``flag`` (the flag itself without TP): a
        stop must be taken by every rank of a group at the same batch, or the others hang."""
        if self.tp_group is None:
            return flag
        value = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.tp_group)
        return bool(value.item())

    def tp_barrier(self) -> None:
        """Every rank of this rank's TP group has reached this point (nothing without TP)."""
        if self.tp_group is not None:
            dist.barrier(group=self.tp_group)

    def store(self) -> Any:
        """The launcher's key-value store (heartbeats), or None at world size 1."""
        return dist.distributed_c10d._get_default_store() if self.distributed else None


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


@dataclass(frozen=True)
class LaunchEnv:
    """What the launcher says about this process."""

    world_size: int
    rank: int
    local_rank: int
    local_world_size: int


def read_launcher_env() -> LaunchEnv:
    """World size, global rank, local rank and the processes on this node, from the launcher."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    if world_size < 1 or not 0 <= rank < world_size:
        raise UsageError(f"RANK={rank} is outside WORLD_SIZE={world_size}; check the launcher")
    local_world_size = _env_int("LOCAL_WORLD_SIZE", world_size)
    return LaunchEnv(world_size, rank, local_rank, max(local_world_size, 1))


def launcher_rank() -> str:
    """This process's rank as the launcher gave it, for messages before (or without) a topology."""
    return os.environ.get("RANK", "0")


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


def build_tp_group(layout: Layout, rank: int, timeout_s: float) -> Any:
    """This rank's TP group; TP groups are consecutive ranks, so they share a node.

    Every rank creates every group in the same order (a collective requirement), keeps its own,
    and all of them carry the run's --timeout. Data-parallel replicas never talk to each other
    except through the world group, so no dp groups are built.
    """
    if not layout.tensor_parallel:
        return None
    mine = None
    for dp_rank in range(layout.dp):
        ranks = layout.tp_ranks(dp_rank)
        group = dist.new_group(ranks, timeout=timedelta(seconds=timeout_s))
        if rank in ranks:
            mine = group
    return mine


def init_topology(
    tp: int, device: str | None, timeout_s: float, gpus_per_rank: int = 1, tp_placement: str = "deepspeed"
) -> Topology:
    """Build the process group once, prove it works, then agree on the layout on every rank.

    The group comes first so that a bad layout is reported by every rank together.
    """
    env = read_launcher_env()
    world_size, rank = env.world_size, env.rank
    dev = pick_device(device, env.local_rank, world_size, gpus_per_rank)
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
    layout = agreed(world_size, lambda: Layout.from_flags(world_size, tp, tp_placement, gpus_per_rank))
    return Topology(
        layout=layout,
        rank=rank,
        local_rank=env.local_rank,
        local_world_size=env.local_world_size,
        device=dev,
        backend=backend,
        tp_group=build_tp_group(layout, rank, timeout_s),
    )


def all_gather(world_size: int, value: Any) -> list[Any]:
    if world_size == 1:
        return [value]
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, value)
    return out


def agreed(world_size: int, step: Callable[[], T]) -> T:
    """Run ``step`` on every rank; if it fails with bad input on any rank, fail on all of them."""
    result, error = None, None
    try:
        result = step()
    except UsageError as exc:
        error = str(exc)
    errors = [(rank, e) for rank, e in enumerate(all_gather(world_size, error)) if e is not None]
    if errors:
        rank, message = errors[0]
        if message != error and error is None:
            message = f"{message} (found on rank {rank})"
        raise AgreedError(message)
    return result


def settle_before_exit() -> None:
    """After an error every rank agreed on: let every rank print it before any rank exits."""
    if dist.is_initialized():
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=timedelta(seconds=30))
        else:
            dist.barrier()


FAILED_KEY = "evalkit/failed"  # the launcher's store: the first failure of any rank, in one line


def ended_by_peer(rank: int, line: str) -> str:
    """What a rank says when it ends because another rank failed with ``line``."""
    return f"evalkit: rank {rank} ends the run: another rank failed ({line.removeprefix('evalkit: ')})"


def _with_store(use: Callable[[Any], T], wait_s: float) -> T | None:
    """``use(store)`` on the launcher's store, in a thread given at most ``wait_s`` seconds: the store
    may be gone with the rank or launcher that served it. None when it failed or took too long."""
    if not dist.is_initialized():
        return None
    import threading

    found: list[T] = []

    def run() -> None:
        try:
            found.append(use(dist.distributed_c10d._get_default_store()))
        except Exception:  # noqa: BLE001 - the store went away; the collectives will notice instead
            pass

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(wait_s)
    return found[0] if found else None


def posted_failure(wait_s: float = 2.0) -> str | None:
    """The failure another rank announced in the launcher's store, if any (a collective that broke
    because that rank is gone)."""

    def read(store: Any) -> str | None:
        return store.get(FAILED_KEY).decode(errors="replace") if store.check([FAILED_KEY]) else None

    return _with_store(read, wait_s)


def announce_failure(line: str, wait_s: float = 2.0) -> None:
    """Tell every rank, through the launcher's store, that this rank failed (their monitors end the
    run at once instead of at the next collective)."""
    _with_store(lambda store: store.set(FAILED_KEY, line), wait_s)


def shutdown() -> bool:
    """End the process group; whether there was one."""
    if not dist.is_initialized():
        return False
    dist.destroy_process_group()
    return True
