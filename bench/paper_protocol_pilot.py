"""The paper-protocol study's pilot, on training files only: which task and answer format SmolLM2-135M-Instruct can
learn, before any arm runs (issue: choose the task, the format and the step count on training data only).

    python bench/paper_protocol_pilot.py zero-shot [--questions 200]   # the base model, letters vs cloze, per task

Scores the first questions of each task's *training* file with the base model (no adapter), bf16 autocast as the
recipes train, and writes bench/results/paper_protocol_pilot.json (accuracy, NLL, ECE, mean confidence, seconds).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from axolotl_blob.calibration.metrics import CalibrationState
from axolotl_blob.calibration.scoring import ChoiceScoring
from axolotl_blob.multiple_choice import read_examples
from axolotl_blob.sampling import DeterministicSampler

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "paper_protocol_pilot.json"
TASKS = ("openbookqa", "arc_easy", "arc_challenge", "sciq")


def zero_shot(questions: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = ROOT / "assets" / "smollm2-135m-instruct"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    results = {}
    for task in TASKS:
        examples = read_examples(ROOT / "assets" / f"{task}_train.jsonl")[:questions]
        answers = torch.tensor([e["answer"] for e in examples])
        for answer_format in ("letters", "cloze"):
            start = time.perf_counter()
            bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
            probs, _ = ChoiceScoring(model, tokenizer, DeterministicSampler(), 0, 16, bf16, answer_format).ordered_probabilities(examples)
            seconds = time.perf_counter() - start
            state = CalibrationState(15)
            state.update(probs, answers)
            metrics = {k: round(float(v), 4) for k, v in state.compute().items() if k in ("acc", "ece", "nll", "confidence")}
            results[f"{task}/{answer_format}"] = {**metrics, "questions": len(examples), "seconds": round(seconds, 1)}
            print(task, answer_format, results[f"{task}/{answer_format}"], flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("zero-shot",))
    parser.add_argument("--questions", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    report = {"zero_shot": zero_shot(args.questions), "command": f"python bench/paper_protocol_pilot.py zero-shot --questions {args.questions}"}
    previous = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    RESULTS.write_text(json.dumps({**previous, **report}, indent=1) + "\n")


if __name__ == "__main__":
    main()
