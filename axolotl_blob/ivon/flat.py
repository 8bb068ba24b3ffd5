"""Per-parameter optimizer state held as views of one flat buffer per state key.

torch's optimizers keep one tensor per parameter and key, so an update costs one kernel per parameter and
operation (on CPU, ``torch._foreach_*`` is a loop over them). A LoRA adapter is many small tensors (SmolLM2-135M with
r 8 on q/v: 120 tensors, 0.46 M values), so these dispatches, not the arithmetic, set the step's time. Here the
tensors of a key, for the parameters of a group that share device and dtype, are views of one contiguous buffer: each
operation runs once over the buffer, while ``optimizer.state[p][key]`` is still a tensor of ``p``'s shape, so
``state_dict()`` stays torch's, per parameter.

Sharded parameters (FSDP2's DTensors) are handled through their local shards: a bucket's buffers hold this rank's
elements only, and the state entries are DTensors over views of them, placed as the parameter is, so that
``torch.distributed.checkpoint`` saves them sharded or gathers them into a full state dict as it does for torch's
optimizers.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor


def local_tensor(tensor: Tensor) -> Tensor:
    """The elements of ``tensor`` this rank holds: a DTensor's local shard (a view of its storage), or the tensor."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def like_param(param: Tensor, local: Tensor) -> Tensor:
    """``local`` (this rank's part of a tensor shaped as ``param``) as ``param`` is held: a DTensor placed as
    ``param`` for a DTensor parameter (no communication), else ``local`` itself."""
    if not isinstance(param, DTensor):
        return local
    return DTensor.from_local(local, param.device_mesh, param.placements, shape=param.shape, stride=param.stride())


class FlatBucket:
    """Parameters of one group that share device, dtype and whether they are sharded, with the flat buffers their
    state entries view (this rank's elements of them, for sharded parameters).

    ``buffer()`` is the way to the flat tensor of a key: when the entries are no longer views of the bucket's buffer
    (after ``load_state_dict``, which builds tensors of its own, or an entry replaced by hand) it concatenates them
    into a new one and re-points the entries, so a change made through ``optimizer.state[p]`` is never lost.
    """

    def __init__(self, params: list[Tensor], offsets: list[int], group_numel: int, scalar_keys: tuple[str, ...]):
        self.params = params
        self.sharded = isinstance(params[0], DTensor)
        self.shapes = [local_tensor(p).shape for p in params]
        self.numels = [math.prod(shape) for shape in self.shapes]
        self.device, self.dtype = params[0].device, params[0].dtype
        self._offsets = offsets  # where each parameter starts in its group's flattened order
        self._whole_group = sum(self.numels) == group_numel
        self._scalar_keys = scalar_keys  # keys holding one 0-dim tensor per parameter (a step count)
        self._buffers: dict[str, Tensor] = {}

    def locals(self) -> list[Tensor]:
        """What the parameters hold on this rank, to read and write in place: a DTensor's local shard (FSDP2
        all-gathers it in forward), or the parameter."""
        return [local_tensor(p) for p in self.params]

    def views(self, flat: Tensor) -> list[Tensor]:
        """``flat`` split into one view per parameter, of the parameter's (local) shape."""
        return [chunk.view(shape) for chunk, shape in zip(flat.split(self.numels), self.shapes)]

    @staticmethod
    def flatten(tensors: list[Tensor]) -> Tensor:
        """One new 1-D tensor holding ``tensors`` (their local shards, for DTensors) one after the other."""
        return torch.cat([local_tensor(t).reshape(-1) for t in tensors])

    def take(self, group_flat: Tensor) -> Tensor:
        """This bucket's part of a tensor flattened over the whole group (as a noise draw is)."""
        if self._whole_group:
            return group_flat
        return torch.cat([group_flat[offset : offset + n] for offset, n in zip(self._offsets, self.numels)])

    def grads(self, dtype: torch.dtype) -> tuple[Tensor, list[bool]] | None:
        """The parameters' gradients flattened in ``dtype`` (zeros where a parameter has none) and which have one;
        None if none has."""
        present = [p.grad is not None for p in self.params]
        if not any(present):
            return None
        grads = [p.grad if p.grad is not None else local.new_zeros(local.shape) for p, local in zip(self.params, self.locals())]
        return self.flatten(grads).to(dtype), present

    def buffer(self, state: dict, key: str) -> Tensor | None:
        """The flat tensor whose views are ``state[p][key]``; None if no parameter has the key. Entries missing
        beside present ones (a checkpoint of another layout) count as zeros."""
        buffer = self._buffers.get(key)
        entries = [None if state[p].get(key) is None else local_tensor(state[p][key]) for p in self.params]
        if buffer is not None and all(entry is not None and entry._base is buffer for entry in entries):
            return buffer
        if all(entry is None for entry in entries):
            self._buffers.pop(key, None)
            return None
        like = next(entry for entry in entries if entry is not None)
        shapes = [torch.Size(()) if key in self._scalar_keys else shape for shape in self.shapes]
        for entry, shape in zip(entries, shapes):
            if entry is not None and entry.shape != shape:
                raise ValueError(
                    f"optimizer state {key!r} of shape {tuple(entry.shape)} for a parameter held here as "
                    f"{tuple(shape)}: a full (gathered) state dict loads into sharded parameters through "
                    "torch.distributed.checkpoint.state_dict.set_optimizer_state_dict, which shards it"
                )
        filled = [entry if entry is not None else like.new_zeros(shape) for entry, shape in zip(entries, shapes)]
        buffer = self.flatten(filled)
        self.assign(state, key, buffer)
        return buffer

    def assign(self, state: dict, key: str, buffer: Tensor) -> None:
        """Make ``buffer`` the key's flat tensor: ``state[p][key]`` becomes its view for every parameter."""
        self._buffers[key] = buffer
        if key in self._scalar_keys:
            views = list(buffer.unbind())
        else:
            views = [like_param(p, view) for p, view in zip(self.params, self.views(buffer))]
        for p, view in zip(self.params, views, strict=True):
            state[p][key] = view

    def pop(self, state: dict, key: str) -> Tensor | None:
        """Remove the key from every parameter's state, returning its flat tensor (None if absent)."""
        buffer = self.buffer(state, key)
        for p in self.params:
            state[p].pop(key, None)
        self._buffers.pop(key, None)
        return buffer


def buckets_of(params: list[Tensor], scalar_keys: tuple[str, ...]) -> list[FlatBucket]:
    """The group's parameters split by (device, dtype, sharded), each bucket in group order; offsets count the
    elements this rank holds."""
    members: dict[tuple[torch.device, torch.dtype, bool], tuple[list[Tensor], list[int]]] = {}
    offset = 0
    for p in params:
        bucket_params, offsets = members.setdefault((p.device, p.dtype, isinstance(p, DTensor)), ([], []))
        bucket_params.append(p)
        offsets.append(offset)
        offset += local_tensor(p).numel()
    return [FlatBucket(ps, offsets, offset, scalar_keys) for ps, offsets in members.values()]
