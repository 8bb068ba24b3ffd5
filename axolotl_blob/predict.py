"""Answer multiple-choice questions with a calibrated probability, and abstain where it is too low.

    python -m axolotl_blob.predict CONFIG --adapter DIR --input questions.jsonl [--samples N]
        [--abstain-below P] [--output predictions.jsonl] [--draws per_token|whole_weights] [--temperature T|none]

One JSON line per question: the chosen answer, its probability, every choice's probability, the predictive entropy
H(p̄), the mutual information (its epistemic part, H(p̄) − mean_n H(p_n)) and whether it abstained. The
probabilities are the calibration evaluator's (the same prompts, label tokens and posterior averaging). Posterior
sources: a BLoB or TFB adapter (N draws, as its saved eval_draws or --draws says), an IVON checkpoint (N weight draws from its optimizer state),
or a plain LoRA adapter (one pass, N = 0). A temperature saved beside the adapter (temperature.json) divides each
draw's choice logits unless --temperature says otherwise. stdout gets the JSON lines only; logs, the progress bar
and the closing summary go to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from axolotl_blob.calibration.metrics import entropy
from axolotl_blob.calibration.scoring import ChoiceScoring, choice_scorer
from axolotl_blob.calibration.temperature import draws_kind
from axolotl_blob.calibration.temperature_file import add_temperature_flag, applied_temperature, warn_on_other_draws
from axolotl_blob.cli import HelpFormatter, results_only_stdout
from axolotl_blob.multiple_choice import LABELS


@dataclass
class Prediction:
    """One question's answer. `predicted` indexes `choices`; `correct` only when the question had an `answer`."""

    id: str | None
    predicted: int
    predicted_label: str
    predicted_text: str
    probability: float
    probabilities: list[float]
    entropy: float
    mutual_info: float
    abstained: bool
    correct: bool | None = None

    def to_json(self) -> str:
        record = {k: v for k, v in asdict(self).items() if v is not None or k == "id"}
        return json.dumps(record, ensure_ascii=False, allow_nan=False)  # strict JSON, as every file we write


def predict(
    scoring: ChoiceScoring,
    questions: Sequence[dict],
    abstain_below: float | None = None,
    temperature: float = 1.0,
    progress: bool = False,
) -> Iterator[Prediction]:
    """Predictions for multiple-choice `questions` (dicts with question, choices, optional id and answer), scored as
    `scoring` says (its answer format, sampler and draws), each draw's choice logits divided by `temperature` before
    the draws are averaged."""
    from tqdm.auto import tqdm

    with tqdm(total=len(questions), unit="question", disable=not progress, file=sys.stderr) as bar:
        probs, draw_entropy = scoring.ordered_probabilities(questions, temperature, on_batch=bar.update)
    predictive_entropy = entropy(probs)
    mutual_info = predictive_entropy - draw_entropy if draw_entropy is not None else torch.zeros(len(questions))
    for row, question in enumerate(questions):
        own = probs[row, : len(question["choices"])]
        probability, predicted = own.max(-1)
        answer = question.get("answer")
        yield Prediction(
            id=question.get("id"),
            predicted=int(predicted),
            predicted_label=LABELS[int(predicted)],
            predicted_text=question["choices"][int(predicted)],
            probability=probability.item(),
            probabilities=own.tolist(),
            entropy=predictive_entropy[row].item(),
            mutual_info=max(mutual_info[row].item(), 0.0),  # ≥ 0 in exact arithmetic
            abstained=abstain_below is not None and probability.item() < abstain_below,
            correct=None if answer is None else int(predicted) == answer,
        )


def _summary(predictions: list[Prediction], n_samples: int, temperature: float | None) -> str:
    answered = [p for p in predictions if not p.abstained]
    abstained = len(predictions) - len(answered)
    scaled = f", T = {temperature:g}" if temperature is not None else ""
    line = f"{len(predictions)} questions, N = {n_samples}{scaled}: {len(answered)} answered, {abstained} abstained"
    graded = [p for p in answered if p.correct is not None]
    if graded:
        line += f"; accuracy on the answered {sum(p.correct for p in graded) / len(graded):.4f}"
    return line


