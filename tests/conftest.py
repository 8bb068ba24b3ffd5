"""Shared fixtures: a tiny random Llama with a tokenizer trained here, data files, and an Axolotl runner.

Nothing is downloaded: the tokenizer is trained on the test corpus and the model is randomly initialised.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

WORDS = "red green blue cat dog bird one two three four sun moon star tree river stone".split()
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "AXOLOTL_DO_NOT_TRACK": "1", "WANDB_MODE": "disabled"}
os.environ.update(OFFLINE_ENV)  # before anything imports axolotl: its telemetry reads these at import time


@pytest.fixture(autouse=True)
def isolated_environment():
    """Each test starts from the suite's environment. Validating a config in-process (`load_cfg`) runs Axolotl's and
    the plugin's set-up, which export `ACCELERATE_*` variables for the run about to start; left behind, they reach
    every later test's subprocess (`ACCELERATE_USE_CPU=true` silently turns a later DeepSpeed run into plain DDP)."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def corpus(n: int, seed: int = 0) -> list[str]:
    """Sentences with a learnable rule: each sentence repeats its first word at the end."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = rng.choices(WORDS, k=rng.randint(4, 9))
        lines.append(" ".join(words + [words[0]]) + ".")
    return lines


COLORS = ["red", "green", "blue"]
NOT_COLORS = [w for w in WORDS if w not in COLORS]


def color_questions(n: int, seed: int) -> list[dict]:
    """'Which word is a color?' with one color among three other words, the answer at a random position."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        choices = rng.sample(NOT_COLORS, 3)
        answer = rng.randrange(4)
        choices.insert(answer, rng.choice(COLORS))
        rows.append({"id": f"color-{seed}-{i}", "question": "Which word is a color?", "choices": choices, "answer": answer})
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def free_port() -> int:
    """A TCP port free on this host, for a process group's rendezvous."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    directory = tmp_path_factory.mktemp("tiny-llama")
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.train_from_iterator(
        corpus(500) + ["A B C D E F G H Answer: Question:"], trainers.BpeTrainer(vocab_size=200, special_tokens=specials)
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.save_pretrained(directory)
    config = LlamaConfig(
        vocab_size=fast.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    import torch

    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def completion_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "sentences.jsonl"
    path.write_text("".join(json.dumps({"text": line}) + "\n" for line in corpus(240, seed=1)))
    return path


def base_config(model_dir: Path, data: Path, output_dir: Path, **overrides) -> dict:
    config = {
        "base_model": str(model_dir),
        "plugins": ["axolotl_blob.BlobPlugin"],
        "adapter": "blob",
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "lora_target_modules": ["q_proj", "v_proj"],
        "datasets": [{"path": str(data), "type": "completion"}],
        "dataset_prepared_path": str(output_dir / "prepared"),
        "val_set_size": 0.1,
        "sequence_len": 64,
        "micro_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "max_steps": 20,
        "learning_rate": 0.002,
        "optimizer": "adamw_torch",
        "lr_scheduler": "cosine",
        "warmup_steps": 2,
        "logging_steps": 1,
        "eval_steps": 10,
        "save_steps": 10,
        "output_dir": str(output_dir),
        "seed": 42,
        "save_safetensors": True,
        "blob": {"eval_samples": 2, "kl_lr": 0.01},
    }
    config.update(overrides)
    return config


TORCHRUN_2 = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m"]


def subprocess_env(path_first: tuple[Path, ...] = ()) -> dict[str, str]:
    """The environment of a test's subprocess: offline, with the test plugins importable (after `path_first`, which
    can shadow installed packages) before the caller's PYTHONPATH."""
    inherited = [os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []
    pythonpath = os.pathsep.join(str(p) for p in (*path_first, Path(__file__).parent / "helpers", *inherited))
    return {**os.environ, **OFFLINE_ENV, "PYTHONPATH": pythonpath}


def run_module(
    module: str,
    args: list[str],
    workdir: Path,
    launcher: list[str] | None = None,
    timeout: int = 600,
    log: str = "run.log",
    expect_success: bool = True,
    path_first: tuple[Path, ...] = (),
):
    """Run `python -m module args` (or under `launcher`, e.g. TORCHRUN_2) offline, with the test plugins importable
    (after `path_first`, which can shadow installed packages); the output goes to workdir/`log`, and an unexpected
    outcome fails the test with its stderr."""
    command = (launcher or [sys.executable, "-m"]) + [module, *args]
    env = subprocess_env(path_first)
    result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    (workdir / log).write_text(result.stdout + result.stderr)
    if expect_success:
        assert result.returncode == 0, f"{module} failed ({result.returncode}):\n{result.stderr[-4000:]}"
    else:
        assert result.returncode != 0, f"{module} was expected to fail but succeeded"
    return result


def run_axolotl(
    config: dict,
    workdir: Path,
    launcher: list[str] | None = None,
    timeout: int = 600,
    expect_success: bool = True,
    path_first: tuple[Path, ...] = (),
):
    """Write the config and run `python -m axolotl.cli.train` on it; the log is workdir/axolotl.log."""
    config_path = workdir / "config.yml"
    config_path.write_text(yaml.safe_dump(config))
    return run_module(
        "axolotl.cli.train", [str(config_path)], workdir, launcher, timeout, log="axolotl.log",
        expect_success=expect_success, path_first=path_first,
    )  # fmt: skip


def resume_dir(finished_run: Path, checkpoint: str, tmp_path: Path) -> Path:
    """A fresh output dir holding only `checkpoint` of a finished run (and its prepared data), to resume from."""
    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(finished_run / checkpoint, out / checkpoint)
    shutil.copytree(finished_run / "prepared", out / "prepared")
    return out


def assert_identical_tensors(actual: dict, expected: dict) -> None:
    """Same keys, and every tensor equal to the bit."""
    assert actual.keys() == expected.keys() and actual
    for key in actual:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, msg=key)


def multiple_choice_config(model_dir: Path, train: Path, output_dir: Path, **overrides) -> dict:
    """base_config training on a multiple-choice JSONL file, with no eval split of its own."""
    datasets = [{"path": str(train), "type": "axolotl_blob.multiple_choice"}]
    return base_config(model_dir, train, output_dir, datasets=datasets, val_set_size=0.0, **overrides)


def tiny_blob_model(model_dir: Path, init_std: float = 0.5):
    """The tiny Llama with BLoB on q_proj / v_proj and a non-zero B, so the noise path matters from the start."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from axolotl_blob.blob.model import bayesianize

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    bayesianize(model, init_std=init_std)
    return model
