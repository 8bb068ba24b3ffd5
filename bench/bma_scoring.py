"""The cost of calibration scoring in `choices` mode: against the previous scoring, posterior averaging against
single passes, and one pass against the Hugging Face Trainer's evaluation loop (what Axolotl's eval runs).

    python bench/bma_scoring.py [--model assets/smollm2-135m-instruct] [--data assets/sarcasm_val.jsonl]
        [--examples 96] [--batch-size 16] [--rounds 3] [--json out.json]

SmolLM2-135M with a BLoB adapter (LoRA r 8 on q_proj, v_proj, B non-zero), the first `--examples` validation
headlines, bf16 autocast on CPU, arms interleaved round by round (medians). Arms:

- `previous`: the scoring as it was, batches in file order and the output layer over every position;
- `mean_pass`: today's `ChoiceScoring.ordered_probabilities` at the posterior mean (N = 0): similar-length batches, the output
  layer at the answer position only; `previous / mean_pass` is the speed-up;
- `bma_10`: N = 10 posterior draws as scoring makes them (one whole A per layer and forward), against
  10 × `mean_pass`;
- `bma_10_flipout`, `bma_10_rank_signs`: the previous draws, the training noise paths' per-token perturbations;
- `trainer_eval`: `transformers.Trainer.evaluate` (prediction_loss_only) over the same prompts with the answer
  letter as the only label, one pass: the loop Axolotl's own evaluation runs.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from axolotl_blob.blob.model import bayesianize, blob_layers
from axolotl_blob.calibration.scoring import ChoiceScoring
from axolotl_blob.multiple_choice import format_prompt, label_token_ids, prompt_token_ids, read_examples
from axolotl_blob.sampling import BlobSampler
from common import DEFAULT_MODEL, emit, lora_model, trained_looking

AUTOCAST = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731


@torch.no_grad()
def previous_scoring(model: nn.Module, tokenizer, examples: list[dict], batch_size: int) -> torch.Tensor:
    """The N = 0 scoring before this benchmark's changes: file-order batches, logits at every position."""
    label_ids = torch.tensor(label_token_ids(tokenizer, max(len(e["choices"]) for e in examples)))
    out = []
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        prompts = [prompt_token_ids(tokenizer, format_prompt(e["question"], e["choices"])) for e in batch]
        lengths = torch.tensor([len(p) for p in prompts])
        input_ids = torch.full((len(batch), int(lengths.max())), tokenizer.pad_token_id, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, : len(prompt)] = torch.tensor(prompt)
        attention_mask = (torch.arange(input_ids.shape[1]) < lengths[:, None]).long()
        with AUTOCAST():
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        out.append(torch.softmax(logits[torch.arange(len(batch)), lengths - 1].float()[:, label_ids].double(), -1))
    return torch.cat(out)


def scoring(model, tokenizer, examples, n_samples: int, batch_size: int, whole_weights: bool = True) -> torch.Tensor:
    return ChoiceScoring(model, tokenizer, BlobSampler(model, whole_weights), n_samples, batch_size, AUTOCAST).ordered_probabilities(examples)[0]


def trainer_evaluation(model, tokenizer, examples, batch_size: int):
    """A one-pass `Trainer.evaluate` over the prompts + answer letter, the letter the only label."""
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    label_ids = label_token_ids(tokenizer, 2)
    rows = []
    for e in examples:
        prompt = prompt_token_ids(tokenizer, format_prompt(e["question"], e["choices"]))
        rows.append({"input_ids": prompt + [label_ids[e["answer"]]], "labels": [-100] * len(prompt) + [label_ids[e["answer"]]]})
    args = TrainingArguments(
        output_dir="/tmp/bma_scoring_trainer", per_device_eval_batch_size=batch_size, bf16=True, use_cpu=True,
        report_to=[], prediction_loss_only=True, disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, eval_dataset=Dataset.from_list(rows), data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True))
    return trainer.evaluate


def main() -> None:
    from transformers import AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--data", type=Path, default=Path("assets/sarcasm_val.jsonl"))
    parser.add_argument("--examples", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    examples = read_examples(args.data)[: args.examples]
    model = trained_looking(lora_model(args.model)).eval()  # non-zero B: the posterior moves the answers
    bayesianize(model, init_std=0.1, noise="flipout")

    def set_noise(noise: str) -> None:
        for _, layer, adapter in blob_layers(model):
            layer.lora_variant[adapter].noise = noise

    def token_noise_bma(noise: str):
        def run():
            set_noise(noise)
            return scoring(model, tokenizer, examples, 10, args.batch_size, whole_weights=False)

        return run

    arms = {
        "previous": lambda: previous_scoring(model, tokenizer, examples, args.batch_size),
        "mean_pass": lambda: scoring(model, tokenizer, examples, 0, args.batch_size),
        "bma_10": lambda: scoring(model, tokenizer, examples, 10, args.batch_size),
        "bma_10_flipout": token_noise_bma("flipout"),
        "bma_10_rank_signs": token_noise_bma("rank_signs"),
        "trainer_eval": trainer_evaluation(model, tokenizer, examples, args.batch_size),
    }
    max_difference = (arms["previous"]() - arms["mean_pass"]()).abs().max().item()
    seconds: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(args.rounds):
        for name, arm in arms.items():
            start = time.perf_counter()
            arm()
            seconds[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    per_round = lambda a, b, k=1.0: statistics.median(x / (k * y) for x, y in zip(seconds[a], seconds[b]))  # noqa: E731
    emit(
        {
            "benchmark": "choices scoring and BMA",
            "examples": len(examples),
            "threads": torch.get_num_threads(),
            "seconds": median,
            "speedup_previous_over_mean_pass": per_round("previous", "mean_pass"),
            "bma_10_over_10_mean_passes": per_round("bma_10", "mean_pass", 10.0),
            "bma_10_flipout_over_10_mean_passes": per_round("bma_10_flipout", "mean_pass", 10.0),
            "bma_10_rank_signs_over_10_mean_passes": per_round("bma_10_rank_signs", "mean_pass", 10.0),
            "trainer_eval_over_mean_pass": per_round("trainer_eval", "mean_pass"),
            "max_probability_difference_previous_vs_mean_pass": max_difference,
        },
        args.json,
    )


if __name__ == "__main__":
    main()