def default_samples(cfg, has_blob_posterior: bool, has_ivon_state: bool) -> int:
    """The posterior source's own count: blob/ivon eval_samples, 10 for a TFB adapter, 0 for a point estimate."""
    from axolotl_blob.run_config import blob_settings, ivon_settings

    if cfg.optimizer == "ivon":
        return ivon_settings(cfg).eval_samples if has_ivon_state else 0
    if has_blob_posterior:
        return blob_settings(cfg).eval_samples if cfg.adapter == "blob" else 10
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m axolotl_blob.predict", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    parser.add_argument("config", help="the Axolotl YAML config the adapter was trained with (base model, tokenizer)")
    parser.add_argument("--adapter", required=True, type=Path, help="BLoB, TFB or LoRA adapter, or an IVON checkpoint-N")
    parser.add_argument("--input", required=True, type=Path, help="JSONL: {question, choices, optional id and answer}")
    parser.add_argument("--samples", type=int, default=None,
                        help="posterior samples; 0 = one pass at the mean (default: blob.eval_samples or "
                             "ivon.eval_samples, 10 for a TFB adapter, 0 for a plain LoRA adapter)")  # fmt: skip
    parser.add_argument("--abstain-below", type=float, default=None, metavar="P",
                        help="abstain where the answer's probability < P (default: never)")  # fmt: skip
    parser.add_argument("--output", type=Path, default=None, help="write the JSON lines here (default: stdout)")
    parser.add_argument("--batch-size", type=int, default=8, help="questions per forward pass")
    parser.add_argument("--draws", choices=("per_token", "whole_weights"), default=None,
                        help="how a BLoB posterior is sampled: per-token draws of its noise path, or one A per layer "
                             "and forward (default: as saved with it, blob_config.json's eval_draws)")  # fmt: skip
    add_temperature_flag(parser)
    return parser


def main(argv: list[str] | None = None) -> list[Prediction]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.samples is not None and args.samples < 0:
        parser.error("--samples must be >= 0")
    if args.abstain_below is not None and not 0 <= args.abstain_below <= 1:
        parser.error(f"--abstain-below must be a probability in [0, 1], got {args.abstain_below}")

    with results_only_stdout() as results:
        return _run(parser, args, results)


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace, results) -> list[Prediction]:
    from axolotl_blob.blob.model import missing_posterior_files, saved_eval_draws
    from axolotl_blob.evaluate import load_adapter_model
    from axolotl_blob.io import write_text
    from axolotl_blob.ivon.checkpoint import OPTIMIZER_FILE, ivon_from_checkpoint, optimizer_file
    from axolotl_blob.ivon.trainer import IvonSampler
    from axolotl_blob.multiple_choice import read_examples
    from axolotl_blob.run_config import answer_format, inference_device_and_autocast, load_tokenizer, read_config
    from axolotl_blob.sampling import sampler_for
    from axolotl_blob.saved_adapter import check_lora_adapter

    try:  # every input checked before any weights load
        cfg = read_config(args.config)
        if not args.input.is_file():
            raise FileNotFoundError(f"--input {args.input}: no such file")
        questions = read_examples(args.input, require_answer=False)
        check_lora_adapter(args.adapter, cfg.base_model)
        tokenizer = load_tokenizer(cfg, args.adapter)
        choice_scorer(answer_format(cfg), tokenizer, questions)  # every question scorable in the run's format
        temperature, saved = applied_temperature(args.temperature, args.adapter)
    except (FileNotFoundError, ValueError) as exc:
        parser.error(str(exc))
    has_ivon_state = optimizer_file(args.adapter) is not None  # optimizer.pt, or FSDP2's gathered optimizer.bin
    n_samples = args.samples
    if n_samples is None:
        n_samples = default_samples(cfg, not missing_posterior_files(args.adapter), has_ivon_state)
        if cfg.optimizer == "ivon" and not has_ivon_state:
            print(f"IVON: {args.adapter} has no {OPTIMIZER_FILE} (the Trainer saves it in checkpoint-N/ only): "
                  "predicting with the posterior mean, N = 0", file=sys.stderr)  # fmt: skip
    if cfg.optimizer == "ivon" and n_samples > 0 and not has_ivon_state:
        parser.error(f"--samples {n_samples} with an IVON run: {args.adapter} has no {OPTIMIZER_FILE}, where IVON's "
                     "posterior lives (checkpoint-N/ directories have it); point --adapter at one, or use --samples 0")  # fmt: skip

    torch.manual_seed(cfg.seed or 0)
    device, autocast = inference_device_and_autocast(cfg)
    model = load_adapter_model(cfg, args.adapter).to(device)
    if cfg.optimizer == "ivon" and n_samples > 0:
        sampler = IvonSampler(ivon_from_checkpoint(model, args.adapter))
    else:
        sampler = sampler_for(model, draws=args.draws or saved_eval_draws(args.adapter))
    n_samples = sampler.samples_used(n_samples)
    warn_on_other_draws(saved, n_samples, draws_kind(sampler, n_samples))
    predictions = []
    lines = []
    progress = len(questions) > args.batch_size
    scoring = ChoiceScoring(model, tokenizer, sampler, n_samples, args.batch_size, autocast, answer_format(cfg))
    answers = predict(scoring, questions, args.abstain_below, 1.0 if temperature is None else temperature, progress)
    for prediction in answers:
        predictions.append(prediction)
        if args.output:
            lines.append(prediction.to_json() + "\n")
        else:
            print(prediction.to_json(), file=results, flush=True)
    if args.output:
        write_text(args.output, "".join(lines))
    print(_summary(predictions, n_samples, temperature), file=sys.stderr)
    return predictions


if __name__ == "__main__":
    main(sys.argv[1:])
