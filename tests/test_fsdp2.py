"""BLoB under FSDP2 at the torch level: `fully_shard` on a CPU mesh, gloo, 2 processes (accelerate enables FSDP only
on GPUs, so the Trainer cannot run it here). The plugin's layer, BlobOptimizer (reference σ update, KL pull on M and
G) on DTensor shards, and the gathered KL / σ summary / posterior must equal one process training on the
concatenated batch. The noise is fixed (ε = 1, signs +1: tests/helpers/fixed_noise.py) so both see the same draws.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent / "helpers"))

from fixed_noise import fixed_noise  # noqa: E402

import axolotl_blob.blob.layer as blob_layer  # noqa: E402
from axolotl_blob.blob.model import kl_divergence, posterior_state_dict, posterior_summary  # noqa: E402
from axolotl_blob.blob.optimizer import BlobOptimizer, set_kl_weight  # noqa: E402
from axolotl_blob.blob.model import posterior_parameters  # noqa: E402
from axolotl_blob.engines import gathered  # noqa: E402
from conftest import free_port, tiny_blob_model  # noqa: E402

WORLD, STEPS, PRIOR, KL_LR, LR = 2, 3, 0.2, 0.05, 1e-2


def global_batch(step: int) -> torch.Tensor:
    """Token ids for every rank at `step`, rank r's rows r·2 and r·2+1; no padding, so each rank's mean NLL over
    equal token counts averages to the global mean."""
    return torch.randint(4, 100, (2 * WORLD, 9), generator=torch.Generator().manual_seed(100 + step))


def train(model, rows: slice) -> dict:
    """STEPS optimizer steps of BLoB on `rows` of each global batch; returns the gathered posterior summaries."""
    means, sigmas = posterior_parameters(model)
    excluded = {id(p) for p in sigmas}
    inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad and id(p) not in excluded], lr=LR, foreach=False)
    optimizer = BlobOptimizer(inner, means, sigmas, kl_lr=KL_LR, prior_std=PRIOR)
    model.train()
    for step in range(STEPS):
        ids = global_batch(step)[rows]
        set_kl_weight(optimizer.param_groups, 0.5)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        return {
            "kl": kl_divergence(model, PRIOR).item(),
            **posterior_summary(model),
            "posterior": posterior_state_dict(model),
            "means": gathered_means(model),
        }


def gathered_means(model) -> dict[str, torch.Tensor]:
    with gathered(posterior_parameters(model)[0]) as full:
        return {str(i): mean.detach().clone() for i, mean in enumerate(full)}


def sharded_worker(rank: int, port: int, model_dir: str, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    blob_layer.NOISE_PATHS["flipout"] = fixed_noise
    model = tiny_blob_model(Path(model_dir))
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    means, sigmas = posterior_parameters(model)
    assert all(isinstance(p, DTensor) and p.to_local().shape[0] == p.shape[0] // WORLD for p in means + sigmas)
    result = train(model, slice(2 * rank, 2 * rank + 2))
    if rank == 0:
        torch.save(result, out)
    dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_shards_train_as_one_process_on_the_whole_batch(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "sharded.pt"
    mp.spawn(sharded_worker, args=(free_port(), str(tiny_model_dir), str(out)), nprocs=WORLD, join=True)
    sharded = torch.load(out, weights_only=False)

    monkeypatch.setitem(blob_layer.NOISE_PATHS, "flipout", fixed_noise)
    model = tiny_blob_model(tiny_model_dir)
    initial = {k: v.clone() for k, v in posterior_state_dict(model).items()}
    reference = train(model, slice(None))

    for part in ("posterior", "means"):
        assert sharded[part].keys() == reference[part].keys()
        for key in reference[part]:
            torch.testing.assert_close(sharded[part][key], reference[part][key], rtol=0, atol=1e-5, msg=f"{part} {key}")
    assert sharded["kl"] == pytest.approx(reference["kl"], rel=1e-5)
    assert sharded["sigma_mean"] == pytest.approx(reference["sigma_mean"], rel=1e-5)
    moved = max((reference["posterior"][k] - initial[k]).abs().max().item() for k in initial)
    assert moved > 1e-3  # G moved far beyond the tolerance: a wrong shard update would show
