"""Where a process sits in a torchrun launch, and the little torch.distributed
the builds need: joining the process group, and a barrier that also tells
whether every rank finished its part (``tc_explore.index.distributed``,
``WeightViews.build(..., distributed=True)``)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch

from .errors import InvalidInputError

# Ranks that finish early wait at the barrier for the slowest (after a resume,
# ranks whose shard was already done wait for the whole remaining build).
DEFAULT_TIMEOUT = timedelta(hours=48)


@dataclass(frozen=True)
class Launch:
    """Where this process sits in a torchrun launch."""
    rank: int
    world_size: int
    local_rank: int

    @classmethod
    def from_env(cls) -> "Launch | None":
        """The launch torchrun describes in the environment, or None when this
        process was not started by torchrun (or is alone)."""
        def env_int(name: str, default: str | None = None) -> int:
            text = os.environ.get(name, default)
            try:
                return int(text)
            except (TypeError, ValueError):
                raise InvalidInputError(f"The environment variable {name}={text!r} is not an integer; torchrun "
                                        "sets WORLD_SIZE, RANK and LOCAL_RANK (unset them outside torchrun).") from None
        world = env_int("WORLD_SIZE", "1")
        if world <= 1:
            return None
        rank, local_rank = env_int("RANK"), env_int("LOCAL_RANK", "0")
        if not 0 <= rank < world or local_rank < 0:
            raise InvalidInputError(f"RANK={rank} / LOCAL_RANK={local_rank} do not fit WORLD_SIZE={world}.")
        return cls(rank, world, local_rank)

    def device(self, requested: str | None) -> str:
        """This rank's device: ``cuda`` (or the default, with GPUs present)
        becomes ``cuda:LOCAL_RANK``; an explicit ``cuda:N`` or ``cpu`` is kept."""
        if requested is None:
            requested = "cuda" if torch.cuda.is_available() else "cpu"
        return f"cuda:{self.local_rank}" if requested == "cuda" else requested


def init_process_group(device: str, timeout: timedelta = DEFAULT_TIMEOUT) -> None:
    """Join torchrun's process group (from its environment) unless joined:
    NCCL for CUDA devices, gloo otherwise."""
    import torch.distributed as dist
    if dist.is_initialized():
        return
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(torch.device(device))
        dist.init_process_group("nccl", timeout=timeout, device_id=torch.device(device))
    else:
        dist.init_process_group("gloo", timeout=timeout)


def all_done(done: bool) -> bool:
    """Whether every rank's shard is finished (doubles as a barrier)."""
    import torch.distributed as dist
    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([1 if done else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def raise_where_rank0_failed(error: BaseException | None, what: str) -> None:
    """A barrier after rank 0 tried ``what`` alone (its ``error``, or None;
    other ranks pass None): if it failed, rank 0 raises its error and every
    other rank a ``TcExploreError`` pointing to it, instead of waiting for it
    at a later barrier."""
    from .errors import TcExploreError
    if all_done(error is None):
        return
    if error is not None:
        raise error
    raise TcExploreError(f"Rank 0 could not {what}; see its error.")
