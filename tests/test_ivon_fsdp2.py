"""IVON under FSDP2 at the torch level: `fully_shard` on a CPU mesh, gloo, 2 processes (accelerate enables FSDP on
GPUs only, so the Trainer cannot run it here). Every micro-batch goes through `ivon_micro_batch`, what the Trainer
integration runs around each micro-batch, with accelerate's `no_sync` reproduced (gradient sync off for every
micro-batch of an accumulated step but the last).

- Bayesian linear regression on a fully-sharded weight (3 elements: 2 on rank 0, 1 on rank 1) lands on the conjugate
  posterior within the single-process test's bounds (each rank draws its own elements' noise).
- With ε drawn from one full-size stream and sliced (`noise="global"`), 2 ranks equal one unsharded process on the
  whole batch: two MC samples per micro-batch, gradient accumulation, clipping, two param groups, uneven shards, the
  optimizer built before `fully_shard` and its parameters switched as accelerate does.
- A sharded (torch.distributed.checkpoint) and a full (gathered, rank 0) checkpoint each resume bit-identically, into
  a fresh optimizer as accelerate loads them, with a bf16 layer (its fp32 master copy in the state).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from axolotl_blob.ivon import IVON
from axolotl_blob.ivon.trainer import ivon_micro_batch
from conftest import free_port
from test_ivon_optimizer import linear_regression_problem

WORLD, STEPS, GA, MC = 2, 3, 2, 2


def init_process(rank: int, port: int):
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    return init_device_mesh("cpu", (WORLD,))


def micro_batch(model, optimizer, x, y, loss_fn, samples: int, accumulation: int, last: bool) -> torch.Tensor:
    """One of `accumulation` micro-batches as the Trainer runs it: under accelerate's no_sync unless it is the last
    of the step."""
    from torch.distributed.fsdp import FSDPModule

    sharded = isinstance(model, FSDPModule)
    if sharded and not last:
        model.set_requires_gradient_sync(False)

    def backward(scale: float) -> torch.Tensor:
        loss = loss_fn(model(x), y) * scale / accumulation  # as the Trainer scales each micro-batch's loss
        loss.backward()
        return loss.detach()

    loss = ivon_micro_batch(model, optimizer, samples, backward)
    if sharded:
        model.set_requires_gradient_sync(True)
    return loss


def full(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()


# --------------------------------------------------------------------------------------- conjugate posterior


class Regression(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(d, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w


def regression_worker(rank: int, port: int, out: str) -> None:
    from torch.distributed.fsdp import fully_shard

    mesh = init_process(rank, port)
    problem = linear_regression_problem()
    model = Regression(problem["d"])
    fully_shard(model, mesh=mesh)
    assert model.w.to_local().numel() == (2, 1)[rank]  # uneven shards
    rows = slice(rank * problem["n"] // WORLD, (rank + 1) * problem["n"] // WORLD)
    x, y = problem["x"][rows], problem["y"][rows]
    loss_fn = lambda prediction, target: (target - prediction).square().mean() / (2 * problem["s"] ** 2)  # noqa: E731
    opt = IVON([model.w], **problem["settings"])
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, problem["schedule"])
    mean_sum = torch.zeros(problem["d"], dtype=torch.float64)
    std_sum = torch.zeros(problem["d"], dtype=torch.float64)
    for t in range(problem["steps"]):
        micro_batch(model, opt, x, y, loss_fn, samples=1, accumulation=1, last=True)
        opt.step()
        opt.zero_grad()
        schedule.step()
        if t >= problem["steps"] - problem["averaged"]:
            mean_sum += full(opt.posterior_mean(model.w))
            std_sum += full(opt.posterior_std(model.w))
    if rank == 0:
        torch.save({"mean": mean_sum / problem["averaged"], "std": std_sum / problem["averaged"]}, out)
    dist.destroy_process_group()


@pytest.mark.slow
def test_bayesian_linear_regression_on_a_fully_sharded_weight(tmp_path):
    out = tmp_path / "posterior.pt"
    mp.spawn(regression_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    result, problem = torch.load(out), linear_regression_problem()
    exact_mean, mean_field_std, marginal_std = problem["exact_mean"], problem["mean_field_std"], problem["marginal_std"]
    assert ((result["mean"] - exact_mean).abs() / mean_field_std).max() < 0.1
    assert ((result["std"] / mean_field_std - 1).abs()).max() < 0.05
    assert ((result["std"] - mean_field_std).abs() < (result["std"] - marginal_std).abs()).all()


# --------------------------------------------------------------------------------------- equals one process


class Net(nn.Module):
    """Two layers of 8 and 3 output rows, so that the second layer's shards are uneven (2 and 1 rows); the second in
    bf16 (IVON keeps an fp32 master copy of its mean) where asked. A bf16 gradient depends on how the batch is split
    (each rank's is rounded before the reduce-scatter), so the comparison with one process is in fp32."""

    def __init__(self, bf16: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(4, 8)
        self.second = nn.Linear(8, 3).to(torch.bfloat16 if bf16 else torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.tanh(self.first(x)).to(self.second.weight.dtype)).float()


def batch(step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + micro)
    return torch.randn(2 * WORLD, 4, generator=g), torch.randint(0, 3, (2 * WORLD,), generator=g)


def ivon_for(model: nn.Module, **overrides) -> IVON:
    """IVON with the keyword arguments the plugin builds (`ivon_optimizer_kwargs`, a multi-process run), over the
    Trainer's two groups (weights decayed, biases not)."""
    from axolotl_blob.args import IvonSettings
    from axolotl_blob.ivon.trainer import ivon_optimizer_kwargs

    settings = IvonSettings(hess_init=0.5, mc_samples=MC, clip_radius=0.05, seed=3)
    kwargs = ivon_optimizer_kwargs(settings, ess=200.0, beta1=0.9, weight_decay=0.01, distributed=True)
    groups = [
        {"params": [p for name, p in model.named_parameters() if name.endswith("weight")]},
        {"params": [p for name, p in model.named_parameters() if name.endswith("bias")], "weight_decay": 0.0},
    ]
    return IVON(groups, lr=0.05, **{**kwargs, **overrides})


def train(model: nn.Module, opt: IVON, rows: slice, steps: range) -> None:
    """`steps` optimizer steps: GA micro-batches of MC samples each, the gradient clipped as the Trainer does (the
    last sample's), an evaluation draw after each step."""
    loss_fn = nn.functional.cross_entropy
    for step in steps:
        for micro in range(GA):
            x, y = batch(step, micro)
            micro_batch(model, opt, x[rows], y[rows], loss_fn, samples=MC, accumulation=GA, last=micro == GA - 1)
        nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        opt.zero_grad()
        with torch.no_grad(), opt.sampled_params(train=False):
            model(batch(step, GA)[0][rows])


def snapshot(model: nn.Module, opt: IVON) -> dict[str, torch.Tensor]:
    """Every parameter and state tensor, gathered, by name."""
    tensors = {}
    for name, p in model.named_parameters():
        tensors[name] = full(p)
        for key, value in opt.state[p].items():
            tensors[f"{name}.{key}"] = full(value)
    return tensors


def shard(model: nn.Module, mesh) -> None:
    from torch.distributed.fsdp import fully_shard

    fully_shard(model.first, mesh=mesh)
    fully_shard(model.second, mesh=mesh)
    fully_shard(model, mesh=mesh)


def switch_to_sharded(opt: IVON, model: nn.Module, names: dict[int, str]) -> None:
    """What accelerate does when the optimizer was built before `fully_shard` (the Trainer's FSDP2 route): each
    group's parameters replaced by the sharded ones of the same name."""
    sharded = dict(model.named_parameters())
    for group in opt.param_groups:
        group["params"] = [sharded[names[id(p)]] for p in group["params"]]


def equality_worker(rank: int, port: int, out: str) -> None:
    from torch.distributed.tensor import DTensor

    mesh = init_process(rank, port)
    model = Net()
    opt = ivon_for(model, noise="global")
    names = {id(p): name for name, p in model.named_parameters()}
    shard(model, mesh)
    switch_to_sharded(opt, model, names)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    assert model.second.weight.to_local().shape[0] == (2, 1)[rank]
    train(model, opt, slice(2 * rank, 2 * rank + 2), range(STEPS))
    result = snapshot(model, opt)
    assert isinstance(opt.state[model.first.weight]["hess"], DTensor)
    if rank == 0:
        torch.save(result, out)
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_with_one_noise_stream_equal_one_process_on_the_whole_batch(tmp_path):
    out = tmp_path / "sharded.pt"
    mp.spawn(equality_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    sharded = torch.load(out)

    model = Net()
    initial = {name: p.detach().float().clone() for name, p in model.named_parameters()}
    opt = ivon_for(model)
    train(model, opt, slice(None), range(STEPS))
    reference = snapshot(model, opt)

    assert sharded.keys() == reference.keys()
    for name, value in reference.items():
        torch.testing.assert_close(sharded[name], value, rtol=1e-5, atol=1e-6, msg=name)
    moved = max((reference[name].float() - initial[name]).abs().max().item() for name in initial)
    assert moved > 5e-3  # clipped at lr × clip_radius a step, thousands of times the tolerance


# --------------------------------------------------------------------------------------- checkpoints


def save(model: nn.Module, opt: IVON, directory: Path, kind: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    if kind == "sharded":
        state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, opt)}
        dcp.save(state, checkpoint_id=str(directory))
        return
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state, optimizer_state = get_model_state_dict(model, options=options), get_optimizer_state_dict(model, opt, options=options)
    if dist.get_rank() == 0:  # as accelerate writes FULL_STATE_DICT checkpoints
        torch.save(model_state, directory / "model.pt")
        torch.save(optimizer_state, directory / "optimizer.bin")
    dist.barrier()


def load(model: nn.Module, opt: IVON, directory: Path, kind: str) -> None:
    """As accelerate loads FSDP2 checkpoints: into a fresh optimizer (its state created by set_optimizer_state_dict)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    if kind == "sharded":
        state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, opt)}
        dcp.load(state, checkpoint_id=str(directory))
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, opt, state["optimizer"])
        return
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    rank0 = dist.get_rank() == 0
    set_model_state_dict(model, torch.load(directory / "model.pt") if rank0 else {}, options=options)
    set_optimizer_state_dict(model, opt, torch.load(directory / "optimizer.bin") if rank0 else {}, options=options)


def resume_worker(rank: int, port: int, directory: str, out: str) -> None:
    mesh = init_process(rank, port)
    rows = slice(2 * rank, 2 * rank + 2)
    model = Net(bf16=True)
    shard(model, mesh)
    opt = ivon_for(model)
    train(model, opt, rows, range(2))
    for kind in ("sharded", "full"):
        (Path(directory) / kind).mkdir(exist_ok=True)
        save(model, opt, Path(directory) / kind, kind)
    saved = snapshot(model, opt)
    weight = model.first.weight
    with opt.sampled_params(train=False):  # each rank draws its own elements, from its own stream
        noise = (full(weight) - full(opt.posterior_mean(weight))) / full(opt.posterior_std(weight))
    train(model, opt, rows, range(2, 4))
    results = {"uninterrupted": snapshot(model, opt), "noise": noise, "saved": saved}
    for kind in ("sharded", "full"):
        model = Net(bf16=True)
        shard(model, mesh)
        opt = ivon_for(model)
        load(model, opt, Path(directory) / kind, kind)
        with opt.sampled_params(train=False):
            pass
        train(model, opt, rows, range(2, 4))
        results[kind] = snapshot(model, opt)
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


@pytest.mark.slow
def test_sharded_and_full_checkpoints_resume_bit_identically(tmp_path):
    out = tmp_path / "resumed.pt"
    mp.spawn(resume_worker, args=(free_port(), str(tmp_path), str(out)), nprocs=WORLD, join=True)
    results = torch.load(out)
    expected = results["uninterrupted"]
    assert "second.weight.mean" in expected  # the bf16 layer's fp32 master copy, saved and loaded sharded
    for kind in ("sharded", "full"):
        assert results[kind].keys() == expected.keys()
        for name, value in expected.items():
            assert torch.equal(results[kind][name], value), f"{kind} checkpoint: {name}"
    assert_each_element_drawn_once_by_its_owner(results["noise"])


def assert_each_element_drawn_once_by_its_owner(noise: torch.Tensor) -> None:
    """The evaluation draw after two steps (two before it): rank r's rows of first.weight (8 × 4, 4 rows a rank) are
    the first values of one draw over the rank's elements of the group (first.weight's 16, then second.weight's 2 or
    1 rows of 8) from the stream seeded by (seed 3, evaluation, group 0, draw 2, r)."""
    from axolotl_blob.ivon.shard_noise import stream_seed

    rows = noise.shape[0] // WORLD
    for rank, second_rows in zip(range(WORLD), (2, 1)):
        stream = torch.Generator().manual_seed(stream_seed(3, False, 0, 2, rank))
        draw = torch.randn(rows * noise.shape[1] + second_rows * 8, generator=stream)
        expected = draw[: rows * noise.shape[1]].view(rows, -1)
        torch.testing.assert_close(noise[rank * rows : (rank + 1) * rows], expected, rtol=1e-4, atol=1e-4)


def test_the_gathered_checkpoint_gives_the_posterior_for_prediction(tmp_path):
    """`optimizer.bin` as accelerate writes it under FSDP2 (FULL_STATE_DICT: the gathered state keyed by parameter
    name) is what prediction reads IVON's posterior from (`ivon_from_checkpoint`)."""
    from axolotl_blob.ivon.checkpoint import ivon_from_checkpoint

    mp.spawn(resume_worker, args=(free_port(), str(tmp_path), str(tmp_path / "resumed.pt")), nprocs=WORLD, join=True)
    saved = torch.load(tmp_path / "resumed.pt")["saved"]
    model = Net(bf16=True)
    opt = ivon_from_checkpoint(model, tmp_path / "full")
    for name, p in model.named_parameters():
        for key in ("hess", "momentum", "step") + (("mean",) if p.dtype == torch.bfloat16 else ()):
            assert torch.equal(opt.state[p][key], saved[f"{name}.{key}"]), f"{name}.{key}"
        group = opt._group_of(p)
        expected_std = (saved[f"{name}.hess"] + group["weight_decay"]).mul(group["ess"]).rsqrt()
        torch.testing.assert_close(opt.posterior_std(p), expected_std, rtol=0, atol=0)
