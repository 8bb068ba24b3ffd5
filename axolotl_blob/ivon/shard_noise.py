"""ε for sharded parameters (FSDP2's DTensors): every element of a full parameter is drawn once per sample, by the
rank that holds it, and the forward's all-gather hands every rank the same full sample.

Two layouts (``IVON(noise=...)``):

* ``"shard"`` (the default): each rank draws its own elements only, from a stream seeded by (seed, training or
  evaluation, group, draw count, the rank's coordinates on the sharded mesh dimensions). No communication, and a draw
  costs the local elements. The draw count lives in the param group, so it is saved and resumed with any checkpoint
  (sharded or gathered) and a resumed run draws what an uninterrupted one would. The noise is a function of the world
  size: another world size shards the parameters at other boundaries and seeds other streams, so it draws other
  (identically distributed) noise and follows another trajectory of the same algorithm.
* ``"global"``: every rank draws the group's full ε from the optimizer's generator, as an unsharded run does, and
  keeps its part. A run then equals, draw for draw, one process without sharding, at any world size, for the cost of
  drawing every element on every rank; the generator state is in ``IVON.state_dict()``'s ``"ivon"`` entry, which
  ``torch.distributed.checkpoint`` does not carry (save that entry yourself to resume such a run exactly).
"""

from __future__ import annotations

import hashlib
from typing import Literal

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

NoiseLayout = Literal["shard", "global"]
NOISE_LAYOUTS = ("shard", "global")


def stream_seed(*words: int) -> int:
    """A 63-bit seed from integers: distinct tuples give unrelated streams (a hash, not a sum that could collide)."""
    digest = hashlib.blake2b(repr(tuple(int(word) for word in words)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def shard_coordinates(params: list[Tensor]) -> tuple[int, ...]:
    """This rank's coordinates on the mesh dimensions that shard the group's parameters: ranks that hold the same
    shards (HSDP replicas) share them, and so draw the same noise. The group's parameters must agree."""
    coordinates = set()
    for p in params:
        mesh_coordinate = p.device_mesh.get_coordinate()
        if mesh_coordinate is None:
            raise ValueError("IVON: a sharded parameter whose device mesh does not include this rank")
        coordinates.add(tuple(c for c, placement in zip(mesh_coordinate, p.placements) if placement.is_shard()))
    if len(coordinates) != 1:
        raise ValueError(
            f"IVON: the parameters of one group are sharded differently ({sorted(coordinates)} on this rank); give "
            "parameters sharded over different device meshes their own param groups"
        )
    return coordinates.pop()


def local_part(full: Tensor, params: list[Tensor]) -> Tensor:
    """This rank's elements of ``full`` (flattened over the group's full parameters, in order), flattened in the
    order of the parameters' local shards."""
    parts, offset = [], 0
    for p in params:
        whole = full[offset : offset + p.numel()].view(p.shape)
        offset += p.numel()
        if isinstance(p, DTensor):
            shape, start = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
            whole = whole[tuple(slice(s, s + n) for s, n in zip(start, shape))]
        parts.append(whole.reshape(-1))
    return torch.cat(parts)
