"""What the rank scheduler and IVON would need on the sharded engines: the measurements behind the config errors
for `rank_scheduler` / `adapter: adalora` under FSDP2 and `optimizer: ivon` under DeepSpeed ZeRO (issue 23).

    python bench/sharded_engines_probe.py fsdp2-rank   # 2 gloo ranks on the CPU, ~30 s
    python bench/sharded_engines_probe.py zero2-ivon   # 2 gloo ranks, DeepSpeed installed, ~1 min
    python bench/sharded_engines_probe.py ivon-dtensor-overhead   # 1 process, ~5 s

fsdp2-rank: one AdaLoRA-shaped module (P: 64 × 8, Λ: 8, Q: 8 × 48) under `fully_shard`, IVON over its shards.
CommDebugMode counts the collectives of the SNR scores (pooled per component) and of the orthogonality regulariser.

zero2-ivon: IVON as DeepSpeed ZeRO-2's client optimizer (bf16, gradient accumulation 2) on a 2-layer MLP: what IVON's
param groups hold, whether a sample written by `sampled_params` reaches the forward, and what `update_lp_params` (the
copy of the fp32 partitions into the bf16 weights plus their all-gather) changes.

ivon-dtensor-overhead: IVON's time per step (one sample, gradients set by hand, one thread) over 120 LoRA-shaped
tensors, plain vs FSDP2 DTensors on a 1-rank mesh: what the shard bookkeeping costs without any communication.
"""

from __future__ import annotations

import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

WORLD, D_OUT, D_IN, R = 2, 64, 48, 8


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Factors(nn.Module):
    """P Λ Q as AdaLoRA holds it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.P = nn.Parameter(torch.randn(D_OUT, R) * 0.1)
        self.E = nn.Parameter(torch.randn(R, 1))
        self.Q = nn.Parameter(torch.randn(R, D_IN) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x @ self.Q.T) * self.E.T) @ self.P.T


def collectives(mode) -> dict[str, int]:
    return {str(op).removeprefix("c10d_functional."): n for op, n in mode.get_comm_counts().items()}


def fsdp2_rank(rank: int, port: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.debug import CommDebugMode

    from axolotl_blob.ivon import IVON
    from axolotl_blob.rank.importance import pool_components, snr

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    model = Factors()
    fully_shard(model, mesh=init_device_mesh("cpu", (WORLD,)))
    opt = IVON(model.parameters(), lr=0.01, ess=100.0)
    with opt.sampled_params(train=True):
        model(torch.randn(4, D_IN, generator=torch.Generator().manual_seed(rank))).square().mean().backward()
    opt.step()
    opt.zero_grad()

    def element_snr(param):
        return snr(opt.posterior_mean(param), opt.posterior_std(param))

    with CommDebugMode() as mode:
        scores = pool_components(element_snr(model.P), element_snr(model.Q), element_snr(model.E)).full_tensor()
    score_comm = collectives(mode)
    both = [torch.zeros_like(scores) for _ in range(WORLD)]
    dist.all_gather(both, scores)
    eye = torch.eye(R)
    with CommDebugMode() as mode:
        left_gram = (model.P.T @ model.P).full_tensor()
    left_comm = collectives(mode)
    with CommDebugMode() as mode:
        right_gram = (model.Q @ model.Q.T).full_tensor()
    right_comm = collectives(mode)
    with CommDebugMode() as mode:
        ((left_gram - eye).square().sum() + (right_gram - eye).square().sum()).backward()
    backward_comm = collectives(mode)
    if rank == 0:
        print(f"SNR scores (length {R}): {score_comm}; equal on both ranks: {torch.equal(*both)}")
        print(f"regulariser, PᵀP ({R} × {R} partial sums): {left_comm}")
        print(f"regulariser, QQᵀ (Q is {R} × {D_IN}, sharded by rank rows): {right_comm}")
        print(f"regulariser backward: {backward_comm}")
    dist.destroy_process_group()


def zero2_ivon(rank: int, port: int) -> None:
    import os

    import deepspeed

    from axolotl_blob.ivon import IVON

    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 2,
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": 2},
        "zero_allow_untested_optimizer": True,
    }
    ivon = IVON(model.parameters(), lr=0.01, ess=100.0, hess_init=0.01)  # σ ≈ 1: a sample is easy to see
    engine, optimizer, *_ = deepspeed.initialize(model=model, optimizer=ivon, config=config)
    groups = [[tuple(p.shape) for p in group["params"]] for group in ivon.param_groups]
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(rank)).bfloat16()
    with torch.no_grad():
        at_mean = engine(x).float()
        with ivon.sampled_params(train=False):
            in_context = engine(x).float()
            optimizer.update_lp_params()  # DeepSpeed's fp32-partition → bf16 copy and all-gather, outside step()
            pushed = engine(x).float()
        after_exit = engine(x).float()
        optimizer.update_lp_params()
        restored = engine(x).float()
    if rank == 0:
        print(f"IVON's param groups under ZeRO-2: {groups} (the model has {sum(p.numel() for p in model.parameters())} weights)")
        print(f"sample written by sampled_params, forward change: {(in_context - at_mean).abs().max().item():.3g}")
        print(f"after update_lp_params inside the context: {(pushed - at_mean).abs().max().item():.3g}")
        print(f"after the context exits (mean back in the partition, not in the weights): {(after_exit - at_mean).abs().max().item():.3g}")
        print(f"after update_lp_params again: {(restored - at_mean).abs().max().item():.3g}")
    dist.destroy_process_group()


def ivon_dtensor_overhead() -> None:
    import time

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from axolotl_blob.ivon import IVON

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)

    def lora_shaped() -> nn.ParameterList:
        torch.manual_seed(0)
        shapes = [(8, 576), (576, 8)] * 60  # A and B of r-8 LoRA on 576-wide projections
        return nn.ParameterList(nn.Parameter(torch.randn(shape) * 0.01) for shape in shapes)

    def median_step_ms(params: list[nn.Parameter], steps: int = 60) -> float:
        opt = IVON(params, lr=0.01, ess=1e5)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            with opt.sampled_params(train=True):
                for p in params:
                    p.grad = torch.ones_like(p)
            opt.step()
            opt.zero_grad()
            times.append(time.perf_counter() - start)
        return sorted(times[10:])[len(times[10:]) // 2] * 1e3

    holder = nn.Module()
    holder.factors = lora_shaped()
    fully_shard(holder, mesh=init_device_mesh("cpu", (1,)))
    plain = list(lora_shaped())
    plain_ms, sharded_ms = median_step_ms(plain), median_step_ms(list(holder.parameters()))
    values = sum(p.numel() for p in plain) / 1e6
    print(f"IVON step, median of 50: plain {plain_ms:.2f} ms, DTensor {sharded_ms:.2f} ms ({len(plain)} tensors, {values:.2f} M values)")
    dist.destroy_process_group()


if __name__ == "__main__":
    if sys.argv[1] == "ivon-dtensor-overhead":
        ivon_dtensor_overhead()
    else:
        probe = {"fsdp2-rank": fsdp2_rank, "zero2-ivon": zero2_ivon}[sys.argv[1]]
        mp.spawn(probe, args=(free_port(),), nprocs=WORLD, join=True)
