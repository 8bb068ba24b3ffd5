"""BLoB, IVON and BMA on one GPU, in one command: BLoB's numbers checked there, then its costs measured.

    PYTHONPATH=. python bench/gpu_check.py --out DIR [--sections correctness blob_vs_lora ivon_vs_adamw bma]
        [--budget-s 420]
    PYTHONPATH=. python bench/gpu_check.py --device cpu --tiny --out DIR     # the same code on a tiny model

Writes DIR/gpu_check.json and DIR/gpu_check.md, both rewritten after every measurement, so a run cut short still
leaves what it measured. The model: Llama-3.2-1B's shapes (1.24 B parameters) with random weights made on the GPU
in bf16 (nothing is downloaded), LoRA r 8 / alpha 16 on q_proj, v_proj in fp32, bf16 autocast. Sections:

- correctness: the BLoB layer's sampled outputs against the closed-form mean and variance (both training noise
  paths and prediction's whole-weight draws); with the noise fixed, the same sampled BLoB logits under eager
  attention, sdpa (as dispatched, and forced onto its math and its flash backend) and, where flash_attn imports,
  flash_attention_2; a short BLoB training run's loss falls (`blob_checks.py`);
- blob_vs_lora: training step time and peak CUDA memory of BLoB (flipout, rank_signs) against plain LoRA at
  8 × 1024 and 2 × 8192 tokens, with sdpa and (where flash_attn imports) flash_attention_2 attention;
- ivon_vs_adamw: the optimizer step alone and the whole training step;
- bma: choices scoring of multiple-choice prompts, BMA N = 10 against ten passes at the posterior mean.

Arms alternate within each round in one process; times are medians over rounds, by CUDA events (the host's clock
on a CPU). A time guard shares the budget out over the sections: a section whose share is spent starts no further
round or piece and marks what it left "skipped: time". Only torch, transformers, peft and the project's science
modules are imported: a plain checkout runs it on a machine without Axolotl.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import platform
import random
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import peft
import torch
import transformers
from torch.nn.attention import SDPBackend

from axolotl_blob.blob.model import bayesianize
from axolotl_blob.calibration.scoring import ChoiceScoring
from axolotl_blob.io import non_finite_as_null, write_json, write_text
from axolotl_blob.multiple_choice import ANSWER_CUE, LABELS
from axolotl_blob.sampling import BlobSampler
from blob_checks import attention_kernels, layer_moments, set_attention, training_loss_falls
from common import (
    BLOB_ARMS,
    LLAMA_1B_SHAPE,
    TINY_SHAPE,
    arm_optimizer,
    bf16_autocast,
    cuda_event_seconds,
    interleaved_seconds,
    random_lora_model,
    summarise,
    token_batch,
    trained_looking,
    training_step,
    wall_seconds,
)
from ivon_vs_adamw import optimizer_only_arms, training_arms

SECTION_SHARES = {"correctness": 2, "blob_vs_lora": 4, "ivon_vs_adamw": 1.5, "bma": 1.5}
GIB = 2.0**30


@dataclass(frozen=True)
class Setup:
    """What the sections run on: the full shapes on a GPU, tiny ones for the CPU dry run."""

    device: str
    shape: dict
    train_shapes: tuple[tuple[int, int], ...]
    check_tokens: tuple[int, int]
    rounds: int
    steps: int
    warmup: int
    moment_calls: int
    moment_rows: int
    loss_steps: int
    optimizer_steps: int
    examples: int
    scoring_batch: int
    question_words: tuple[int, int]

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def model(self, attention: str = "sdpa") -> torch.nn.Module:
        return random_lora_model(self.shape, self.device, torch.bfloat16, attention)

    def autocast(self):
        return bf16_autocast(self.device)()

    def timer(self, call: Callable[[], object], times: int) -> float:
        return (cuda_event_seconds if self.cuda else wall_seconds)(call, times)


def setup_for(device: str, tiny: bool) -> Setup:
    if tiny:
        return Setup(
            device, TINY_SHAPE, ((4, 64), (1, 256)), (2, 32), rounds=2, steps=2, warmup=1, moment_calls=2000,
            moment_rows=16, loss_steps=30, optimizer_steps=5, examples=24, scoring_batch=8, question_words=(8, 40),
        )  # fmt: skip
    return Setup(
        device, LLAMA_1B_SHAPE, ((8, 1024), (2, 8192)), (2, 256), rounds=5, steps=5, warmup=2, moment_calls=2000,
        moment_rows=256, loss_steps=30, optimizer_steps=20, examples=256, scoring_batch=32, question_words=(30, 200),
    )  # fmt: skip


def flash_attention_status(device: str) -> tuple[bool, str]:
    """(available, why not / its version)."""
    if not device.startswith("cuda"):
        return False, "flash_attention_2 needs a CUDA device"
    try:
        import flash_attn
    except Exception as error:  # ImportError, or a broken build's OSError / RuntimeError
        return False, f"flash_attn does not import ({type(error).__name__}: {error})"
    return True, f"flash_attn {flash_attn.__version__}"


def environment(setup: Setup) -> dict:
    available, reason = flash_attention_status(setup.device)
    info = {
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "device": setup.device, "cpu_threads": torch.get_num_threads(),
        "flash_attention_2": {"available": available, "detail": reason},
    }  # fmt: skip
    if setup.cuda:
        properties = torch.cuda.get_device_properties(setup.device)
        info.update(
            gpu=properties.name, gpu_memory_gib=properties.total_memory / GIB, cuda=torch.version.cuda,
            capability=f"{properties.major}.{properties.minor}",
            sdpa_flash_backend_enabled=torch.backends.cuda.flash_sdp_enabled(),
        )  # fmt: skip
    return info


class Guard:
    """One section's share of the time left, and the bookkeeping of its pieces: a piece past the deadline is
    recorded as skipped, one that fails as its error, and the report is saved after each."""

    def __init__(self, deadline: float, save: Callable[[], None]):
        self.deadline, self.save = deadline, save

    def passed(self) -> bool:
        return time.monotonic() > self.deadline

    def piece(self, record: dict, key: str, measure: Callable[[], dict]) -> None:
        if self.passed():
            record[key] = {"status": "skipped: time"}
        else:
            started = time.monotonic()
            try:
                record[key] = {"status": "done", **measure()}
            except Exception as error:
                record[key] = failure(error)
            record[key]["seconds"] = time.monotonic() - started
            release_memory()
        log(f"{key}: {record[key]['status']} ({record[key].get('seconds', 0.0):.1f} s)")
        self.save()


def log(message: str) -> None:
    """Progress on stderr (stdout gets the summary)."""
    print(f"[gpu_check] {message}", file=sys.stderr, flush=True)


def failure(error: Exception) -> dict:
    return {"status": f"error: {type(error).__name__}: {error}"[:600], "traceback": traceback.format_exc()[-3000:]}


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- sections


def attention_variants(device: str) -> dict[str, tuple[str, SDPBackend | None]]:
    """The kernels compared with sdpa as dispatched: eager, sdpa forced onto its math and its flash backend, and
    flash_attention_2 where flash_attn imports."""
    kernels = {"eager": ("eager", None), "sdpa_math": ("sdpa", SDPBackend.MATH)}
    kernels["sdpa_flash"] = ("sdpa", SDPBackend.FLASH_ATTENTION)
    if flash_attention_status(device)[0]:
        kernels["flash_attention_2"] = ("flash_attention_2", None)
    return kernels


def correctness(setup: Setup, guard: Guard, record: dict) -> None:
    model, device, autocast = setup.model, setup.device, setup.autocast
    kernels, loss_tokens = attention_variants(device), (4, setup.check_tokens[1])
    guard.piece(record, "layer_moments", lambda: layer_moments(model, device, autocast, setup.moment_calls, setup.moment_rows))
    guard.piece(record, "attention_kernels", lambda: attention_kernels(model, device, autocast, setup.check_tokens, kernels))
    guard.piece(record, "training_loss_falls", lambda: training_loss_falls(model, device, autocast, loss_tokens, setup.loss_steps))


def peak_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: Callable[[], object]) -> int:
    """The arm's peak CUDA memory had it trained alone: its resident tensors (weights, optimizer state) plus what
    one training step allocates above them."""
    state = [tensor for entries in optimizer.state.values() for tensor in entries.values() if torch.is_tensor(tensor)]
    resident = [*model.parameters(), *model.buffers(), *state]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in resident if t.is_cuda}
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return sum(storages.values()) + torch.cuda.max_memory_allocated() - before


def time_blob_arms(setup: Setup, guard: Guard, arms: dict, attention: str, batch: torch.Tensor) -> dict:
    for model, _ in arms.values():
        set_attention(model, attention)
    steps = {name: training_step(*arm, batch, setup.autocast) for name, arm in arms.items()}
    seconds = interleaved_seconds(steps, setup.steps, setup.rounds, setup.warmup, setup.timer, guard.deadline)
    result = {"tokens": batch.numel(), "rounds": len(seconds["lora"]), **summarise(seconds, "lora")}
    if setup.cuda:
        peaks = {name: peak_bytes(*arm, steps[name]) for name, arm in arms.items()}
        result["peak_memory_gib"] = {name: peak / GIB for name, peak in peaks.items()}
        result["peak_memory_ratio_to_lora"] = {name: peak / peaks["lora"] for name, peak in peaks.items()}
    return result


def blob_vs_lora(setup: Setup, guard: Guard, record: dict) -> None:
    arms = {}
    for name, noise in BLOB_ARMS.items():
        model = setup.model()
        arms[name] = (model, arm_optimizer(model, noise))
    flash, detail = flash_attention_status(setup.device)
    if not flash:
        record["flash_attention_2"] = {"status": f"unavailable: {detail}"}
    for attention in ["sdpa", *(["flash_attention_2"] if flash else [])]:
        for batch_size, length in setup.train_shapes:
            batch = token_batch(batch_size, length, high=setup.shape["vocab_size"]).to(setup.device)
            measure = lambda: time_blob_arms(setup, guard, arms, attention, batch)  # noqa: E731
            guard.piece(record, f"{attention} {batch_size}x{length}", measure)


def ivon_vs_adamw(setup: Setup, guard: Guard, record: dict) -> None:
    adamw_model, ivon_model = setup.model(), setup.model()
    params = [p for p in adamw_model.parameters() if p.requires_grad]
    record["lora_parameters"] = sum(p.numel() for p in params)

    def timed(arms: dict, steps: int) -> dict:
        seconds = interleaved_seconds(arms, steps, setup.rounds, setup.warmup, setup.timer, guard.deadline)
        return {"rounds": len(seconds["adamw"]), **summarise(seconds, "adamw")}

    batch = token_batch(*setup.train_shapes[0], high=setup.shape["vocab_size"]).to(setup.device)
    guard.piece(record, "optimizer_step", lambda: timed(optimizer_only_arms(params, None), setup.optimizer_steps))
    training = lambda: timed(training_arms(adamw_model, ivon_model, batch, setup.autocast), setup.steps)  # noqa: E731
    guard.piece(record, "training_step", training)


def word_tokenizer(vocab_size: int):
    """A whitespace word-level tokenizer made here (nothing downloaded): the answer cue, the choice labels and
    words w0, w1, … filling the vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    fixed = ["<unk>", "<pad>", ANSWER_CUE, *LABELS[:4], *(f"{label}." for label in LABELS[:4])]
    vocabulary = {token: i for i, token in enumerate(fixed + [f"w{i}" for i in range(vocab_size - len(fixed))])}
    tokenizer = Tokenizer(models.WordLevel(vocabulary, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>")


def multiple_choice_examples(count: int, words: int, question_words: tuple[int, int]) -> list[dict]:
    """Four-choice questions of random words, of lengths spread over `question_words` (as real prompts vary)."""
    rng = random.Random(0)
    phrase = lambda n: " ".join(f"w{rng.randrange(words)}" for _ in range(n))  # noqa: E731
    return [
        {"question": phrase(rng.randint(*question_words)), "choices": [phrase(rng.randint(1, 4)) for _ in range(4)],
         "answer": rng.randrange(4)}
        for _ in range(count)
    ]  # fmt: skip


def bma(setup: Setup, guard: Guard, record: dict) -> None:
    tokenizer = word_tokenizer(setup.shape["vocab_size"])
    examples = multiple_choice_examples(setup.examples, setup.shape["vocab_size"] - 20, setup.question_words)
    model = trained_looking(setup.model()).eval()  # non-zero B: the posterior moves the answers
    bayesianize(model, init_std=0.1, noise="flipout")
    record["examples"] = len(examples)

    def scoring(n_samples: int) -> Callable[[], torch.Tensor]:
        sampler, batch_size = BlobSampler(model), setup.scoring_batch
        return lambda: ChoiceScoring(model, tokenizer, sampler, n_samples, batch_size, setup.autocast).ordered_probabilities(examples)[0]

    def measure() -> dict:
        arms = {"mean_pass": scoring(0), "bma_10": scoring(10)}
        seconds = interleaved_seconds(arms, 1, setup.rounds, 1, setup.timer, guard.deadline)
        per_round = zip(seconds["bma_10"], seconds["mean_pass"])
        return {
            "rounds": len(seconds["mean_pass"]),
            **summarise(seconds, "mean_pass"),
            "bma_10_over_10_mean_passes": statistics.median(bma_10 / (10 * mean) for bma_10, mean in per_round),
            "max_probability_change": (arms["bma_10"]() - arms["mean_pass"]()).abs().max().item(),
        }

    guard.piece(record, "choices_scoring", measure)


SECTIONS = {"correctness": correctness, "blob_vs_lora": blob_vs_lora, "ivon_vs_adamw": ivon_vs_adamw, "bma": bma}


# --------------------------------------------------------------------------- goals and the summary


def goals(sections: dict) -> list[dict]:
    """The issue's goals, each as the ratio measured in this run against its limit."""
    rows = []

    def add(goal: str, value: float, limit: float) -> None:
        rows.append({"goal": goal, "value": value, "limit": limit, "met": value <= limit})

    pieces = lambda name: sections.get(name, {}).get("pieces", {})  # noqa: E731
    for key, run in pieces("blob_vs_lora").items():
        if isinstance(run, dict) and run.get("status") == "done":
            add(f"BLoB rank_signs step ≤ 1.05× LoRA ({key})", run["ratio_to_lora"]["blob_rank_signs"], 1.05)
            if "peak_memory_ratio_to_lora" in run:
                memory = run["peak_memory_ratio_to_lora"]["blob_rank_signs"]
                add(f"BLoB rank_signs peak memory ≤ 1.05× LoRA ({key})", memory, 1.05)
    training = pieces("ivon_vs_adamw").get("training_step", {})
    if training.get("status") == "done":
        add("IVON training step ≤ 1.02× AdamW", training["ratio_to_adamw"]["ivon"], 1.02)
    scoring = pieces("bma").get("choices_scoring", {})
    if scoring.get("status") == "done":
        add("BMA N = 10 ≤ 10× one mean pass", scoring["bma_10_over_10_mean_passes"], 1.0)
    kernels = pieces("correctness").get("attention_kernels", {})
    for name, difference in kernels.get("relative_difference_to_sdpa", {}).items():
        if "sampled" in difference:
            goal = f"{name}: sampled BLoB logits = sdpa's within bf16 tolerance (relative difference)"
            add(goal, difference["sampled"], difference["allowance"])
    return rows


def checks_passed(sections: dict) -> bool | None:
    """All correctness checks that ran passed (None: none ran)."""
    pieces = sections.get("correctness", {}).get("pieces", {}).values()
    results = [piece.get("passed") for piece in pieces if isinstance(piece, dict) and piece.get("status") == "done"]
    return all(results) if results else None


def number(value: object) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{key} {number(item)}" for key, item in value.items())
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def markdown(payload: dict) -> str:
    env, sections = payload["environment"], payload["sections"]
    machine = f"{env.get('gpu', 'CPU')}, torch {env['torch']} (CUDA {env.get('cuda')}), transformers "
    machine += f"{env['transformers']}, peft {env['peft']}"
    lines = [f"# GPU check, {payload['started'][:10]}: {machine}", ""]
    if not payload["setup"]["cuda"]:
        lines += ["**CPU dry run**: a tiny model on the CPU, to exercise the code; these are not GPU figures.", ""]
    lines += [f"Model: {payload['setup']['model']}; flash_attention_2: {env['flash_attention_2']['detail']}.", ""]
    lines += ["| goal | measured | limit | met |", "|---|---|---|---|"]
    for goal in payload["goals"]:
        lines.append(f"| {goal['goal']} | {number(goal['value'])} | {number(goal['limit'])} | {'yes' if goal['met'] else 'no'} |")
    lines += ["", f"Correctness checks passed: {payload['checks_passed']}", ""]
    lines += ["| section | piece | status | figures |", "|---|---|---|---|"]
    for name, section in sections.items():
        lines.append(f"| {name} | | {section['status']} | {number(section.get('seconds', 0.0))} s |")
        for piece, result in section["pieces"].items():
            if isinstance(result, dict):
                lines.append(f"| {name} | {piece} | {result.get('status', '')} | {figures(result)} |")
    lines += ["", f"Total {payload.get('seconds', 0):.0f} s; per-arm seconds, memory and every figure: gpu_check.json."]
    return "\n".join(lines) + "\n"


def figures(result: dict) -> str:
    """The headline numbers of a piece, in one cell."""
    keys = ("seconds_per_call", "ratio_to_lora", "peak_memory_gib", "peak_memory_ratio_to_lora", "ratio_to_adamw",
            "bma_10_over_10_mean_passes", "relative_difference_to_sdpa", "passed")  # fmt: skip
    return "; ".join(f"{key}: {number(result[key])}" for key in keys if key in result)


class Report:
    """gpu_check.json and gpu_check.md under `out`, each written whole every time."""

    def __init__(self, out: Path, payload: dict):
        self.out, self.payload = out, payload

    def save(self) -> None:
        self.payload["goals"] = goals(self.payload["sections"])
        self.payload["checks_passed"] = checks_passed(self.payload["sections"])
        write_json(self.out / "gpu_check.json", non_finite_as_null(self.payload))
        write_text(self.out / "gpu_check.md", markdown(self.payload))


def run(setup: Setup, sections: list[str], budget_s: float, out: Path, argv: list[str]) -> dict:
    """Every selected section in turn, each given its share of the time left."""
    start = time.monotonic()
    end = start + budget_s
    payload = {
        "check": "gpu_check", "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": argv, "budget_s": budget_s, "environment": environment(setup),
        "setup": {"cuda": setup.cuda, "model": model_description(setup), "train_shapes": setup.train_shapes},
        "sections": {},
    }  # fmt: skip
    report = Report(out, payload)
    for index, name in enumerate(sections):
        left = end - time.monotonic()
        share = left * SECTION_SHARES[name] / sum(SECTION_SHARES[s] for s in sections[index:])
        section = payload["sections"][name] = {"status": "skipped: time" if share < 5 else "running", "pieces": {}}
        if share >= 5:
            section_start = time.monotonic()
            try:
                SECTIONS[name](setup, Guard(time.monotonic() + share, report.save), section["pieces"])
                section["status"] = "done"
            except Exception as error:
                section.update(failure(error))
            section["seconds"] = time.monotonic() - section_start
            release_memory()
        log(f"section {name}: {section['status'][:200]} ({section.get('seconds', 0.0):.1f} s)")
        payload["seconds"] = time.monotonic() - start
        report.save()
    return payload


def model_description(setup: Setup) -> str:
    shape = setup.shape
    return (
        f"Llama, {shape['num_hidden_layers']} layers × {shape['hidden_size']} (heads {shape['num_attention_heads']}/"
        f"{shape['num_key_value_heads']}, MLP {shape['intermediate_size']}, vocabulary {shape['vocab_size']}), random "
        "bf16 weights, LoRA r 8 / alpha 16 on q_proj, v_proj (fp32), bf16 autocast"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for gpu_check.json and gpu_check.md")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--tiny", action="store_true", help="a tiny model and few rounds: the CPU dry run")
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--budget-s", type=float, help="time for all sections (default 420 s; 150 s with --tiny)")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device (for the dry run use --device cpu --tiny)")
    budget = args.budget_s if args.budget_s is not None else (150.0 if args.tiny else 420.0)
    payload = run(setup_for(args.device, args.tiny), args.sections, budget, args.out, sys.argv[1:])
    print(markdown(payload))
    return 0 if payload["checks_passed"] is not False else 1


if __name__ == "__main__":
    sys.exit(main())
