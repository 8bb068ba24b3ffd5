"""BMA scoring under DeepSpeed ZeRO-3, at the torch level: `deepspeed.initialize` on 2 gloo CPU ranks. ZeRO-3
empties every parameter outside its module's forward and gathers a module's own parameters in that forward's hook;
the calibration callback scores the unwrapped module. Each rank scores the same examples with N = 2 whole-weight
posterior draws (a draw reads lora_A's weight inside the LoRA layer's forward, not lora_A's) under bf16 autocast
and must equal one process without DeepSpeed from the same seed."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoTokenizer

from axolotl_blob.calibration.scoring import ordered_choice_probabilities
from axolotl_blob.sampling import BlobSampler
from conftest import tiny_blob_model

pytest.importorskip("deepspeed")

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


def scores(model, tokenizer) -> torch.Tensor:
    """N = 2 whole-weight draws under bf16 autocast (where scoring casts a plain model's fixed weights once, and must
    leave a partitioned model's alone)."""
    torch.manual_seed(7)
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    return ordered_choice_probabilities(model, tokenizer, EXAMPLES, BlobSampler(model), 2, batch_size=2, autocast=bf16)[0]


def zero3_worker(rank: int, port: int, model_dir: str, out: str) -> None:
    import os

    import deepspeed

    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(WORLD))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    engine, *_ = deepspeed.initialize(model=tiny_blob_model(Path(model_dir), init_std=0.3), config=ZERO3)
    module = engine.module
    assert any(p.numel() == 0 for p in module.parameters())  # partitioned: outside forward, no parameter is whole
    result = scores(module, AutoTokenizer.from_pretrained(model_dir))
    if rank == 0:
        Path(out).write_text(json.dumps(result.tolist()))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_bma_scoring_of_a_zero3_partitioned_model_equals_one_process(tiny_model_dir, tmp_path):
    out = tmp_path / "zero3.json"
    mp.spawn(zero3_worker, args=(free_port(), str(tiny_model_dir), str(out)), nprocs=WORLD, join=True)
    expected = scores(tiny_blob_model(tiny_model_dir, init_std=0.3).eval(), AutoTokenizer.from_pretrained(tiny_model_dir))
    torch.testing.assert_close(torch.tensor(json.loads(out.read_text()), dtype=torch.float64), expected, rtol=0, atol=1e-6)
