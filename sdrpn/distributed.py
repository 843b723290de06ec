"""Small helpers for jobs launched by ``torchrun`` (labelling, training, evaluation).

A job splits its records with :func:`shard` (``items[rank::world]``: every process gets a share of
the beginning and of the end of the input), synchronises with :func:`barrier` and collects small Python objects
with :func:`gather_objects`. Without ``torchrun`` (or with one process) every helper is a no-op
and the job runs as rank 0 of 1.

Example::

    with sdrpn.distributed.process_group() as context:
        mine = sdrpn.distributed.shard(records, context)
        ...
        sdrpn.distributed.barrier()
        if context.is_main:
            merge()
"""

from __future__ import annotations

import contextlib
import gc
import os
from dataclasses import dataclass
from typing import Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class Context:
    """Where this process sits in the launch: rank, world size and rank on this machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launch_context() -> Context:
    """The rank, world size and local rank that ``torchrun`` put in the environment."""
    try:
        return Context(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                       int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError as exc:
        raise RuntimeError(f"RANK, WORLD_SIZE or LOCAL_RANK is not an integer ({exc})") from None


def default_backend(device: torch.device | str | None = None) -> str:
    """nccl for CUDA devices, gloo otherwise."""
    return "nccl" if torch.device(device or "cpu").type == "cuda" else "gloo"


@contextlib.contextmanager
def process_group(backend: str | None = None, device: torch.device | str | None = None) -> Iterator[Context]:
    """Join the process group of a ``torchrun`` launch for the duration of the block.

    ``backend`` defaults to :func:`default_backend` of ``device``. With a single process nothing
    is initialised. A group that already exists is used as is and left alone on exit.
    """
    context = launch_context()
    created = context.distributed and not dist.is_initialized()
    if created:
        if torch.device(device or "cpu").type == "cuda":
            torch.cuda.set_device(device_for(context, device))
        dist.init_process_group(backend or default_backend(device))
    try:
        yield context
    finally:
        if created:
            gc.collect()  # objects that hold the group (a DDP reducer in a cycle) go while it still exists
            dist.destroy_process_group()


def device_for(context: Context, device: torch.device | str | None) -> torch.device:
    """The device of this process: with several processes on CUDA, ``cuda:<local rank>``."""
    device = torch.device(device or "cpu")
    if device.type == "cuda" and context.distributed and device.index is None:
        return torch.device("cuda", context.local_rank)
    return device


def shard(items: Sequence[T], context: Context) -> list[T]:
    """This process's share of ``items``: every ``world_size``-th item from ``rank`` on."""
    return list(items[context.rank::context.world_size])


def barrier() -> None:
    """Wait for every process (no-op without a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def gather_objects(obj: T) -> list[T]:
    """Every process's ``obj`` (picklable), in rank order, on every process."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered

