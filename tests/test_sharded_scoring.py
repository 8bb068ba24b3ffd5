"""BMA scoring of a sharded model, at the torch level on 2 gloo CPU ranks, as the calibration callback scores it
(the unwrapped module): each rank scores the same examples with N = 2 whole-weight posterior draws under bf16
autocast and must equal one process without sharding from the same seed. A draw reads lora_A's weight inside the
LoRA layer's forward (not lora_A's own), and scoring must leave a sharded model's parameters to its engine.

- DeepSpeed ZeRO-3 (`deepspeed.initialize`): every parameter is emptied outside its module's forward and gathered in
  that forward's hook.
- FSDP2 (`fully_shard` per decoder layer and the root): parameters are DTensor shards, unsharded per layer's forward.

Both answer formats: letters (the output layer at one position per question) and cloze (at every choice token).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoTokenizer

from axolotl_blob.calibration.scoring import ChoiceScoring
from axolotl_blob.sampling import BlobSampler
from conftest import free_port, tiny_blob_model

WORLD = 2
EXAMPLES = [
    {"question": "Which is a color?", "choices": ["red", "cat", "one"], "answer": 0},
    {"question": "Which is an animal? Pick the animal from the list", "choices": ["sun", "dog"], "answer": 1},
]
ZERO3 = {
    "train_micro_batch_size_per_gpu": 1,
    "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
}


def scores(model, tokenizer, answer_format: str) -> torch.Tensor:
    """N = 2 whole-weight draws under bf16 autocast (where scoring casts a plain model's fixed weights once, and must
    leave a partitioned model's alone), in `answer_format` (cloze: the output layer at every choice token's position)."""
    torch.manual_seed(7)
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    return ChoiceScoring(model, tokenizer, BlobSampler(model), 2, 2, bf16, answer_format).ordered_probabilities(EXAMPLES)[0]


def zero3_worker(rank: int, port: int, model_dir: str, out: str, answer_format: str) -> None:
    import os

    import deepspeed

    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(WORLD))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    engine, *_ = deepspeed.initialize(model=tiny_blob_model(Path(model_dir), init_std=0.3), config=ZERO3)
    module = engine.module
    assert any(p.numel() == 0 for p in module.parameters())  # partitioned: outside forward, no parameter is whole
    result = scores(module, AutoTokenizer.from_pretrained(model_dir), answer_format)
    if rank == 0:
        Path(out).write_text(json.dumps(result.tolist()))
    dist.destroy_process_group()


def fsdp2_worker(rank: int, port: int, model_dir: str, out: str, answer_format: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    model = tiny_blob_model(Path(model_dir), init_std=0.3)
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    result = scores(model, AutoTokenizer.from_pretrained(model_dir), answer_format)
    if rank == 0:
        Path(out).write_text(json.dumps(result.tolist()))
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("answer_format", ["letters", "cloze"])
@pytest.mark.parametrize("engine", ["zero3", "fsdp2"])
def test_bma_scoring_of_a_sharded_model_equals_one_process(engine, answer_format, tiny_model_dir, tmp_path):
    if engine == "zero3":
        pytest.importorskip("deepspeed")
    out = tmp_path / f"{engine}.json"
    worker = zero3_worker if engine == "zero3" else fsdp2_worker
    mp.spawn(worker, args=(free_port(), str(tiny_model_dir), str(out), answer_format), nprocs=WORLD, join=True)
    expected = scores(tiny_blob_model(tiny_model_dir, init_std=0.3).eval(), AutoTokenizer.from_pretrained(tiny_model_dir), answer_format)
    torch.testing.assert_close(torch.tensor(json.loads(out.read_text()), dtype=torch.float64), expected, rtol=0, atol=1e-6)
