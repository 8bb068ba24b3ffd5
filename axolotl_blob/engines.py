"""Full values of parameters that a distributed engine shards, and the one process that writes files.

DDP and ZeRO-1/2 keep whole parameters in the model (ZeRO-1/2's fp32 partitions live in the optimizer and are copied
back into the model after every step). ZeRO-3 keeps shape-(0,) shards outside forward and FSDP2 DTensor shards, so
reading a posterior there (the logged KL, a saved file) needs its shards gathered: a collective, which every rank
enters at the same point while the process group is up. Plain tensors pass through untouched, with no
communication. Nothing here knows about Axolotl.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def is_zero3_partitioned(tensor: torch.Tensor) -> bool:
    """A parameter DeepSpeed ZeRO-3 partitions (it carries a `ds_id`)."""
    return hasattr(tensor, "ds_id")


def is_sharded(tensor: torch.Tensor) -> bool:
    return is_zero3_partitioned(tensor) or isinstance(tensor, DTensor)


@contextlib.contextmanager
def gathered(tensors: Sequence[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """The full value of every tensor, in order, for the duration of the block.

    ZeRO-3 parameters are gathered in place (`deepspeed.zero.GatheredParameters`, read-only: edits are not
    scattered back), DTensors are materialised (`full_tensor()`), anything else is yielded as it is. With any
    sharded tensor among them every rank must enter, as for any collective.
    """
    zero3 = [tensor for tensor in tensors if is_zero3_partitioned(tensor)]
    if any(is_sharded(tensor) for tensor in tensors) and not dist.is_initialized():
        raise RuntimeError("sharded parameters can be read only while the distributed process group is up")
    context = contextlib.nullcontext()
    if zero3:
        import deepspeed

        context = deepspeed.zero.GatheredParameters(zero3, modifier_rank=None)
    with context:
        yield [tensor.full_tensor() if isinstance(tensor, DTensor) else tensor for tensor in tensors]


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def global_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def is_global_main_process() -> bool:
    """Global rank 0: the one process that writes a file into a (possibly shared) output directory. Not LOCAL_RANK
    0, which every node has."""
    return global_rank() == 0


def process_group_gone() -> bool:
    """A multi-process run after its process group was destroyed (Axolotl calls `post_train` once more then)."""
    return world_size() > 1 and not dist.is_initialized()


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter: its ZeRO-3 partition, its DTensor shard, or the tensor itself."""
    if is_zero3_partitioned(tensor):
        return tensor.ds_tensor
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor
